"""Temporal activities over the budget ledger, run as LOCAL activities by the workflow.

Each is one round trip (a plpgsql call), so local activities are the right fit: no task-queue
hop, and retries stay inside the workflow task. Reserve, commit and release go through the
worker's ``LedgerBatcher``: the calls of all the workflows a worker runs at one moment share
one transaction (see ``activities/ledger_batch.py``), which is what lets one hot tenant go past
one WAL flush per operation.
Idempotency comes from the request key (``workflow_id/step_id``), so Temporal retrying a
call, or a new worker replaying history, gets the original answer back.

Ledger refusals (key reused with another payload, unknown reservation, commit after release)
are deterministic: they become non-retryable ``ApplicationError``s whose ``type`` is the
exception class name, so the workflow can branch on them instead of retrying forever.

Tool costs: the tool activity (not here) records its cost in the SAME transaction as its
effect (``activities/tools/execute.py``), so a crash cannot leave an effect without its cost
or a cost without its effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.activities import audit, ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import (
    AdmitRequest,
    AdmitResult,
    CommitRequest,
    CommitResult,
    LedgerError,
    ReleaseRequest,
    ReleaseResult,
    ReservationNotFound,
    ReserveRequest,
    ReserveResult,
)
from keel.models import Decision

__all__ = ["BudgetActivities"]

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class BudgetActivities:
    """Ledger activities bound to the worker's pool (register the bound methods)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        lease_holds: bool = True,
        ledger_pool: AsyncConnectionPool | None = None,
    ) -> None:
        """``ledger_pool``: the batcher's own small pool (``keel.db.open_ledger_pool``, what
        the worker passes: it keeps the hot path on warm connections); default ``pool``."""
        self._pool = pool
        self._batcher = LedgerBatcher(ledger_pool or pool, lease_holds=lease_holds)

    @activity.defn(name="budget_reserve")
    async def reserve(self, req: ReserveRequest) -> ReserveResult:
        """Hold budget before a model or tool call; DENY is a result, not an error."""
        res = await _refusals(self._batcher.reserve(req))
        await self._audit_observed([(req, res)])
        telemetry.record_budget_decision(
            res.decision.value, tenant=req.scopes[0].split("/")[0] if req.scopes else "", kind=req.kind
        )
        telemetry.annotate(
            decision=res.decision.value, kind=req.kind, subject=req.subject, amount_micros=req.amount_micros
        )
        return res

    @activity.defn(name="budget_commit")
    async def commit(self, req: CommitRequest) -> CommitResult:
        """Record a model call's actual cost (tools commit inside their own transaction)."""
        res = await _refusals(self._batcher.commit(req))
        if res.lost_hold and not res.replayed:
            activity.logger.warning(
                "budget hold %s was not found at commit (lost in a database crash, or a wrong key): "
                "%d micro-USD recorded as late spend on %s",
                req.key,
                res.committed_micros,
                ", ".join(req.scopes),
            )
        return res

    @activity.defn(name="budget_release")
    async def release(self, req: ReleaseRequest) -> ReleaseResult:
        """Give back a hold that will not be used (skipped step, cancel, compensation). A hold
        the workflow was granted can only be missing if the database lost it as a lease
        (``baseline/ledger.sql``, lost holds): then nothing is held, which is what a release wants."""
        return await _refusals(self._release(req))

    async def _release(self, req: ReleaseRequest) -> ReleaseResult:
        try:
            return await self._batcher.release(req)
        except ReservationNotFound:
            activity.logger.warning("budget hold %s was not found at release (lost as a lease)", req.key)
            return ReleaseResult(key=req.key, status="missing")

    @activity.defn(name="budget_admit")
    async def admit(self, req: AdmitRequest) -> AdmitResult:
        """Hold a whole plan, all or none, in one transaction: a run that cannot afford its
        plan stops before acting, and one that can is not starved halfway by its neighbours."""
        total = sum(h.amount_micros for h in req.holds)
        seen: list[tuple[ReserveRequest, ReserveResult]] = []
        async with self._pool.connection() as conn:
            with contextlib.suppress(_Refused):
                async with conn.transaction():
                    for hold in req.holds:
                        res = await _refusals(ledger.reserve(conn, hold))
                        seen.append((hold, res))
                        if res.decision == Decision.DENY:
                            refusal = res.reason
                            raise _Refused  # rolls back every hold placed so far
                await self._audit_observed(seen)
                return AdmitResult(admitted=True, amount_micros=total)
        await self._audit_observed(seen)  # what observe mode saw, even when the plan is refused
        telemetry.record_budget_decision("DENY", tenant=_tenant(req), kind="admission")
        return AdmitResult(admitted=False, amount_micros=total, reason=refusal)

    async def _audit_observed(self, pairs: list[tuple[ReserveRequest, ReserveResult]]) -> None:
        """One audit row per observe-mode would-be decision (issue 17); none otherwise."""
        rows = [
            e
            for req, res in pairs
            if (
                e := audit.observed_entry(
                    res,
                    tenant=req.scopes[0].split("/")[0] if req.scopes else "",
                    workflow_id=req.run_id,
                    step_id=req.step_id,
                    key=req.key,
                    subject=req.subject,
                    requested_micros=req.amount_micros,
                )
            )
            is not None
        ]
        if rows:
            async with self._pool.connection() as conn:
                await audit.append_many(conn, rows)


async def _refusals(call: Awaitable[_Out]) -> _Out:
    """Ledger refusals are deterministic: non-retryable, typed by the exception's class name."""
    try:
        return await call
    except LedgerError as e:
        raise ApplicationError(str(e), type=type(e).__name__, non_retryable=True) from e


class _Refused(Exception):
    """Internal: roll the admission's transaction back."""


def _tenant(req: AdmitRequest) -> str:
    return req.holds[0].scopes[0].split("/")[0] if req.holds and req.holds[0].scopes else ""
