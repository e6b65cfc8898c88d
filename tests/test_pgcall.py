"""keel.pgcall, the ledger's cursor-less hot path, behaves like ``conn.execute`` where it matters:
parameters arrive intact, errors are psycopg's, a cancelled call leaves the connection usable,
and the server forgetting a prepared statement is survived."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel import pgcall

ECHO = pgcall.Prepared("test_pgcall_echo", "select $1::text[]::text")
EQUALS = pgcall.Prepared("test_pgcall_equals", "select ($1::text[] = $2::text[])::text")


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    c = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        yield c
    finally:
        await c.close()


# PostgreSQL text cannot hold NUL; everything else must survive the literal.
_text = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_text, max_size=6))
async def test_text_array_round_trips_any_text(conn: psycopg.AsyncConnection, items: list[str]) -> None:
    cur = await conn.execute("select %s::text[]::text", (items,))
    row = await cur.fetchone()
    assert row is not None
    # Same array as psycopg's own adaptation, compared by the server.
    assert await pgcall.fetch_value(conn, EQUALS, [pgcall.text_array(items), row[0]]) == "true"


async def test_values_nulls_and_empty_results(conn: psycopg.AsyncConnection) -> None:
    assert await pgcall.fetch_value(conn, ECHO, [pgcall.text(["a", 'b"c', "d,e"])]) == '{a,"b\\"c","d,e"}'
    null = pgcall.Prepared("test_pgcall_null", "select $1::int")
    assert await pgcall.fetch_value(conn, null, [None]) is None
    no_row = pgcall.Prepared("test_pgcall_norow", "select 1 where false")
    assert await pgcall.fetch_value(conn, no_row, []) is None
    typed = pgcall.Prepared("test_pgcall_typed", "select format('%s|%s|%s', $1::bigint, $2::bool, $3::text)")
    assert await pgcall.fetch_value(conn, typed, [pgcall.text(7), pgcall.text(True), "x"]) == "7|t|x"


async def test_errors_are_psycopgs_and_leave_the_connection_usable(conn: psycopg.AsyncConnection) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero) as info:
        div = pgcall.Prepared("test_pgcall_div", "select (1 / $1::int)::text")
        await pgcall.fetch_value(conn, div, ["0"])
    assert info.value.sqlstate == "22012"
    with pytest.raises(psycopg.errors.SyntaxError):
        await pgcall.fetch_value(conn, pgcall.Prepared("test_pgcall_bad", "selec 1"), [])
    # A statement that failed to prepare is not remembered as prepared.
    with pytest.raises(psycopg.errors.SyntaxError):
        await pgcall.fetch_value(conn, pgcall.Prepared("test_pgcall_bad", "selec 1"), [])
    assert await pgcall.fetch_value(conn, ECHO, ["{ok}"]) == "{ok}"


async def test_survives_the_server_forgetting_prepared_statements(conn: psycopg.AsyncConnection) -> None:
    assert await pgcall.fetch_value(conn, ECHO, ["{one}"]) == "{one}"
    await conn.execute("deallocate all")  # what DISCARD ALL or a pooler's reset does
    assert await pgcall.fetch_value(conn, ECHO, ["{two}"]) == "{two}"
    # Inside a transaction the error has aborted it, so it is raised, not retried...
    await conn.execute("deallocate all")
    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
        async with conn.transaction():
            await pgcall.fetch_value(conn, ECHO, ["{three}"])
    # ...and the next call prepares it again.
    assert await pgcall.fetch_value(conn, ECHO, ["{four}"]) == "{four}"


async def test_runs_inside_the_callers_transaction(conn: psycopg.AsyncConnection) -> None:
    await conn.execute("create temp table pgcall_tx (v text)")
    insert = pgcall.Prepared("test_pgcall_insert", "insert into pgcall_tx values ($1) returning v")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            assert await pgcall.fetch_value(conn, insert, ["rolled back"]) == "rolled back"
            raise RuntimeError
    async with conn.transaction():
        await pgcall.fetch_value(conn, insert, ["kept"])
    cur = await conn.execute("select array_agg(v) from pgcall_tx")
    assert await cur.fetchone() == (["kept"],)


async def test_cancelled_call_is_cancelled_on_the_server(conn: psycopg.AsyncConnection) -> None:
    sleep = pgcall.Prepared("test_pgcall_sleep", "select pg_sleep($1::float8)::text")
    task = asyncio.create_task(pgcall.fetch_value(conn, sleep, ["30"]))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 10  # not the 30 s sleep
    assert not conn.closed
    assert await pgcall.fetch_value(conn, ECHO, ["{after}"]) == "{after}"


async def test_refuses_to_run_inside_a_pipeline(conn: psycopg.AsyncConnection) -> None:
    async with conn.pipeline():
        with pytest.raises(psycopg.ProgrammingError, match="pipeline"):
            await pgcall.fetch_value(conn, ECHO, ["{x}"])


async def test_a_dropped_connection_keeps_the_server_error(
    conn: psycopg.AsyncConnection, pg_url: str
) -> None:
    sleep = pgcall.Prepared("test_pgcall_sleep2", "select pg_sleep($1::float8)::text")
    pid = conn.info.backend_pid
    task = asyncio.create_task(pgcall.fetch_value(conn, sleep, ["30"]))
    await asyncio.sleep(0.3)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute("select pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.errors.AdminShutdown) as caught:
        await asyncio.wait_for(task, 10)
    assert caught.value.sqlstate == "57P01"
