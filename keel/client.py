"""``keel.Client``: start, follow and steer agent runs from Python (the CLI is built on it).

Async and typed with the payload models (``AgentRequest`` in, ``AgentResponse`` and
``RunStatus`` out)::

    from keel import Client

    keel = await Client.connect()                     # settings from the environment
    run = await keel.start("Is ORD-123 shipped?", tenant="acme", user="alice")
    async for event in run.events():                  # live progress
        print(event.kind, event.step.id if event.step else event.phase)
    response = await run.result()

A run is one Temporal workflow with the id ``agent/<tenant>/<agent>/<request_id>``; the
request id is an idempotency key (``keel.submit``): starting the same request again attaches
to its run (``run.attached``), a different request under that id is refused
(``RunExistsError``), so a caller that retries never starts a second run. Errors a caller
should handle are the ``KeelClientError`` family; infrastructure errors (Temporal
unreachable) are the SDK's own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from keel.agents import DEFAULT_AGENT, workflow_id
from keel.codec import data_converter, load_keyring
from keel.errors import KeelError
from keel.models import (
    AgentRequest,
    AgentResponse,
    Approval,
    Frozen,
    ModelPolicy,
    RunStatus,
    StepRecord,
    StepState,
)
from keel.redact import redact
from keel.search_attributes import AGENT, TENANT, USER
from keel.settings import Settings, load_settings
from keel.submit import WORKFLOW, RequestIdConflict, start_or_attach

__all__ = [
    "AGENT",
    "Client",
    "KeelClientError",
    "RefusedError",
    "Run",
    "RunEvent",
    "RunExistsError",
    "RunNotFoundError",
    "TENANT",
    "USER",
    "WORKFLOW",
    "connect",
]

POLL_SECONDS = 0.25
"""How often ``events``/``watch`` ask a run for its status (a query: no history growth)."""


class KeelClientError(KeelError):
    """Base of the errors a caller of ``keel.Client`` is expected to handle."""


class RunNotFoundError(KeelClientError):
    """No run has this workflow id (in this namespace)."""


class RunExistsError(KeelClientError):
    """The request id was already used for a different request (starting the same request
    again attaches to its run instead: ``Run.attached``)."""


class RefusedError(KeelClientError):
    """The run refused the update: nothing waits for approval, or it already finished."""


async def connect(settings: Settings) -> TemporalClient:
    """Connect with the pydantic converter and the encryption codec: every payload Temporal
    stores (inputs, results, failures, summaries) is ciphertext under the settings' keys.
    Address, namespace, TLS, API key and gRPC metadata come from the envconfig profile."""
    return await TemporalClient.connect(
        settings.temporal_address,
        **settings.connect_options(),
        data_converter=data_converter(load_keyring(settings)),
    )


class RunEvent(Frozen):
    """One change in a run, derived from successive status snapshots.

    ``kind``: ``phase`` (planning, executing, waiting_approval, ...), ``step`` (a step changed
    state; ``step`` holds it), ``waiting`` (it waits for a human; ``waiting_for`` says what)
    or ``done`` (the last event; ``status.outcome`` says how it ended).
    """

    kind: Literal["phase", "step", "waiting", "done"]
    workflow_id: str
    phase: str = ""
    step: StepRecord | None = None
    waiting_for: str = ""
    status: RunStatus


class Run:
    """A handle on one run (started here or elsewhere)."""

    def __init__(self, handle: WorkflowHandle[Any, AgentResponse], *, attached: bool = False) -> None:
        self._handle = handle
        self.attached = attached
        """True when ``start`` found this request already running or run (same id, same
        request) and attached to it instead of starting another."""

    @property
    def workflow_id(self) -> str:
        return self._handle.id

    async def result(self) -> AgentResponse:
        """Wait for the run to end; its answer, steps, spend and outcome."""
        try:
            return await self._handle.result()
        except RPCError as e:
            raise _translated(e, self.workflow_id) from e

    async def temporal_status(self) -> str:
        """Temporal's view: ``running``, ``completed``, ``failed``, ``cancelled``, ..."""
        try:
            desc = await self._handle.describe()
        except RPCError as e:
            raise _translated(e, self.workflow_id) from e
        return desc.status.name.lower() if desc.status else "unknown"

    async def status(self) -> RunStatus | None:
        """The live plan, step states and spend (a query; ``None`` when no worker answers a
        running run). A finished run answers from its result."""
        try:
            return await self._handle.query("status", result_type=RunStatus)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise _translated(e, self.workflow_id) from e
        except Exception:
            pass  # no worker picked it up yet, or the query timed out
        if await self.temporal_status() != "completed":
            return None
        resp = await self.result()
        return RunStatus(
            workflow_id=self.workflow_id,
            phase="done",
            steps=resp.steps,
            spend=resp.spend,
            iterations=resp.iterations,
            model_label=resp.model_label,
            outcome=resp.outcome,
        )

    async def approve(self, step_id: str = "", *, reason: str = "", by: str = "") -> str:
        """Approve the step waiting for a human (default: the one waiting); ``"approved"``."""
        return await self._update("approve", Approval(approve=True, step_id=step_id, reason=reason, by=by))

    async def reject(self, step_id: str = "", *, reason: str = "", by: str = "") -> str:
        """Reject the waiting step: the run stops and compensates; ``"rejected"``."""
        return await self._update("approve", Approval(approve=False, step_id=step_id, reason=reason, by=by))

    async def cancel(self, reason: str = "cancelled by operator") -> str:
        """Stop the run: side effects are compensated newest first; ``"cancelling"``."""
        return await self._update("cancel", reason)

    async def watch(self, poll_seconds: float = POLL_SECONDS) -> AsyncIterator[RunStatus]:
        """Every new status snapshot until the run ends (the last one has ``phase == "done"``
        when a worker answered it)."""
        last: RunStatus | None = None
        while True:
            st = await self.status()
            if st is not None and st != last:
                last = st
                yield st
            if st is not None and st.phase == "done":
                return
            if await self.temporal_status() != "running":  # ended (or failed) meanwhile
                final = await self.status()
                if final is not None and final != last:
                    yield final
                return
            await asyncio.sleep(poll_seconds)

    async def events(self, poll_seconds: float = POLL_SECONDS) -> AsyncIterator[RunEvent]:
        """Changes as they happen: phases, step state changes, approvals awaited, the end."""
        phase, waiting = "", ""
        steps: dict[str, StepState] = {}
        last: RunStatus | None = None
        async for st in self.watch(poll_seconds):
            last = st
            base = {"workflow_id": self.workflow_id, "status": st}
            if st.phase != phase and st.phase != "done":
                phase = st.phase
                yield RunEvent(kind="phase", phase=phase, **base)
            for r in st.steps:
                if steps.get(r.id) != r.state:
                    steps[r.id] = r.state
                    yield RunEvent(kind="step", phase=st.phase, step=r, **base)
            if st.waiting_for and st.waiting_for != waiting:
                yield RunEvent(kind="waiting", phase=st.phase, waiting_for=st.waiting_for, **base)
            waiting = st.waiting_for
        if last is not None:
            yield RunEvent(kind="done", workflow_id=self.workflow_id, phase="done", status=last)

    async def _update(self, name: str, arg: Any) -> str:
        try:
            return await self._handle.execute_update(name, arg, result_type=str)
        except WorkflowUpdateFailedError as e:
            raise RefusedError(str(getattr(e.cause, "message", None) or e.cause)) from e
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND and "completed" in (e.message or ""):
                raise RefusedError(f"run {self.workflow_id!r} already finished") from e
            raise _translated(e, self.workflow_id) from e


class Client:
    """Starts and finds Keel runs. Build one with ``await Client.connect()``."""

    def __init__(self, temporal: TemporalClient, settings: Settings) -> None:
        self.temporal = temporal
        """The underlying Temporal client (for anything Keel does not wrap)."""
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> Client:
        """Connect to the Temporal service named by ``settings`` (default: the environment)."""
        settings = settings or load_settings()
        return cls(await connect(settings), settings)

    async def start(
        self,
        message: str | AgentRequest,
        *,
        tenant: str = "",
        user: str = "",
        agent: str = DEFAULT_AGENT,
        request_id: str = "",
        budget_usd: float = 1.0,
        permissions: tuple[str, ...] = (),
        session: str = "default",
        workspace: str = "default",
        model_policy: ModelPolicy | None = None,
        max_iterations: int | None = None,
        deadline_seconds: int | None = None,
        task_queue: str | None = None,
    ) -> Run:
        """Start a run of ``agent``; returns at once (``await run.result()`` to wait).

        ``tenant`` and ``user`` are required with a message: they come from the caller's
        authentication, and the policy decides what that user may do. ``message`` may be a
        whole ``AgentRequest`` instead (the keyword arguments are then ignored). Bad input
        raises pydantic's ``ValidationError`` before anything starts.
        """
        req = (
            message
            if isinstance(message, AgentRequest)
            else AgentRequest(
                tenant=tenant,
                user=user,
                agent=agent,
                message=message,
                request_id=request_id or f"r-{uuid.uuid4().hex[:10]}",
                session=session,
                workspace=workspace,
                permissions=tuple(permissions),
                max_budget_usd=budget_usd,
                model_policy=model_policy or ModelPolicy(),
                max_iterations=max_iterations,
                deadline_seconds=deadline_seconds,
            )
        )
        if not req.request_id:
            req = req.model_copy(update={"request_id": f"r-{uuid.uuid4().hex[:10]}"})
        try:
            handle, attached = await start_or_attach(
                self.temporal,
                req,
                task_queue=task_queue or self.settings.task_queue,
                # Temporal shows the summary in the UI and lists: redacted before it is cut.
                static_summary=f"{req.agent} · {req.tenant}/{req.user}: {redact(req.message)[:80]}",
            )
        except RequestIdConflict as e:
            raise RunExistsError(str(e)) from e
        except RPCError as e:
            raise _translated(e, workflow_id(req.tenant, req.agent, req.request_id)) from e
        return Run(handle, attached=attached)

    def run(self, workflow_id: str) -> Run:
        """A handle on an existing run (no call is made until it is used)."""
        return Run(self.temporal.get_workflow_handle(workflow_id, result_type=AgentResponse))

    def url(self, workflow_id: str) -> str:
        """The run's page in the Temporal Web UI."""
        from urllib.parse import quote

        s = self.settings
        return f"{s.ui_url}/namespaces/{s.temporal_namespace}/workflows/{quote(workflow_id, safe='')}"


def _translated(e: RPCError, wid: str) -> Exception:
    if e.status == RPCStatusCode.NOT_FOUND:
        return RunNotFoundError(f"no run {wid!r}")
    if e.status == RPCStatusCode.ALREADY_EXISTS:
        return RunExistsError(f"a run {wid!r} already exists (use a new request id)")
    return e
