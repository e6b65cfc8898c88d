"""Attacks on run_tool's fused SQL (migration 015: ``keel_tool_step_open``,
``keel_tool_effect_lock``; ``_open_step``'s ``COMMIT AND CHAIN``; the effect record and the
ledger commit in one CTE statement).

What must hold: the permission row and the hold are committed before the tool runs, and the
tenant's audit head and budget rows are NOT locked while it runs (a slow tool of one run
must not stall another run of the same tenant); attempts racing on one key act once; a
ledger refusal inside ``keel_tool_step_open`` takes its audit row with it; and ``keel_app``
calling the functions by hand with NULL, extreme or hostile values gets nothing it could
not get statement by statement (no credit, no hold without an amount, no injected SQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio.testing import ActivityEnvironment

from keel.activities.tools import ToolActivities, registry
from keel.activities.tools.registry import REGISTRY, ToolContext, tool
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
async def pool(pg_url: str) -> AsyncIterator[AsyncConnectionPool]:
    p = await open_pool(pg_url, min_size=2, max_size=8)
    try:
        yield p
    finally:
        await p.close()


def _call(tenant: str, name: str, wid: str, step: str, *, key: str = "", amount: int = 1000) -> ToolCall:
    return ToolCall(
        tool=name,
        args={"n": 1},
        idempotency_key=key or f"{wid}/{step}",
        tenant=tenant,
        user="u",
        workflow_id=wid,
        step_id=step,
        reservation_key=f"{wid}/{step}/reserve",
        gate=StepGate(
            rule="allow_test",
            reason="allowed by the test policy",
            scopes=(tenant, f"{tenant}/run:{wid}"),
            amount_micros=amount,
        ),
    )


async def test_a_slow_tool_does_not_stall_another_run_of_the_same_tenant(pool: AsyncConnectionPool) -> None:
    """While run A's tool runs (inside the effect's transaction), run B of the same tenant,
    on the same tenant scope, must get its permission row and its hold and finish its step:
    A's decision transaction has committed, so neither the tenant's audit head nor the
    tenant's budget row is locked by A. (Were the decision and the effect one transaction,
    B would wait for A's tool.)"""
    tenant = f"slow{uuid.uuid4().hex[:6]}"
    slow, fast = f"sl_{uuid.uuid4().hex[:6]}", f"fa_{uuid.uuid4().hex[:6]}"
    inside, release = asyncio.Event(), asyncio.Event()

    async def sleeper(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        inside.set()
        await asyncio.wait_for(release.wait(), timeout=30)
        return {"slow": True}

    async def quick(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        return {"fast": True}

    env_a, env_b = ActivityEnvironment(), ActivityEnvironment()
    acts = ToolActivities(pool)
    wid_a, wid_b = f"agent/{tenant}/a{uuid.uuid4().hex[:6]}", f"agent/{tenant}/b{uuid.uuid4().hex[:6]}"
    with _registered(slow, sleeper), _registered(fast, quick):
        a = asyncio.ensure_future(env_a.run(acts.run_tool, _call(tenant, slow, wid_a, "s1")))
        try:
            await asyncio.wait_for(inside.wait(), timeout=15)
            # A is inside its tool now. B: the same tenant, the same tenant scope.
            b = await asyncio.wait_for(env_b.run(acts.run_tool, _call(tenant, fast, wid_b, "s1")), timeout=8)
            assert b.ok and b.data == {"fast": True}
            assert not a.done()  # B finished while A's tool was still running
            # And a bare append / reserve of the tenant does not wait either.
            async with await psycopg.AsyncConnection.connect(pool.conninfo, autocommit=True) as c:
                await c.execute("set lock_timeout = '3s'")
                await c.execute(
                    "select * from keel_audit_append(%s, 'u', 'w', 's', 'run', '', 'allow', '', '{}', %s)",
                    (tenant, f"{tenant}/probe"),
                )
        finally:
            release.set()
            out = await asyncio.wait_for(a, timeout=15)
    assert out.ok and out.data == {"slow": True}
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select workflow_id, decision from audit_log "
                "where tenant=%s and kind='permission' order by seq",
                (tenant,),
            )
        ).fetchall()
        holds = await (
            await conn.execute(
                "select key, status from keel_budget_reservations where run_id in (%s, %s) order by key",
                (wid_a, wid_b),
            )
        ).fetchall()
    # A's permission row was committed before B's (it was durable before A's tool ran).
    assert rows == [(wid_a, "allow"), (wid_b, "allow")], rows
    assert holds == [(f"{wid_a}/s1/reserve", "committed"), (f"{wid_b}/s1/reserve", "committed")], holds


async def test_racing_attempts_on_one_key_act_once_and_book_once(pool: AsyncConnectionPool) -> None:
    """Six attempts of one step at once (a retry racing a worker thought dead, many times
    over): the tool runs once, every attempt answers its result, one permission row, one
    hold committed once, and the run's scope spent the step's cost exactly once."""
    tenant = f"race{uuid.uuid4().hex[:6]}"
    name = f"rc_{uuid.uuid4().hex[:6]}"
    ran: list[int] = []

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        ran.append(1)
        await ctx.conn.execute("select pg_sleep(0.3)")
        return {"n": len(ran)}

    wid = f"agent/{tenant}/{uuid.uuid4().hex[:8]}"
    acts = ToolActivities(pool)
    with _registered(name, act):
        outs = await asyncio.gather(
            *(ActivityEnvironment().run(acts.run_tool, _call(tenant, name, wid, "s1")) for _ in range(6))
        )
    assert len(ran) == 1, ran
    assert all(o.ok and o.data == {"n": 1} for o in outs), outs
    assert sum(not o.replayed for o in outs) == 1
    async with pool.connection() as conn:
        perms = await (
            await conn.execute(
                "select count(*) from audit_log where workflow_id=%s and kind='permission'", (wid,)
            )
        ).fetchone()
        effects = await (
            await conn.execute("select count(*) from tool_effects where idempotency_key=%s", (f"{wid}/s1",))
        ).fetchone()
        holds = await (
            await conn.execute("select status from keel_budget_reservations where run_id=%s", (wid,))
        ).fetchall()
    assert perms == (1,) and effects == (1,) and holds == [("committed",)], (perms, effects, holds)


# -- keel_app calling migration 015's functions by hand ---------------------------------------

_OPEN = (
    "select * from keel_tool_step_open(%(key)s, %(scope)s, %(tenant)s, %(user)s, %(wid)s, %(step)s, "
    "%(kind)s, %(subject)s, %(decision)s, %(reason)s, %(data)s::jsonb, %(idem)s, %(res_key)s, "
    "%(scopes)s::text[], %(amount)s::bigint, %(min)s::bigint, %(max_tokens)s::int, %(ttl)s::int, "
    "%(res_kind)s, %(res_subject)s, %(run_id)s, %(res_step)s, %(tier)s, %(hash)s)"
)


def _args(t: str, /, **over: Any) -> dict[str, Any]:
    tenant, tag = t, uuid.uuid4().hex[:8]
    base: dict[str, Any] = dict(
        key=f"agent/{tenant}/{tag}/s1",
        scope="tool:echo",
        tenant=tenant,
        user="mallory",
        wid=f"agent/{tenant}/{tag}",
        step="s1",
        kind="permission",
        subject="echo",
        decision="allow",
        reason="forged",
        data="{}",
        idem=f"agent/{tenant}/{tag}/s1/permission",
        res_key=f"agent/{tenant}/{tag}/s1/reserve",
        scopes=[tenant],
        amount=1000,
        min=0,
        max_tokens=None,
        ttl=600,
        res_kind="tool",
        res_subject="echo",
        run_id=f"agent/{tenant}/{tag}",
        res_step="s1",
        tier="",
        hash="h",
    )
    base.update(over)
    return base


def _rows(conn: psycopg.Connection[Any], a: dict[str, Any]) -> tuple[int, int]:
    (n_audit,) = conn.execute(
        "select count(*) from audit_log where idem_key=%s", (a["idem"],)
    ).fetchone() or (0,)
    (n_hold,) = conn.execute(
        "select count(*) from keel_budget_reservations where key=%s", (a["res_key"],)
    ).fetchone() or (0,)
    return int(n_audit), int(n_hold)


@pytest.mark.parametrize(
    "over",
    [
        {"amount": -5_000_000},  # a negative hold would be a credit on commit
        {"min": -1},
        {"min": 2000},  # min above the amount
        {"ttl": 0},
        {"ttl": -1},
        {"amount": None},  # NULL slips past `p_amount < 0`
        {"ttl": None},
        {"res_key": None},
        {"tenant": None},
        {"tier": None},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_keel_app_cannot_place_a_bogus_hold_and_the_refusal_takes_the_audit_row_along(
    over: dict[str, Any], pg_url: str
) -> None:
    """A refused reservation raises inside ``keel_tool_step_open``, and the permission row the
    function appended just before is rolled back with it: a decision row never stands for a
    hold the ledger refused, and no hold without an amount, a floor or a lease exists."""
    tenant = f"abuse{uuid.uuid4().hex[:6]}"
    a = _args(tenant, **over)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            with conn.transaction():
                conn.execute(_OPEN, a)
        assert _rows(conn, a) == (0, 0)


def test_keel_app_cannot_overflow_the_ledger_with_an_extreme_amount(pg_url: str, owner_pg_url: str) -> None:
    """The largest bigint against a scope with a limit: denied (or an error), never a hold
    that wraps the scope's reserved sum negative."""
    tenant = f"big{uuid.uuid4().hex[:6]}"
    with psycopg.connect(owner_pg_url, autocommit=True) as owner:
        owner.execute("insert into keel_budget_scopes (scope, limit_micros) values (%s, 1000000)", (tenant,))
    a = _args(tenant, amount=2**63 - 1, min=2**63 - 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        try:
            with conn.transaction():
                row = conn.execute(_OPEN, a).fetchone()
        except psycopg.Error:
            row = None
        if row is not None:
            assert row[6]["decision"] == "DENY", row
        (reserved,) = conn.execute(
            "select reserved_micros from keel_budget_scopes where scope=%s", (tenant,)
        ).fetchone() or (None,)
        assert reserved is not None and 0 <= reserved <= 1_000_000, reserved
        held = conn.execute(
            "select count(*) from keel_budget_reservations where key=%s and status='held'", (a["res_key"],)
        ).fetchone()
        assert held == (0,)


def test_hostile_text_in_every_argument_is_data_not_sql(pg_url: str) -> None:
    """Quotes, a statement terminator and a comment in each text argument are stored as
    written (the functions build no SQL from their arguments) and the tables survive."""
    tenant = f"inj{uuid.uuid4().hex[:6]}"
    evil = "x'); drop table tool_effects; --"
    a = _args(
        tenant,
        scope=f"tool:{evil}",
        subject=evil,
        reason=evil,
        data='{"args": "\\"); drop table audit_log; --"}',
        res_subject=evil,
        hash=evil,
        key=f"agent/{tenant}/k'; delete from tool_effects; --",
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with conn.transaction():
            row = conn.execute(_OPEN, a).fetchone()
            assert row is not None and row[0] is None  # no record under that key
            assert conn.execute("select keel_tool_effect_lock(%s)", (a["key"],)).fetchone() == (None,)
        got = conn.execute(
            "select subject, reason, data->>'args' from audit_log where idem_key=%s", (a["idem"],)
        ).fetchone()
        assert got == (evil, evil, '"); drop table audit_log; --'), got
        for table in ("tool_effects", "audit_log", "keel_budget_reservations"):
            conn.execute(f"select 1 from {table} limit 1")  # still there


def test_the_effect_lock_serialises_two_sessions_on_one_key(pg_url: str) -> None:
    """``keel_tool_effect_lock`` is the effect's mutual exclusion: a second session on the
    same key waits (here: times out) while the first holds it, and another key does not."""
    key = f"lock/{uuid.uuid4().hex}"
    with psycopg.connect(pg_url) as first, psycopg.connect(pg_url) as second:
        assert first.execute("select keel_tool_effect_lock(%s)", (key,)).fetchone() == (None,)
        second.execute("set lock_timeout = '300ms'")
        assert second.execute("select keel_tool_effect_lock(%s)", (key + "x",)).fetchone() == (None,)
        second.rollback()
        second.execute("set lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            second.execute("select keel_tool_effect_lock(%s)", (key,))
        second.rollback()
        first.rollback()


@pytest.fixture
def own_pg(settings: Any) -> Iterator[Any]:
    """A PostgreSQL of this test's own (the session's must not crash), migrated."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    from keel.db import apply_migrations
    from keel.devservices import DevServices, free_port

    state = Path(tempfile.mkdtemp(prefix="keel-stepsql-pg-"))
    port = free_port()
    services = DevServices(
        dataclasses.replace(
            settings,
            state_dir=state,
            pg_port=port,
            database_url=f"postgresql://keel_app@127.0.0.1:{port}/keel",
            database_owner_url=f"postgresql://postgres@127.0.0.1:{port}/keel",
        )
    )
    try:
        services.start_postgres()
        apply_migrations(services.settings.owner_url)
        yield services
    finally:
        services.stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


async def test_an_effect_run_tool_returned_survives_an_immediate_postgres_crash(own_pg: Any) -> None:
    """run_tool returns, and at once PostgreSQL dies (SIGQUIT: no checkpoint, no flush). After
    the restart the effect's record, its committed hold and its permission row are all there:
    the chained effect transaction committed synchronously (only the decision's transaction
    before it may commit without waiting for its flush)."""
    from bench.bench_fault import crash_postgres

    url = own_pg.settings.database_url
    tenant = f"crash{uuid.uuid4().hex[:6]}"
    name = f"cr_{uuid.uuid4().hex[:6]}"

    async def act(ctx: ToolContext, a: _Args) -> dict[str, Any]:
        return {"n": a.n}

    wid = f"agent/{tenant}/{uuid.uuid4().hex[:8]}"
    p = await open_pool(url, min_size=1, max_size=1)
    try:
        with _registered(name, act):
            out = await ActivityEnvironment().run(ToolActivities(p).run_tool, _call(tenant, name, wid, "s1"))
    finally:
        await asyncio.to_thread(crash_postgres, own_pg)  # before anything else can flush the WAL
        with contextlib.suppress(Exception):
            await p.close()
    assert out.ok
    own_pg.start_postgres()
    with psycopg.connect(url, autocommit=True) as conn:
        effects = conn.execute(
            "select count(*) from tool_effects where idempotency_key=%s", (f"{wid}/s1",)
        ).fetchone()
        hold = conn.execute(
            "select status from keel_budget_reservations where key=%s", (f"{wid}/s1/reserve",)
        ).fetchone()
        perm = conn.execute(
            "select count(*) from audit_log where workflow_id=%s and kind='permission'", (wid,)
        ).fetchone()
    assert (effects, hold, perm) == ((1,), ("committed",), (1,)), (effects, hold, perm)
