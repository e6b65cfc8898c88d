"""The workflow runner of Keel's worker: the SDK's sandbox, asked about contexts directly.

For every payload it decodes or encodes (each activity's input and result, each local
activity's marker, the run's result), the SDK's worker asks the workflow instance which
serialization context applies, three or four times per payload sequence (codec, external
storage and reference passes). The sandboxed instance answers each question by compiling and
``exec``-ing a line of code inside the sandbox with its restricted builtins applied, about as
costly as a small activation (profiled: ~7% of the worker's busy time on the demo path; a
one-step run 4.6 ms and a ten-step run 19 ms faster without it, see ``bench/RESULTS.md``).

The answer is plain data read from the workflow's own state (the pending activity's type,
id and task queue, or the workflow's id): a method of the instance inside the sandbox that
imports nothing and calls nothing non-deterministic. ``KeelWorkflowRunner`` calls that same
method on that same object from outside, without the exec, so the answer is the very one the
SDK would get; workflow code still runs only inside the sandbox, every activation as before.
No command, event or payload changes, so recorded histories replay unchanged.

The in-sandbox object is found by a private name of ``temporalio`` (1.35). Should a later SDK
rename it, the wrapper falls back to the SDK's own path (correct, only slower), and
``tests/test_runner.py`` fails so the upgrade is noticed; that test also checks, for a real
run, that both paths give equal contexts for every payload.
"""

from __future__ import annotations

from typing import Any

from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

__all__ = ["KeelWorkflowRunner", "in_sandbox_instance"]

_IN_SANDBOX = "__temporal_in_sandbox"
"""Where ``temporalio.worker.workflow_sandbox._runner._Instance`` keeps the in-sandbox object."""


def in_sandbox_instance(instance: WorkflowInstance) -> Any | None:
    """The object the sandboxed ``instance`` forwards its questions to, or ``None``."""
    scope = getattr(instance, "globals_and_locals", None)
    found = scope.get(_IN_SANDBOX) if isinstance(scope, dict) else None
    ok = callable(getattr(found, "get_serialization_context", None)) and callable(
        getattr(found, "get_external_store_context", None)
    )
    return found if ok else None


class KeelWorkflowRunner(SandboxedWorkflowRunner):
    """``SandboxedWorkflowRunner`` (same restrictions, same per-run sandbox) whose instances
    answer the converter's context questions without an ``exec`` into the sandbox."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        inner = super().create_instance(det)
        direct = in_sandbox_instance(inner)
        return inner if direct is None else _DirectContexts(inner, direct)


class _DirectContexts(WorkflowInstance):
    """Delegates everything to the sandboxed instance but the two context questions."""

    def __init__(self, inner: WorkflowInstance, direct: Any) -> None:
        self._inner, self._direct = inner, direct

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        return self._inner.activate(act)

    def get_serialization_context(self, command_info: Any) -> Any:
        return self._direct.get_serialization_context(command_info)

    def get_external_store_context(self, command_info: Any) -> Any:
        return self._direct.get_external_store_context(command_info)

    def get_info(self) -> Any:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()
