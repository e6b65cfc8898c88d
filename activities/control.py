"""Per-step control-plane calls, run as local activities: one transaction, one round trip.

``authorize_step`` writes a denial or a human's approval/rejection to the audit log (an
allowed step's decision is written by the tool activity itself, together with its budget
reservation, before the effect — one round trip per controlled step). ``settle_step`` releases
or commits a reservation and audits the outcome. The tool activity itself commits the
reservation of a successful step together with its effect.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from keel.activities import audit, ledger
from keel.activities.guardrails import redact_data
from keel.activities.tools import effects
from keel.agent_io import SettleInput, SettleResult, StepGateInput, StepGateResult
from keel.audit_models import AuditEntry
from keel.budget import CommitRequest, ReleaseRequest, ReservationNotFound
from keel.codec import KeyRing
from keel.models import Decision

__all__ = ["ControlActivities"]


class ControlActivities:
    def __init__(self, pool: AsyncConnectionPool, keys: KeyRing | None = None) -> None:
        self._pool = pool
        self._keys = keys  # a fenced step's recorded effect is sealed under these

    @activity.defn(name="authorize_step")
    async def authorize_step(self, inp: StepGateInput) -> StepGateResult:
        entry = AuditEntry(
            tenant=inp.tenant,
            user=inp.user,
            workflow_id=inp.workflow_id,
            step_id=inp.step_id,
            kind=inp.kind,
            subject=inp.tool,
            decision=inp.decision or ("allow" if inp.allowed else "deny"),
            reason=inp.reason,
            data={"rule": inp.rule, "args": redact_data(inp.args), **redact_data(inp.detail)},
            idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}{inp.key_suffix}",
        )
        async with self._pool.connection() as conn:
            await audit.append_many(conn, [entry])
        return StepGateResult(decision=Decision.ALLOW if inp.allowed else Decision.DENY, reason=inp.reason)

    @activity.defn(name="settle_step")
    async def settle_step(self, inp: SettleInput) -> SettleResult:
        """Release or commit a step's hold and audit its end, in one transaction.

        With ``effect_key`` the step is about to be declared failed: the durable record decides.
        An effect recorded under the key means the step succeeded (its hold was committed with
        it); otherwise the key is fenced so no attempt still in flight can act later.
        """
        found = None
        async with self._pool.connection() as conn, conn.transaction():
            if inp.effect_key:
                found = await effects.fence(
                    conn, inp.effect_key, inp.subject, inp.tenant, inp.reason, self._keys
                )
            if inp.reserve_key and found is None:
                if inp.commit_micros is None:
                    await _release(conn, inp.reserve_key, inp.reason)
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
                        decision="succeeded" if found is not None else inp.decision,
                        reason=(
                            f"effect recorded under its key; the attempt's error came after it: {inp.reason}"
                            if found is not None
                            else inp.reason
                        )[:500],
                        data={},
                        idem_key=f"{inp.workflow_id}/{inp.step_id}/{inp.kind}-settle",
                    )
                ],
            )
        return SettleResult(recorded=found)


async def _release(conn: psycopg.AsyncConnection[Any], key: str, reason: str) -> None:
    """Release ``key``; a hold that does not exist (never placed, lost as a lease) is nothing
    held, not an error. A savepoint keeps the caller's transaction usable after the refusal."""
    try:
        async with conn.transaction():
            await ledger.release(conn, ReleaseRequest(key=key, reason=reason[:200]))
    except ReservationNotFound:
        return
