"""Budget holds of one run: the only place the workflow reserves, commits or releases money.

The workflow places model-call holds and marks the tool hold that ``run_tool`` places in
the effect's own transaction; every hold it knows to be open is released when the run
ends (``release_open``), whatever way it ends. ``settle`` records a step's end in the audit
log and releases that step's hold in the same local activity.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.agent_io import RunContext, SettleInput, SettleResult
    from keel.budget import (
        AdmitRequest,
        AdmitResult,
        CommitRequest,
        CommitResult,
        ReleaseRequest,
        ReserveRequest,
        ReserveResult,
    )
    from keel.models import AgentRequest, Decision

from keel.workflows.options import CONTROL_RETRY, CONTROL_TIMEOUT, FENCE_RETRY
from keel.workflows.state import RunState
from keel.workflows.stop import ACTIVITY_FAILURES, Abort, Stopper

__all__ = ["Holds"]


class Holds:
    def __init__(self, state: RunState, stopper: Stopper) -> None:
        self._state, self._stopper = state, stopper
        self.open: dict[str, tuple[tuple[str, ...], str]] = {}
        """Each open hold's key, with the scopes and kind a model hold's commit sends (see
        CommitRequest); tool holds are committed by the tool activity."""

    async def reserve(
        self,
        req: AgentRequest,
        ctx: RunContext,
        key: str,
        *,
        kind: str,
        subject: str,
        tier: str,
        amount: int,
        min_amount: int,
        max_tokens: int,
    ) -> ReserveResult:
        res: ReserveResult = await self._stopper.shielded(
            workflow.start_local_activity(
                "budget_reserve",
                ReserveRequest(
                    key=key,
                    scopes=ctx.scopes,
                    amount_micros=amount,
                    min_micros=min(min_amount, amount),
                    max_tokens=max_tokens,
                    kind=kind,
                    subject=subject,
                    run_id=self._state.wid,
                    step_id=key.rsplit("/", 1)[1],
                    tier=tier,
                ),
                result_type=ReserveResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"reserve {kind} {subject}",
            )
        )
        if res.decision == Decision.DENY:
            raise Abort("budget_exhausted", f"budget denied {kind} call: {res.reason}", "budget_denied")
        self.open[key] = (ctx.scopes, kind)
        return res

    async def admit(self, ctx: RunContext, holds: tuple[ReserveRequest, ...]) -> None:
        """Hold a whole plan before its first side effect (all or none); refuse it otherwise.

        The holds are the very requests the tool activity places again before each effect,
        so those are replays of these. Holds of steps that never run are released at the end.
        """
        res: AdmitResult = await self._stopper.shielded(
            workflow.start_local_activity(
                "budget_admit",
                AdmitRequest(holds=holds),
                result_type=AdmitResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"admit plan ({len(holds)} steps)",
            )
        )
        if not res.admitted:
            raise Abort(
                "budget_exhausted",
                f"budget refused the plan at admission (it needs ${_usd(res.amount_micros)}): {res.reason}",
                "admission_refused",
            )
        for h in holds:
            self.open[h.key] = ((), "tool")

    def placed_by_tool(self, key: str) -> None:
        """The tool activity places this hold; until it answers, the run treats it as open."""
        self.open[key] = ((), "tool")

    def closed(self, key: str) -> None:
        """The hold was committed or released by the activity that answered."""
        self.open.pop(key, None)

    async def commit(self, key: str, actual: int) -> CommitResult:
        scopes, kind = self.open.get(key, ((), "model"))
        res: CommitResult = await self._stopper.shielded(
            workflow.start_local_activity(
                "budget_commit",
                CommitRequest(key=key, actual_micros=actual, scopes=scopes, kind=kind),
                result_type=CommitResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary="commit",
            )
        )
        self.open.pop(key, None)
        return res

    async def release(self, key: str) -> None:
        await self._stopper.shielded(
            workflow.start_local_activity(
                "budget_release",
                ReleaseRequest(key=key, reason="run ended before use"),
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary="release",
            )
        )
        self.open.pop(key, None)

    async def release_open(self) -> None:
        """Release every hold still open. One that cannot be released (the ledger out of
        retries) is flagged and left to its lease; the others are still released."""
        for key in sorted(self.open):
            try:
                await self.release(key)
            except ACTIVITY_FAILURES:
                self._state.flags.append("release_failed")
        self.open.clear()

    async def settle(
        self,
        req: AgentRequest,
        step_id: str,
        subject: str,
        reserve_key: str,
        commit: int | None,
        decision: str,
        reason: str,
        kind: str = "tool",
        effect_key: str = "",
    ) -> SettleResult:
        res: SettleResult = await self._stopper.shielded(
            workflow.start_local_activity(
                "settle_step",
                SettleInput(
                    workflow_id=self._state.wid,
                    tenant=req.tenant,
                    user=req.user,
                    step_id=step_id,
                    subject=subject,
                    reserve_key=reserve_key,
                    commit_micros=commit,
                    kind=kind,
                    decision=decision,
                    reason=reason,
                    effect_key=effect_key,
                ),
                result_type=SettleResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                # A fenced settle is what decides the step: ending the run without its answer
                # would leave the step undecided and the key open to an attempt in flight.
                retry_policy=FENCE_RETRY if effect_key else CONTROL_RETRY,
                summary=f"settle {subject} ({decision})",
            )
        )
        if reserve_key:
            self.open.pop(reserve_key, None)
        return res


def _usd(micros: int) -> str:
    """Exact USD, at least cents: a plan of tool calls costs fractions of a cent, and
    ``$0.00`` told an operator the plan was free."""
    return f"{micros // 1_000_000}.{f'{micros % 1_000_000:06d}'.rstrip('0').ljust(2, '0')}"
