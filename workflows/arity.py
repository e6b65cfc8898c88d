"""The workflow-side guard of ``AgentWorkflow``'s one argument.

``run`` validates its raw request itself, but a start with two or more arguments never
reaches it: the SDK drops ``run``'s type hints when the count does not match, decodes each
payload as plain JSON and calls ``run(a, b)``, whose ``TypeError`` fails the workflow task
again and again until the run times out. This interceptor refuses such a start first, as the
``InvalidRequest`` the workflow gives every other malformed request. (Payloads that are not
even JSON fail while the SDK decodes them, before any interceptor runs; those still loop.)
"""

from __future__ import annotations

from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.worker import ExecuteWorkflowInput, WorkflowInboundInterceptor

from keel.errors import INVALID_REQUEST

__all__ = ["OneRequest"]


class OneRequest(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        if len(input.args) > 1:
            raise ApplicationError(
                f"invalid request: expected one argument (the request), got {len(input.args)}",
                type=INVALID_REQUEST,
                non_retryable=True,
            )
        return await super().execute_workflow(input)
