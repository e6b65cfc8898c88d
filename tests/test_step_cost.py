"""The lean controlled step (issue 23): ``run_tool`` with the workflow's allow decision does
in two transactions what took four, and every promise of the longer path still holds.

Each test is a way the shortcut could cut a corner: a replayed or reused key that now
writes an audit row or a hold before it finds the record; a fenced key that leaves a hold
behind; a half-open breaker whose probe claim is rolled back with the tool's failure (and so
never re-opens); a budget refusal that leaves the effect transaction open on the pooled
connection. Each also checks the count that issue 23 is about: the transactions the database
committed for the call.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import audit, breaker, ledger
from keel.activities.tools import ToolActivities, effects, registry
from keel.activities.tools.registry import REGISTRY, ToolContext, ToolError, tool
from keel.db import open_pool
from keel.models import StepGate, ToolCall


class _Args(BaseModel):
    n: int = 0


@contextlib.contextmanager
def _registered(name: str, fn: Any) -> Iterator[None]:
    tool(name, description=f"test tool {name}", args=_Args)(fn)
    try:
        yield
    finally:
        REGISTRY.pop(name, None)
        registry._HIDDEN.discard(name)


@pytest.fixture
async def one_conn(pg_url: str) -> AsyncIterator[AsyncConnectionPool]:
    """A pool of ONE connection: every statement of a call runs on the backend whose commits
    ``_commits`` counts, and a transaction left open would be the next call's problem."""
    pool = await open_pool(pg_url, min_size=1, max_size=1)
    try:
        yield pool
    finally:
        await pool.close()


async def _commits(pool: AsyncConnectionPool) -> int:
    """Transactions the database has committed up to and including this call's first
    statement: it makes the backend flush its own statistics before it reads the next one
    (so no waiting for the collector; the read's own commit is counted by the next call)."""
    async with pool.connection() as conn:
        await conn.execute("select pg_stat_force_next_flush()")
        row = await (
            await conn.execute("select xact_commit from pg_stat_database where datname = current_database()")
        ).fetchone()
    assert row is not None
    return int(row[0])


def _call(name: str, wid: str, step: str, *, key: str = "", amount: int = 1000, n: int = 1) -> ToolCall:
    return ToolCall(
        tool=name,
        args={"n": n},
        idempotency_key=key or f"{wid}/{step}",
        tenant="stepcost",
        user="u",
        workflow_id=wid,
        step_id=step,
        reservation_key=f"{wid}/{step}/reserve",
        gate=StepGate(
            rule="allow_test",
            reason="allowed by the test policy",
            scopes=("stepcost", f"stepcost/run:{wid}"),
            amount_micros=amount,
        ),
    )


async def _trail(pool: AsyncConnectionPool, wid: str) -> list[tuple[str, str, str]]:
    async with pool.connection() as conn:
        return [(r.step_id, r.kind, r.decision) for r in await audit.trail(conn, wid)]


async def _hold(pool: AsyncConnectionPool, key: str) -> tuple[str, int] | None:
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "select status, amount_micros from keel_budget_reservations where key = %s", (key,)
            )
        ).fetchone()
    return (row[0], row[1]) if row else None


async def _effect_count(pool: AsyncConnectionPool, key: str) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute("select count(*) from tool_effects where idempotency_key = %s", (key,))
        ).fetchone()
    return int(row[0]) if row else 0


async def test_a_step_is_two_transactions_and_a_replay_writes_nothing(one_conn: AsyncConnectionPool) -> None:
    name = f"sc_{uuid.uuid4().hex[:6]}"
    runs: list[int] = []

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        runs.append(a.n)
        return {"n": a.n}

    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    env, run = ActivityEnvironment(), ToolActivities(one_conn).run_tool
    with _registered(name, act):
        await env.run(run, _call(name, wid, "s0"))  # warm: statements prepared, rows exist
        # The count is database-wide: another session (autovacuum) can only add to it, so
        # the smallest of three readings is exact. What reading costs by itself, then the
        # same around one step.
        idle, step = [], []
        for i in (1, 2, 3):
            a, b = await _commits(one_conn), await _commits(one_conn)
            await env.run(run, _call(name, wid, f"w{i}"))
            c = await _commits(one_conn)
            idle.append(b - a)
            step.append(c - b)
        assert min(step) - min(idle) == 2  # it was 4 before issue 23
        first = await env.run(run, _call(name, wid, "s1"))
        ran = len(runs)
        assert first.ok and not first.replayed and first.data == {"n": 1}
        trail = await _trail(one_conn, wid)
        hold = await _hold(one_conn, f"{wid}/s1/reserve")
        assert ("s1", "permission", "allow") in trail
        assert hold is not None and hold[0] == "committed"  # with the effect, same transaction

        # A retry of the same key (the worker died before reporting): the recorded effect,
        # the tool not run again, and nothing written: same trail, same ledger row.
        again = await env.run(run, _call(name, wid, "s1"))
        assert again.replayed and again.data == first.data and len(runs) == ran
        assert await _trail(one_conn, wid) == trail
        assert await _hold(one_conn, f"{wid}/s1/reserve") == hold

        # A later run reusing that effect (``reuse_effects``: its own step, the earlier key):
        # answered from the record without an audit row or a hold of its own.
        wid2 = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
        reused = await env.run(run, _call(name, wid2, "s1", key=f"{wid}/s1"))
        assert reused.replayed and reused.data == first.data and len(runs) == ran
        assert await _trail(one_conn, wid2) == []
        assert await _hold(one_conn, f"{wid2}/s1/reserve") is None


async def test_a_fenced_key_refuses_before_any_hold(one_conn: AsyncConnectionPool) -> None:
    name = f"sc_{uuid.uuid4().hex[:6]}"
    runs: list[int] = []

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        runs.append(a.n)
        return {"n": a.n}

    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    async with one_conn.connection() as conn, conn.transaction():
        assert await effects.fence(conn, f"{wid}/s1", name, "stepcost", "the run gave up") is None
    env, run = ActivityEnvironment(), ToolActivities(one_conn).run_tool
    with _registered(name, act):
        with pytest.raises(ApplicationError) as late:
            await env.run(run, _call(name, wid, "s1"))
    assert late.value.type == "StepAbandoned" and late.value.non_retryable
    assert runs == []
    assert await _hold(one_conn, f"{wid}/s1/reserve") is None  # no hold left for nobody
    assert await _trail(one_conn, wid) == []


async def test_a_half_open_breaker_keeps_its_probe_claim_when_the_tool_fails(
    one_conn: AsyncConnectionPool,
) -> None:
    name = f"sc_{uuid.uuid4().hex[:6]}"
    scope = f"tool:{name}"
    down = [True]

    async def flaky(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        if down[0]:
            raise ToolError("upstream 503", retryable=True)
        return {"n": a.n}

    async def cooled_down() -> None:
        async with one_conn.connection() as conn:
            await conn.execute(
                "insert into circuit_breakers (scope, state, consecutive_failures, opened_until) "
                "values (%s, 'open', 5, now() - interval '1 second') on conflict (scope) do update "
                "set state = 'open', opened_until = now() - interval '1 second', "
                "probe_owner = null, probe_lease_until = null",
                (scope,),
            )

    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    env, run = ActivityEnvironment(), ToolActivities(one_conn).run_tool
    with _registered(name, flaky):
        await cooled_down()
        with pytest.raises(ApplicationError) as failed:
            await env.run(run, _call(name, wid, "s1"))
        assert failed.value.type == "ToolTransientError"
        async with one_conn.connection() as conn:
            moves = [(e.from_state, e.to_state) for e in reversed(await breaker.events(conn, scope))]
        # The probe was claimed and its failure re-opened the breaker: both committed,
        # although the tool's transaction rolled back.
        assert moves == [("open", "half_open"), ("half_open", "open")]
        # The decision and the hold were committed before the tool ran (the workflow's
        # settle_step releases the hold); no effect was recorded.
        assert ("s1", "permission", "allow") in await _trail(one_conn, wid)
        assert await _hold(one_conn, f"{wid}/s1/reserve") == ("held", 1000)
        assert await _effect_count(one_conn, f"{wid}/s1") == 0

        down[0] = False
        await cooled_down()
        ok = await env.run(run, _call(name, wid, "s2"))
        assert ok.ok and ok.data == {"n": 1}
        async with one_conn.connection() as conn:
            row = await (
                await conn.execute("select state from circuit_breakers where scope = %s", (scope,))
            ).fetchone()
        assert row is not None and row[0] == "closed"  # the probe's success closed it
        hold = await _hold(one_conn, f"{wid}/s2/reserve")
        assert hold is not None and hold[0] == "committed"


async def test_a_budget_refusal_runs_nothing_and_leaves_the_connection_clean(
    one_conn: AsyncConnectionPool, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"sc_{uuid.uuid4().hex[:6]}"
    runs: list[int] = []

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        runs.append(a.n)
        return {"n": a.n}

    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    async with one_conn.connection() as conn:
        await ledger.set_limit(conn, f"stepcost/run:{wid}", 500)
    env, run = ActivityEnvironment(), ToolActivities(one_conn).run_tool
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    with _registered(name, act):
        refused = await env.run(run, _call(name, wid, "s1", amount=1000))
        assert refused.refused == "budget" and not refused.ok
        assert runs == []
        assert await _effect_count(one_conn, f"{wid}/s1") == 0
        assert ("s1", "budget", "deny") in await _trail(one_conn, wid)
        assert await _hold(one_conn, f"{wid}/s1/reserve") == ("denied", 0)
        # The refused step's effect transaction (begun in the same round trip as the
        # reservation) was ended by the activity itself: the pool had nothing to roll back,
        # and another session can take the key's lock at once.
        assert not [r for r in caplog.records if r.name.startswith("psycopg.pool")]
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
            got = await (
                await other.execute("select pg_try_advisory_lock(hashtextextended(%s, 7))", (f"{wid}/s1",))
            ).fetchone()
        assert got is not None and got[0] is True
        ok = await env.run(run, _call(name, wid, "s2", amount=100))  # within budget: it runs
        assert ok.ok and runs == [1]


async def test_a_tool_that_commits_on_its_own_fails_loudly_and_is_not_recorded(
    one_conn: AsyncConnectionPool,
) -> None:
    """The effect transaction is begun by hand, so psycopg no longer refuses a tool's own
    ``commit()``; the activity does: no record, no ledger commit, no retry."""
    name = f"sc_{uuid.uuid4().hex[:6]}"

    async def rogue(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        await ctx.conn.commit()
        return {"n": a.n}

    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    env, run = ActivityEnvironment(), ToolActivities(one_conn).run_tool
    with _registered(name, rogue):
        with pytest.raises(ApplicationError) as ended:
            await env.run(run, _call(name, wid, "s1"))
    assert ended.value.type == "ToolEndedTransaction" and ended.value.non_retryable
    assert await _effect_count(one_conn, f"{wid}/s1") == 0
    assert await _hold(one_conn, f"{wid}/s1/reserve") == ("held", 1000)  # settle_step releases it


async def test_the_effect_transaction_commits_durably(one_conn: AsyncConnectionPool) -> None:
    """The decision and the hold commit without waiting for their WAL flush (a ``SET LOCAL``
    of their own transaction); the effect's transaction, chained to it on the same
    connection, must not inherit that: its commit is what makes the effect durable."""
    name = f"sc_{uuid.uuid4().hex[:6]}"

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        row = await (await ctx.conn.execute("select current_setting('synchronous_commit')")).fetchone()
        assert row is not None
        return {"sync": row[0]}

    async with one_conn.connection() as conn:
        row = await (await conn.execute("select current_setting('synchronous_commit')")).fetchone()
    assert row is not None and row[0] != "off"
    wid = f"agent/stepcost/{uuid.uuid4().hex[:8]}"
    with _registered(name, act):
        out = await ActivityEnvironment().run(ToolActivities(one_conn).run_tool, _call(name, wid, "s1"))
    assert out.ok and out.data == {"sync": row[0]}
