"""The ledger's one client (``ledger.execute``: psycopg's prepared statements on a plain
``psycopg_pool`` pool) keeps the promises of the hot path: parameters arrive intact, every call
is a server-side prepared statement, a statement timeout or a refusal leaves the connection
usable, a caller cancelled mid-call leaves its connection clean and its operation undone, a
connection the server drops is replaced, and the server forgetting prepared statements is
survived."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.activities import ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import IdempotencyConflict, ReserveRequest
from keel.db import open_pool

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[Conn]:
    c = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def _held(conn: Conn, key: str) -> int | None:
    cur = await conn.execute("select amount_micros from keel_budget_reservations where key = %s", (key,))
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def _prepared(conn: Conn, fn: str) -> list[str]:
    cur = await conn.execute(
        "select statement from pg_prepared_statements where statement like %s", (f"%{fn}(%",)
    )
    return [r[0] for r in await cur.fetchall()]


# PostgreSQL text cannot hold NUL; everything else must arrive as sent.
_text = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=16)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=_text, run_id=_text, amount=st.integers(min_value=1, max_value=2**53))
async def test_parameters_arrive_intact(
    conn: Conn, tenant: str, subject: str, run_id: str, amount: int
) -> None:
    key = f"{tenant}/{uuid.uuid4().hex}"
    req = ReserveRequest(key=key, scopes=(tenant,), amount_micros=amount, subject=subject, run_id=run_id)
    res = await ledger.reserve(conn, req)
    assert res.granted_micros == amount  # beyond int4 too: integers keep their width
    cur = await conn.execute(
        "select subject, run_id, amount_micros from keel_budget_reservations where key = %s", (key,)
    )
    assert await cur.fetchone() == (subject, run_id, amount)


async def test_every_call_is_one_server_side_prepared_statement(conn: Conn, tenant: str) -> None:
    """Prepared on the server (no parse/plan per call), and one statement per ledger function
    whatever the amounts' magnitude (psycopg would type 9 as int2 and 10**12 as int8)."""
    for i, amount in enumerate((9, 100_000, 10**12)):
        await ledger.reserve(
            conn, ReserveRequest(key=f"{tenant}/{i}", scopes=(tenant,), amount_micros=amount)
        )
    assert len(await _prepared(conn, "keel_budget_reserve")) == 1
    cur = await conn.execute(
        "select generic_plans + custom_plans from pg_prepared_statements where statement like %s",
        ("%keel_budget_reserve(%",),
    )
    assert (await cur.fetchone() or (0,))[0] >= 3  # executed as the prepared statement


async def test_a_refusal_is_typed_and_the_connection_stays_usable(conn: Conn, tenant: str) -> None:
    req = ReserveRequest(key=f"{tenant}/k", scopes=(tenant,), amount_micros=5)
    await ledger.reserve(conn, req)
    with pytest.raises(IdempotencyConflict):  # same key, other payload
        await ledger.reserve(conn, req.model_copy(update={"amount_micros": 6}))
    assert (await ledger.reserve(conn, req)).replayed


async def test_a_statement_timeout_is_raised_and_the_connection_stays_usable(
    conn: Conn, pg_url: str, tenant: str
) -> None:
    await ledger.set_limit(conn, tenant, 10**9)
    async with await psycopg.AsyncConnection.connect(pg_url) as locker:
        await locker.execute("select 1 from keel_budget_scopes where scope = %s for update", (tenant,))
        await conn.execute("set statement_timeout = '300ms'")
        key = f"{tenant}/slow"
        with pytest.raises(psycopg.errors.QueryCanceled):
            await ledger.reserve(conn, ReserveRequest(key=key, scopes=(tenant,), amount_micros=5))
        await locker.rollback()
    await conn.execute("reset statement_timeout")
    assert not conn.broken and await _held(conn, key) is None  # the timed-out call left nothing
    assert (
        await ledger.reserve(conn, ReserveRequest(key=key, scopes=(tenant,), amount_micros=5))
    ).granted_micros == 5


async def test_a_call_cancelled_mid_flight_is_undone_and_leaves_the_connection_clean(
    conn: Conn, pg_url: str, tenant: str
) -> None:
    """The reserve waits on the tenant row another transaction holds; the caller is cancelled
    (a Temporal activity timeout). The query is cancelled on the server, so nothing was held,
    and the connection is idle and usable, not closed."""
    await ledger.set_limit(conn, tenant, 10**9)
    key = f"{tenant}/cancelled"
    async with await psycopg.AsyncConnection.connect(pg_url) as locker:
        await locker.execute("select 1 from keel_budget_scopes where scope = %s for update", (tenant,))
        task = asyncio.create_task(
            ledger.reserve(conn, ReserveRequest(key=key, scopes=(tenant,), amount_micros=5))
        )
        await asyncio.sleep(0.3)
        assert not task.done()  # really waiting on the server
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 5
        await locker.rollback()  # the lock is free: had the query survived, it would now run
    await asyncio.sleep(0.2)
    assert not conn.closed and not conn.broken
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert await _held(conn, key) is None
    assert (
        await ledger.reserve(conn, ReserveRequest(key=key, scopes=(tenant,), amount_micros=5))
    ).granted_micros == 5


async def test_a_connection_dropped_mid_call_is_replaced_by_the_pool(pg_url: str, tenant: str) -> None:
    """The server ends the backend while a ledger call runs: the caller gets the server's
    error (retryable for Temporal), the pool discards the dead connection, and the next call
    of the same batcher succeeds on a new backend."""
    pool = await open_pool(pg_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as c:
            await ledger.set_limit(c, tenant, 10**9)
            victim = c.info.backend_pid
        batcher = LedgerBatcher(pool)
        async with await psycopg.AsyncConnection.connect(pg_url) as locker:
            await locker.execute("select 1 from keel_budget_scopes where scope = %s for update", (tenant,))
            task = asyncio.create_task(
                batcher.reserve(ReserveRequest(key=f"{tenant}/a", scopes=(tenant,), amount_micros=5))
            )
            await asyncio.sleep(0.3)
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
                await admin.execute("select pg_terminate_backend(%s)", (victim,))
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(task, 10)
            await locker.rollback()
        res = await batcher.reserve(ReserveRequest(key=f"{tenant}/a", scopes=(tenant,), amount_micros=5))
        assert res.granted_micros == 5 and not res.replayed
        async with pool.connection() as c:
            assert c.info.backend_pid != victim
    finally:
        await pool.close()


async def test_survives_the_server_forgetting_prepared_statements(conn: Conn, tenant: str) -> None:
    await ledger.reserve(conn, ReserveRequest(key=f"{tenant}/1", scopes=(tenant,), amount_micros=1))
    await conn.execute("deallocate all")  # what DISCARD ALL or a pooler's reset does
    await ledger.reserve(conn, ReserveRequest(key=f"{tenant}/2", scopes=(tenant,), amount_micros=1))
    await conn.execute("discard all")
    res = await ledger.reserve(conn, ReserveRequest(key=f"{tenant}/3", scopes=(tenant,), amount_micros=1))
    assert res.granted_micros == 1


async def test_pipelined_with_other_statements_in_one_transaction(conn: Conn, tenant: str) -> None:
    """The tool activity's shape: the reserve queued in a pipeline with another statement, in
    one transaction; a refusal inside the pipeline comes out typed and rolls back both."""
    await conn.execute("create temp table client_side (v text)")
    req = ReserveRequest(key=f"{tenant}/p", scopes=(tenant,), amount_micros=5)
    async with conn.pipeline():
        async with conn.transaction():
            await conn.execute("insert into client_side values ('kept')")
            cur = await ledger.execute(conn, ledger.reserve_statement(req))
    assert ledger.reserve_result(await cur.fetchone()).granted_micros == 5
    other = req.model_copy(update={"amount_micros": 6})
    with pytest.raises(IdempotencyConflict), ledger.refusals():
        async with conn.pipeline():
            async with conn.transaction():
                await conn.execute("insert into client_side values ('rolled back')")
                await ledger.execute(conn, ledger.reserve_statement(other))
    cur = await conn.execute("select array_agg(v) from client_side")
    assert await cur.fetchone() == (["kept"],)
