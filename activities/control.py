"""Per-step control-plane calls, run as local activities: one transaction, one round trip.

``authorize_step`` writes a denial or a human's approval/rejection to the audit log (an
allowed step's decision is written by the tool activity itself, together with its budget
reservation, before the effect — one round trip per controlled step). ``settle_step`` releases
or commits a reservation and audits the outcome. The tool activity itself commits the
reservation of a successful step together with its effect.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from activities import audit, ledger
from activities.guardrails import redact_data
from keel.agent_io import SettleInput, SettleResult, StepGateInput, StepGateResult
from keel.audit_models import AuditEntry
from keel.budget import CommitRequest, ReleaseRequest
from keel.models import Decision

__all__ = ["ControlActivities"]


class ControlActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="authorize_step")
    async def authorize_step(self, inp: StepGateInput) -> StepGateResult:
        entry = AuditEntry(
            tenant=inp.tenant,
            user=inp.user,
            workflow_id=inp.workflow_id,
            step_id=inp.step_id,
            kind=inp.kind,
            subject=inp.tool,
            decision="allow" if inp.allowed else "deny",
            reason=inp.reason,
            data={"rule": inp.rule, "args": redact_data(inp.args)},
            idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}",
        )
        async with self._pool.connection() as conn:
            await audit.append_many(conn, [entry])
        return StepGateResult(decision=Decision.ALLOW if inp.allowed else Decision.DENY, reason=inp.reason)

    @activity.defn(name="settle_step")
    async def settle_step(self, inp: SettleInput) -> SettleResult:
        async with self._pool.connection() as conn, conn.transaction():
            if inp.reserve_key:
                if inp.commit_micros is None:
                    await ledger.release(conn, ReleaseRequest(key=inp.reserve_key, reason=inp.reason[:200]))
                else:
                    await ledger.commit(
                        conn, CommitRequest(key=inp.reserve_key, actual_micros=inp.commit_micros)
                    )
            await audit.append_many(
                conn,
                [
                    AuditEntry(
                        tenant=inp.tenant,
                        user=inp.user,
                        workflow_id=inp.workflow_id,
                        step_id=inp.step_id,
                        kind=inp.kind,
                        subject=inp.subject,
                        decision=inp.decision,
                        reason=inp.reason,
                        data={},
                        idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}-settle",
                    )
                ],
            )
        return SettleResult()
