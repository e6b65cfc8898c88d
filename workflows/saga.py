"""The saga: compensations of recorded effects, undone newest first when a run aborts."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keel.models import AgentRequest, StepState, ToolCall, ToolResult

from keel.workflows.holds import Holds
from keel.workflows.options import COMPENSATION_RETRY, COMPENSATION_TIMEOUT
from keel.workflows.state import RunState
from keel.workflows.stop import Stopper, cause

__all__ = ["Saga"]


class Saga:
    def __init__(self, state: RunState, stopper: Stopper, holds: Holds) -> None:
        self._state, self._stopper, self._holds = state, stopper, holds
        self.pending: list[tuple[str, str, dict[str, Any]]] = []
        """(step id, compensating tool, the effect's data), in the order the effects happened."""
        self.compensated: list[str] = []

    def push(self, step_id: str, compensation: str, effect: dict[str, Any]) -> None:
        self.pending.append((step_id, compensation, effect))

    async def rollback(self, req: AgentRequest) -> None:
        """Undo side effects newest first; each undo is idempotent and retried forever.

        Compensations are shielded from cancellation. One that fails permanently (a
        non-retryable error) is flagged and the rest still run: stopping half-way would leave
        more effects in place than one failed undo does.
        """
        st = self._state
        st.phase = "compensating"
        while self.pending:
            step_id, comp, effect = self.pending.pop()
            key = f"{st.wid}/{step_id}/compensate"
            rec = st.steps[step_id]
            try:
                await self._stopper.shielded(
                    workflow.start_activity(
                        "run_tool",
                        ToolCall(
                            tool=comp,
                            args={"effect": effect},
                            idempotency_key=key,
                            tenant=req.tenant,
                            user=req.user,
                            workflow_id=st.wid,
                            step_id=step_id,
                        ),
                        result_type=ToolResult,
                        start_to_close_timeout=COMPENSATION_TIMEOUT,
                        retry_policy=COMPENSATION_RETRY,
                        summary=f"compensate {step_id} with {comp}",
                    )
                )
            except ActivityError as e:
                st.flags.append("compensation_failed")
                st.put(rec.model_copy(update={"error": f"compensation {comp} failed: {cause(e)}"}))
                await self._holds.settle(
                    req,
                    step_id,
                    comp,
                    "",
                    None,
                    "failed",
                    f"{comp} could not undo {rec.tool}: {cause(e)}",
                    kind="compensation",
                )
                continue
            self.compensated.append(step_id)
            st.put(rec.model_copy(update={"state": StepState.COMPENSATED}))
            await self._holds.settle(
                req, step_id, comp, "", None, "compensated", f"{comp} undid {rec.tool}", kind="compensation"
            )
