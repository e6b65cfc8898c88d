"""Anomaly flags at the end of a run: baseline from PostgreSQL, verdict from the pure core.

``finish_run`` calls :func:`flag_run` once per run. It reads the p95 spend of the tenant's
latest runs of the same agent (``run_stats``), asks ``keel.anomaly.run_flags`` for the
flags, records the run in ``run_stats`` and, when something was flagged, appends an audit
row. A retried ``finish_run`` finds its row and returns the flags recorded the first time,
so the audit trail, the metrics and the response always agree.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import AsyncConnection

from keel import telemetry
from keel.activities import audit
from keel.agent_io import FinishInput
from keel.anomaly import AnomalyLimits, CallShape, RunShape, could_spike, run_flags
from keel.audit_models import AuditEntry

__all__ = ["flag_run", "queue_flag_run"]

_OWN_ROW = "select flags from run_stats where workflow_id = %s"

_INSERT = (
    "insert into run_stats (workflow_id, tenant, agent, outcome, spend_micros, iterations, "
    "tool_calls, failed_calls, flags) values (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
    "on conflict (workflow_id) do nothing returning workflow_id"
)

_QUIET = (
    "with ins as (" + _INSERT + ") "
    "select (select flags from run_stats where workflow_id = %s), exists (select 1 from ins)"
)
"""The row and the look at an earlier one in one statement: the sub-select reads the snapshot
the statement started with, so it sees a row an earlier attempt recorded, never this one."""

_BASELINE = """
select count(*), coalesce(percentile_cont(0.95) within group (order by spend_micros), 0)
from (select spend_micros from run_stats
      where tenant = %s and agent = %s and workflow_id <> %s
      order by finished_at desc limit %s) recent
"""


async def _recorded(conn: AsyncConnection[Any], wid: str) -> tuple[str, ...]:
    """The flags another attempt recorded for ``wid``."""
    again = await (await conn.execute(_OWN_ROW, (wid,))).fetchone()
    return tuple(again[0]) if again else ()


async def flag_run(conn: AsyncConnection[Any], inp: FinishInput, agent: str | None) -> tuple[str, ...]:
    """Flag, record and audit one finished run; returns the flag names."""
    async with conn.transaction():
        record = await queue_flag_run(conn, inp, agent)
        settle = await record()
    return await settle()


async def queue_flag_run(
    conn: AsyncConnection[Any], inp: FinishInput, agent: str | None
) -> Callable[[], Awaitable[Callable[[], Awaitable[tuple[str, ...]]]]]:
    """``flag_run`` in three stages inside the caller's transaction, so that in a pipeline
    each stage shares a round trip with the caller's statements:

    1. this call sends the two reads (the run's own row, the tenant's baseline);
    2. the function it returns reads them, decides the flags and sends the ``run_stats``
       row; only when there are flags does it wait for that row (the anomaly audit row is
       written only by the attempt that recorded the run) and send the audit row;
    3. the function *that* returns, called after the caller's commit, gives the flags that
       stand: these, or those of an attempt that recorded the run first.

    A run whose flags no baseline can change (no shape flag, and too little spend for a
    ``cost_spike``: every offline or tool-only run) skips the baseline: this call sends
    the ``run_stats`` row (with the look at an earlier attempt's, one statement) and stage
    2 reads nothing, so the caller's commit goes out in the same round trip (the flags are
    the same either way).
    """
    req = inp.request
    limits = AnomalyLimits.from_env(os.environ)
    calls = tuple(CallShape(tool=r.tool, args=r.args, state=r.state.value) for r in inp.executed)
    shape = RunShape(
        calls=calls,
        plan_sizes=inp.plan_sizes,
        iterations=inp.iterations,
        spend_micros=inp.spend_micros,
        thrash_repeats=inp.thrash_repeats,
        hatches=inp.flags,
    )
    row_args = (
        inp.workflow_id,
        req.tenant,
        agent,
        inp.outcome,
        inp.spend_micros,
        inp.iterations,
        sum(1 for c in calls if c.state in ("succeeded", "failed")),
        sum(1 for c in calls if c.state == "failed"),
    )
    if not could_spike(inp.spend_micros, limits) and not run_flags(shape, limits):
        # A run no baseline could flag (it spent too little for a cost spike, and its shape
        # raised nothing): the flags are known before any read, so the row goes out now and
        # the caller's commit shares this round trip; no baseline read, no audit row.
        quiet = await conn.execute(_QUIET, (*row_args, [], inp.workflow_id))

        async def queued() -> Callable[[], Awaitable[tuple[str, ...]]]:
            async def settled() -> tuple[str, ...]:
                row = await quiet.fetchone()
                existing, inserted = row if row else (None, False)
                if existing is not None:  # a retry: the flags recorded the first time stand
                    return tuple(existing)
                if not inserted:  # a concurrent attempt recorded it first
                    return await _recorded(conn, inp.workflow_id)
                return ()

            return settled

        return queued
    existing_cur = await conn.execute(_OWN_ROW, (inp.workflow_id,))
    baseline_cur = await conn.execute(_BASELINE, (req.tenant, agent, inp.workflow_id, limits.cost_window))

    async def record() -> Callable[[], Awaitable[tuple[str, ...]]]:
        existing = await existing_cur.fetchone()
        if existing is not None:
            stored = tuple(existing[0])

            async def recorded() -> tuple[str, ...]:
                return stored

            return recorded
        row = await baseline_cur.fetchone()
        runs, p95 = (int(row[0]), float(row[1])) if row else (0, 0.0)
        baseline = {"baseline_runs": runs, "baseline_p95_micros": p95}
        flags = run_flags(shape.model_copy(update=baseline), limits)
        names = [f.name for f in flags]
        inserting = await conn.execute(_INSERT, (*row_args, names))
        inserted = await inserting.fetchone() if flags else None
        if inserted is not None:
            await conn.execute(
                *audit.append_statement(
                    AuditEntry(
                        tenant=req.tenant,
                        user=req.user,
                        workflow_id=inp.workflow_id,
                        step_id="",
                        kind="run",
                        subject="anomaly",
                        decision="flagged",
                        reason="; ".join(f"{f.name}: {f.detail}" for f in flags)[:500],
                        data={"flags": names, "baseline_runs": runs, "baseline_p95_micros": round(p95)},
                        idem_key=f"{inp.workflow_id}/anomaly",
                    )
                ),
                prepare=True,
            )

        async def settle() -> tuple[str, ...]:
            ours = inserted if flags else await inserting.fetchone()
            if ours is None:  # a concurrent attempt recorded it first: its flags stand
                return await _recorded(conn, inp.workflow_id)
            telemetry.record_flags(names, tenant=req.tenant)
            return tuple(names)

        return settle

    return record
