"""One prepared statement per round trip, without psycopg's cursor layer: the ledger's hot path.

Why: a budget reservation is a single function call whose answer is a single ``jsonb`` value,
and it sits in front of every model call and tool action. Through ``conn.execute`` the
cursor machinery around that one value (parameter adaptation, the client-side
prepared-statement cache, row and type conversion) cost 0.3-0.5 ms per call on the 2-core
benchmark VM: as much as the database's own work for the call. Measured in one process,
phases interleaved, durable commits: ``conn.execute`` 1.8-2.0 ms against 1.5-1.6 ms here and
1.3-1.5 ms for blocking libpq.

What this keeps from psycopg: the connection and its lock (a call never interleaves with
another user of the connection), the cancellation contract of ``AsyncConnection.wait`` (a
cancelled caller's query is cancelled on the server and the connection is left usable, or
closed if the server does not stop it in time), and psycopg's exception classes (errors carry
the same ``sqlstate`` and ``diag``). What it drops: parameter adaptation (parameters are text;
see :func:`text`), the prepare threshold (a statement is prepared by name on its first use on
each connection), result typing (the one value comes back as ``str``), and psycopg's generic
wait loop. That loop (a generator driven through ``waiting.wait_async``, with a wake-up timer
per wait) cost ~0.17 ms more per round trip on the benchmark VM than waiting for the socket
with one future (:func:`_result`), measured interleaved on a one-row ``UPDATE``: blocking
libpq 0.49 ms, this loop 0.61, ``conn.wait`` 0.78. LISTEN notifications are left in libpq's
queue (psycopg delivers them on its next wait); the ledger's connections do not listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, pq
from psycopg import errors as e

__all__ = ["Prepared", "fetch_value", "text", "text_array"]

_UNDEFINED_STATEMENT = "26000"  # the server forgot our statement (DISCARD ALL, a pooler)


@dataclass(frozen=True)
class Prepared:
    """A statement with ``$n`` placeholders, prepared under ``name`` on each connection."""

    name: str
    sql: str


_prepared: weakref.WeakKeyDictionary[AsyncConnection[Any], set[str]] = weakref.WeakKeyDictionary()


async def fetch_value(conn: AsyncConnection[Any], stmt: Prepared, params: Sequence[str | None]) -> str | None:
    """Run ``stmt`` and return the first column of its first row as text (``None`` for SQL
    NULL or no row). A server error is raised as psycopg raises it."""
    if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
        raise e.ProgrammingError("keel.pgcall cannot run inside a pipeline; use conn.execute there")
    encoding = conn.info.encoding
    args = [None if p is None else p.encode(encoding) for p in params]
    async with conn.lock:
        done = _prepared.setdefault(conn, set())
        for attempt in (1, 2):
            if stmt.name not in done:
                prepared = await _run(conn, lambda pg: pg.send_prepare(stmt.name.encode(), stmt.sql.encode()))
                if prepared.status != pq.ExecStatus.COMMAND_OK:
                    raise e.error_from_result(prepared, encoding=encoding)
                done.add(stmt.name)
            result = await _run(conn, lambda pg: pg.send_query_prepared(stmt.name.encode(), args))
            if result.status == pq.ExecStatus.TUPLES_OK:
                if result.ntuples == 0:
                    return None
                value = result.get_value(0, 0)
                return None if value is None else bytes(value).decode(encoding)
            error = e.error_from_result(result, encoding=encoding)
            # Re-prepare once; not inside a transaction, which the error has just aborted.
            idle = conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
            if error.sqlstate == _UNDEFINED_STATEMENT and attempt == 1 and idle:
                done.discard(stmt.name)
                continue
            if error.sqlstate == _UNDEFINED_STATEMENT:
                done.discard(stmt.name)  # the next call prepares it again
            raise error
    raise AssertionError("unreachable")


async def _run(conn: AsyncConnection[Any], send: Any) -> pq.abc.PGresult:
    """Send one command (``send(pgconn)``) and wait for its single result.

    Interrupted while the server works (the caller was cancelled), it does what
    ``AsyncConnection.wait`` does: ask the server to cancel, read the command's end so that the
    connection can be used again, and close the connection if that does not happen in 5 s or is
    interrupted again."""
    pgconn = conn.pgconn
    send(pgconn)
    try:
        result = await _result(pgconn)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        if pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            try:
                with contextlib.suppress(Exception):  # the wait below decides the connection's fate
                    await conn.cancel_safe(timeout=5.0)
                await asyncio.wait_for(_result(pgconn), 5.0)
            except BaseException:  # not stopped in time, or interrupted again: unknown state
                pgconn.finish()
        raise
    if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return result
    raise e.InterfaceError(f"unexpected result status {pq.ExecStatus(result.status).name}")


async def _result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
    """Flush the sent command and read all its results, waiting on the socket through one
    future per wait (the connection is non-blocking, as psycopg's async connections are).
    ``get_result`` is only called when libpq has a whole result (it would block the event
    loop otherwise). Returns the first error if any (a server error followed by the
    connection dropping keeps the server's error), else the last result."""
    loop = asyncio.get_running_loop()
    fd = pgconn.socket
    while pgconn.flush():  # a request larger than the socket buffer: rare
        await _ready(loop, fd, loop.add_writer, loop.remove_writer)
        pgconn.consume_input()
    results: list[pq.abc.PGresult] = []
    while True:
        try:
            pgconn.consume_input()
            while pgconn.is_busy():
                await _ready(loop, fd, loop.add_reader, loop.remove_reader)
                pgconn.consume_input()
        except e.OperationalError:  # the connection is gone
            if any(r.status == pq.ExecStatus.FATAL_ERROR for r in results):
                break
            raise
        result = pgconn.get_result()
        if result is None:
            break
        results.append(result)
    if not results:
        raise e.InterfaceError("the server sent no result")
    return next((r for r in results if r.status == pq.ExecStatus.FATAL_ERROR), results[-1])


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, add: Any, remove: Any) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    add(fd, _wake, ready)
    try:
        await ready
    finally:
        remove(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def text(value: Any) -> str | None:
    """A Python value as a text parameter: ``None`` is NULL, lists are ``text[]`` literals."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (list, tuple)):
        return text_array(value)
    return str(value)


def text_array(items: Iterable[str]) -> str:
    """A ``text[]`` literal; every element quoted, so any character is safe."""
    return "{" + ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items) + "}"
