"""``keel.runner``: the worker's sandbox answers the converter's context questions directly.

What must hold, and what each test tries to break:

- the answers are the SDK's own: for every payload of real demo runs (activities, local
  activities, their markers, the result; a worker that replays every task from history and one
  that caches), the direct answer equals the one the SDK gets by exec-ing into the sandbox;
- the direct path is the one taken with this ``temporalio`` (a renamed private attribute in a
  later SDK must fail here, not silently cost every run a few milliseconds);
- without the in-sandbox object the runner falls back to the SDK's instance, unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails

from keel import runner
from keel.settings import Settings
from keel.workflows.agent import AgentWorkflow
from tests.helpers import make_order, request, run_agent, running_worker


class _Capture(runner.KeelWorkflowRunner):
    made: list[WorkflowInstance]

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        inst = super().create_instance(det)
        type(self).made.append(inst)
        return inst


def _instance() -> WorkflowInstance:
    """An instance as the worker validates the workflow with (needs a running loop)."""
    _Capture.made = []
    _Capture().prepare_workflow(workflow._Definition.must_from_class(AgentWorkflow))
    return _Capture.made[-1]


async def test_direct_path_is_taken_with_this_sdk() -> None:
    inst = _instance()
    assert isinstance(inst, runner._DirectContexts), (
        "temporalio no longer keeps its in-sandbox object where keel.runner looks: every payload "
        "now costs an exec into the sandbox again (see keel/runner.py)"
    )
    assert runner.in_sandbox_instance(inst._inner) is inst._direct


async def test_falls_back_to_the_sdk_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_IN_SANDBOX", "__not_there__")
    inst = _instance()
    assert not isinstance(inst, runner._DirectContexts)
    assert runner.in_sandbox_instance(object()) is None  # type: ignore[arg-type]


async def test_direct_answers_equal_the_sdks_for_real_runs(
    client: Client,
    db_pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    differ: list[tuple[str, Any, Any]] = []

    def compared(name: str) -> Any:
        direct = getattr(runner._DirectContexts, name)

        def both(self: runner._DirectContexts, info: Any) -> Any:
            mine, sdk = direct(self, info), getattr(self._inner, name)(info)
            asked.append(name)
            if mine != sdk:
                differ.append((name, mine, sdk))
            return mine

        return both

    for name in ("get_serialization_context", "get_external_store_context"):
        monkeypatch.setattr(runner._DirectContexts, name, compared(name))
    for cache in (0, 100):  # every task replayed from history; then a cached run
        tq = f"{task_queue}-{cache}"
        async with running_worker(client, db_pool, settings, tq, max_cached_workflows=cache):
            order = await make_order(db_pool, total_usd=12.5)
            task = f"Check if order {order} is shipped, refund it if so, and e-mail the customer"
            resp = await run_agent(client, tq, request(task))
        assert resp.outcome == "completed", resp.reason
        assert [s.tool for s in resp.steps] == ["lookup_order", "issue_refund", "send_email"]
    assert differ == []
    assert asked.count("get_serialization_context") >= 20
    assert "get_external_store_context" in asked
