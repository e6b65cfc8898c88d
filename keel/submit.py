"""Starting a run: the request id is an idempotency key for the request.

The workflow id is ``agent/<tenant>/<agent>/<request_id>`` (``keel.agents.workflow_id``).
Temporal is told never to start a second run under an id that was used
(``REJECT_DUPLICATE``) and to refuse a start while one runs (``FAIL``); the request's
fingerprint is kept in the run's memo. Starting again with the same id and the same request
attaches to the first run, running or closed, and returns its result, as an idempotent POST
does; a different request under that id is refused. So two runs can never share effect keys
or audit rows, which are derived from the workflow id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from keel.agents import workflow_id as scheme
from keel.errors import KeelError
from keel.models import AgentRequest, AgentResponse
from keel.search_attributes import AGENT as _AGENT
from keel.search_attributes import TENANT as _TENANT
from keel.search_attributes import USER as _USER

__all__ = ["WORKFLOW", "RequestIdConflict", "fingerprint", "start_or_attach", "workflow_id"]

WORKFLOW = "AgentWorkflow"
FINGERPRINT_MEMO = "keel_request"


class RequestIdConflict(KeelError):
    """The request id was used before for a different request."""


def workflow_id(req: AgentRequest) -> str:
    return scheme(req.tenant, req.agent, req.request_id)


_FINGERPRINT_FIELDS = (
    "tenant",
    "user",
    "agent",
    "request_id",
    "message",
    "session",
    "workspace",
    "permissions",
    "max_budget_usd",
    "model_policy",
    "max_iterations",
    "deadline_seconds",
)
"""What makes two requests the same request. An explicit list: a field added in a later
release (with its default) must not make a retry across the upgrade look like a new request."""


def fingerprint(req: AgentRequest) -> str:
    """Everything the caller asked for, canonically (permission order does not matter)."""
    fields = req.model_dump(mode="json", include=set(_FINGERPRINT_FIELDS))
    fields["permissions"] = sorted(set(fields["permissions"]))
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


async def start_or_attach(
    client: Client,
    req: AgentRequest,
    *,
    task_queue: str,
    static_summary: str = "",
    **start_options: Any,
) -> tuple[WorkflowHandle[Any, AgentResponse], bool]:
    """Start the run for ``req``, or attach to the run its request id already names.

    Returns the handle and whether it attached. Raises ``RequestIdConflict`` (nothing is
    started) when the id names a run of a different request.
    """
    if not req.request_id:
        raise ValueError("a request id is required to start a run")
    wid, mine = workflow_id(req), fingerprint(req)
    try:
        handle: WorkflowHandle[Any, AgentResponse] = await client.start_workflow(
            WORKFLOW,
            req,
            id=wid,
            task_queue=task_queue,
            result_type=AgentResponse,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            memo={FINGERPRINT_MEMO: mine},
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(_TENANT, req.tenant),
                    SearchAttributePair(_USER, req.user),
                    SearchAttributePair(_AGENT, req.agent),
                ]
            ),
            static_summary=static_summary or None,
            **start_options,
        )
        return handle, False
    except WorkflowAlreadyStartedError:
        pass
    handle = client.get_workflow_handle(wid, result_type=AgentResponse)
    desc = await handle.describe()
    theirs = await desc.memo_value(FINGERPRINT_MEMO, default=None)
    if theirs != mine:
        raise RequestIdConflict(
            f"request id {req.request_id!r} was already used for a different request "
            f"(run {wid}); use a new --request-id"
        )
    return handle, True
