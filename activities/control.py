"""Per-step control-plane calls, run as local activities: one transaction, one round trip.

``authorize_step`` writes the permission decision to the audit log and, when the step is
allowed, reserves its budget in the same transaction, so "a decision without its audit row"
cannot happen and the step pays one database round trip for both. ``settle_step`` releases
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
from keel.budget import CommitRequest, ReleaseRequest, ReserveRequest
from keel.models import Decision

__all__ = ["ControlActivities"]


class ControlActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="authorize_step")
    async def authorize_step(self, inp: StepGateInput) -> StepGateResult:
        entry = AuditEntry(
            tenant=inp.tenant, user=inp.user, workflow_id=inp.workflow_id, step_id=inp.step_id,
            kind=inp.kind, subject=inp.tool, decision="allow" if inp.allowed else "deny",
            reason=inp.reason, data={"rule": inp.rule, "args": redact_data(inp.args)},
            idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}")
        async with self._pool.connection() as conn, conn.transaction():
            await audit.append_many(conn, [entry])
            if not inp.allowed or not inp.reserve_key:
                return StepGateResult(decision=Decision.ALLOW if inp.allowed else Decision.DENY,
                                      reason=inp.reason)
            res = await ledger.reserve(conn, ReserveRequest(
                key=inp.reserve_key, scopes=inp.scopes, amount_micros=inp.amount_micros,
                min_micros=inp.amount_micros, kind="tool", subject=inp.tool,
                run_id=inp.workflow_id, step_id=inp.step_id))
            if res.decision != Decision.ALLOW:
                await audit.append_many(conn, [AuditEntry(
                    tenant=inp.tenant, user=inp.user, workflow_id=inp.workflow_id,
                    step_id=inp.step_id, kind="budget", subject=inp.tool,
                    decision=res.decision.value, reason=res.reason,
                    data={"granted_micros": res.granted_micros},
                    idem_key=f"{inp.workflow_id}/{inp.step_id}/budget")])
        return StepGateResult(decision=res.decision, granted_micros=res.granted_micros,
                              caps=res.caps, reason=res.reason, observed=res.observed)

    @activity.defn(name="settle_step")
    async def settle_step(self, inp: SettleInput) -> SettleResult:
        async with self._pool.connection() as conn, conn.transaction():
            if inp.reserve_key:
                if inp.commit_micros is None:
                    await ledger.release(conn, ReleaseRequest(key=inp.reserve_key,
                                                              reason=inp.reason[:200]))
                else:
                    await ledger.commit(conn, CommitRequest(key=inp.reserve_key,
                                                            actual_micros=inp.commit_micros))
            await audit.append_many(conn, [AuditEntry(
                tenant=inp.tenant, user=inp.user, workflow_id=inp.workflow_id,
                step_id=inp.step_id, kind=inp.kind, subject=inp.subject, decision=inp.decision,
                reason=inp.reason, data={}, idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}-settle")])
        return SettleResult()
