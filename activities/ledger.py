"""The budget ledger client: one plpgsql call (one round trip) per operation.

(``activities/ledger_batch.py`` puts many concurrent operations of a worker into one call.)

ONE way to call the ledger, on psycopg's public API only: every ledger statement is a
:class:`Statement` built here and sent by :func:`execute`, which is ``conn.execute(...,
prepare=True)``: a server-side prepared statement (psycopg prepares it on the first use on
each connection and keeps it in the connection's cache), so a call is one Bind/Execute round
trip with no parse or plan on the server. Integer parameters are sent with fixed types
(``Int8``/``Int4``) so that one statement is one prepared statement whatever the amounts.
Inside ``conn.pipeline()`` the same :func:`execute` queues the statement (the tool activity
sends its audit row, its reservation and the COMMIT in one round trip); the cursor's rows
are read after the pipeline syncs. Cancellation is psycopg's own: a cancelled caller's query
is cancelled on the server and the connection is left usable (or closed, if the server does
not stop in time), and the pool (``keel.db``) replaces connections a server restart killed.

Functions take a psycopg ``AsyncConnection`` rather than a pool so that a caller can run them
inside a transaction it owns: the tool activity commits the cost in the same transaction as
the tool's effect, so either both happen or neither does. On an autocommit connection each
call is its own short transaction, and row locks are held only for the function's duration.

All amounts are integer micro-USD. Refusals surface as :class:`keel.budget.LedgerError`
subclasses, mapped from the custom SQLSTATEs raised by the ledger's SQL
(``keel/migrations/baseline/ledger.sql``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg.types.numeric import Int4, Int8
from psycopg_pool import AsyncConnectionPool

from keel.budget import (
    CommitRequest,
    CommitResult,
    ExtendRequest,
    ExtendResult,
    HistoryEntry,
    IdempotencyConflict,
    InvalidLedgerRequest,
    LedgerError,
    OpenRunRequest,
    OpenRunResult,
    ReleaseRequest,
    ReleaseResult,
    ReservationClosed,
    ReservationNotFound,
    ReserveRequest,
    ReserveResult,
    ScopeView,
)

__all__ = [
    "Statement",
    "answer_error",
    "batch_op",
    "batch_statement",
    "check_invariant",
    "commit",
    "commit_statement",
    "execute",
    "extend",
    "history",
    "op_statement",
    "reserve_result",
    "reserve_statement",
    "run_batch",
    "run_op",
    "refusals",
    "open_run",
    "open_run_statement",
    "release",
    "release_statement",
    "reserve",
    "run_sweeper",
    "set_limit",
    "show",
    "sweep_expired",
]

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[LedgerError]] = {
    "KL001": IdempotencyConflict,
    "KL002": ReservationNotFound,
    "KL003": ReservationClosed,
    "22023": InvalidLedgerRequest,
}

SWEEP_BATCH = 500
"""Holds expired per sweep call; a bigger backlog is drained by looping, in short transactions."""


def _hash(**fields: Any) -> str:
    """Fingerprint of the semantic payload only, with an explicit field list, so adding a
    defaulted field to a request model later cannot turn old replays into conflicts."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Raise the ledger's own refusals (``KL00x``, ``22023``) inside the block as typed
    exceptions; any other database error passes unchanged."""
    try:
        yield
    except psycopg.Error as e:
        translated = translate_error(e)
        if translated is e:
            raise
        raise translated from e


class Statement(NamedTuple):
    """One ledger statement: SQL with ``%s`` placeholders and its parameters. A tuple, so
    ``conn.execute(*stmt)`` works too, but send it with :func:`execute` (prepared)."""

    sql: str
    params: tuple[Any, ...]


async def execute(conn: AsyncConnection[Any], stmt: Statement) -> AsyncCursor[Any]:
    """Send one ledger statement, prepared on the server (psycopg's ``prepare=True``). In a
    pipeline it is queued and the cursor's rows arrive when the pipeline syncs."""
    return await conn.execute(stmt.sql, stmt.params, prepare=True)


async def _value(conn: AsyncConnection[Any], stmt: Statement) -> Any:
    """The single value the ledger function returns; refusals raised as typed exceptions."""
    with refusals():
        row = await (await execute(conn, stmt)).fetchone()
    assert row is not None
    return row[0]


async def open_run(conn: AsyncConnection[Any], req: OpenRunRequest) -> OpenRunResult:
    """Create the run's scopes and its limit; safe to repeat (the first limit wins)."""
    out = await _value(conn, open_run_statement(req))
    return OpenRunResult.model_validate(out)


def open_run_statement(req: OpenRunRequest) -> Statement:
    """``open_run``'s statement, for a caller that pipelines it (its result is not needed)."""
    return Statement(
        "select keel_budget_open_run(%s::text[], %s::bigint)",
        (list(req.scopes), _int8(req.run_limit_micros)),
    )


def _reserve_hash(req: ReserveRequest) -> str:
    return _hash(
        op="reserve",
        scopes=list(req.scopes),
        amount=req.amount_micros,
        min=req.min_micros,
        max_tokens=req.max_tokens,
        ttl=req.ttl_seconds,
        kind=req.kind,
        subject=req.subject,
        run_id=req.run_id,
        step_id=req.step_id,
        tier=req.tier,
    )


def _commit_hash(req: CommitRequest) -> str:
    return _hash(op="commit", actual=req.actual_micros)


_RELEASE_HASH = _hash(op="release")


def batch_op(req: ReserveRequest | CommitRequest | ReleaseRequest) -> dict[str, Any]:
    """One element of ``keel_budget_batch``'s input: the same fields and idempotency payload
    hash as the single-operation functions, so a batched call and a direct call (or a
    retry of one as the other) are the same operation to the ledger."""
    if isinstance(req, ReserveRequest):
        return {
            "op": "reserve",
            "key": req.key,
            "hash": _reserve_hash(req),
            "scopes": list(req.scopes),
            "amount": req.amount_micros,
            "min": req.min_micros,
            "max_tokens": req.max_tokens,
            "ttl": req.ttl_seconds,
            "kind": req.kind,
            "subject": req.subject,
            "run_id": req.run_id,
            "step_id": req.step_id,
            "tier": req.tier,
        }
    if isinstance(req, CommitRequest):
        return {
            "op": "commit",
            "key": req.key,
            "hash": _commit_hash(req),
            "actual": req.actual_micros,
            "scopes": list(req.scopes),
            "kind": req.kind,
        }
    return {"op": "release", "key": req.key, "hash": _RELEASE_HASH, "reason": req.reason}


def answer_error(answer: dict[str, Any]) -> Exception | None:
    """The refusal carried by a batch answer (``{"error": SQLSTATE, "message"}``), if any."""
    code = answer.get("error")
    if code is None:
        return None
    return _ERRORS.get(code, LedgerError)(answer.get("message") or code)


# Each single operation's SQL function and its arguments, in order, as (batch_op field, cast).
_OP_SQL: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "reserve": (
        "keel_budget_reserve",
        (
            ("key", ""),
            ("scopes", "::text[]"),
            ("amount", "::bigint"),
            ("min", "::bigint"),
            ("max_tokens", "::int"),
            ("ttl", "::int"),
            ("kind", ""),
            ("subject", ""),
            ("run_id", ""),
            ("step_id", ""),
            ("tier", ""),
            ("hash", ""),
        ),
    ),
    "commit": (
        "keel_budget_commit",
        (("key", ""), ("actual", "::bigint"), ("hash", ""), ("scopes", "::text[]"), ("kind", "")),
    ),
    "release": ("keel_budget_release", (("key", ""), ("reason", ""), ("hash", ""))),
}
_OP_TEXT = {
    op: f"select {fn}({', '.join(f'%s{cast}' for _, cast in args)})" for op, (fn, args) in _OP_SQL.items()
}
_LEASE = ", set_config('synchronous_commit', 'off', true)"
"""Appended to a statement that only places holds: its transaction commits without waiting
for its WAL flush, because holds are leases (the ledger's SQL, ``baseline/ledger.sql``,
explains what a database crash can then lose, and how a commit still records the spend). It
is ``SET LOCAL``: one autocommit statement is the whole transaction."""
_BATCH_TEXT = "select keel_budget_batch(%s::jsonb)"
"""All of one worker's waiting operations in one call (``activities/ledger_batch.py``)."""


def _int8(value: int | None) -> Int8 | None:
    return None if value is None else Int8(value)


def _param(value: Any, cast: str) -> Any:
    """Integers with a fixed type, so one statement maps to one prepared statement (psycopg
    types a bare ``int`` by its magnitude: ``int2`` for 900, ``int4`` for 100000)."""
    if value is None or isinstance(value, bool):
        return value
    if cast == "::bigint":
        return Int8(value)
    if cast == "::int":
        return Int4(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def op_statement(op: dict[str, Any], *, lease: bool = False) -> Statement:
    """The single-operation statement of a ``batch_op`` (a lone operation skips the batch
    wrapper); a reserve with ``lease`` commits without waiting for its flush."""
    _, args = _OP_SQL[op["op"]]
    sql = _OP_TEXT[op["op"]] + (_LEASE if lease and op["op"] == "reserve" else "")
    return Statement(sql, tuple(_param(op[f], cast) for f, cast in args))


def batch_statement(ops: Sequence[dict[str, Any]], *, lease: bool = False) -> Statement:
    """Many ``batch_op``s in one ``keel_budget_batch`` call; ``lease`` only for reservations."""
    return Statement(_BATCH_TEXT + (_LEASE if lease else ""), (Jsonb(list(ops)),))


def _check_lease(conn: AsyncConnection[Any], lease: bool) -> None:
    if lease and conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("a lease reserve must be its own transaction (autocommit, idle)")


async def run_op(conn: AsyncConnection[Any], op: dict[str, Any], *, lease: bool = False) -> dict[str, Any]:
    """One ``batch_op`` through its single-operation function (the batcher's lone call). A
    ledger refusal comes back as an answer value (``{"error", "message"}``, read it with
    ``answer_error``), as ``keel_budget_batch`` returns it; any other database error is
    raised. ``lease`` (a reserve placed as a lease) needs an autocommit connection outside any
    transaction: it would weaken the caller's whole transaction."""
    _check_lease(conn, lease)
    try:
        row = await (await execute(conn, op_statement(op, lease=lease))).fetchone()
    except psycopg.Error as e:
        err = translate_error(e)
        if err is e:
            raise
        return {"error": e.sqlstate, "message": str(err)}
    assert row is not None
    answer: dict[str, Any] = row[0]
    return answer


async def run_batch(
    conn: AsyncConnection[Any], ops: Sequence[dict[str, Any]], *, lease: bool = False
) -> list[dict[str, Any]]:
    """Many ``batch_op``s in ONE transaction (``keel_budget_batch``), one answer each, in order;
    a refusal is an answer value, as in ``run_op``. ``lease``: reservations only, own
    transaction."""
    _check_lease(conn, lease)
    row = await (await execute(conn, batch_statement(ops, lease=lease))).fetchone()
    assert row is not None
    return list(row[0])


def reserve_statement(req: ReserveRequest) -> Statement:
    """The statement of a reservation, for callers that queue it with other statements (the
    tool activity pipelines it with the audit row) through :func:`execute`; parse the row
    with ``reserve_result``."""
    return op_statement(batch_op(req))


def reserve_result(row: Any) -> ReserveResult:
    return ReserveResult.model_validate(row[0])


def commit_statement(req: CommitRequest) -> Statement:
    """The statement of a commit, for pipelining (see ``reserve_statement``)."""
    return op_statement(batch_op(req))


def release_statement(req: ReleaseRequest) -> Statement:
    """The statement of a release (see ``reserve_statement``)."""
    return op_statement(batch_op(req))


def translate_error(e: psycopg.Error) -> Exception:
    """The ledger's own refusals (``KL00x``) as typed exceptions; anything else unchanged."""
    cls = _ERRORS.get(e.sqlstate or "")
    return cls(e.diag.message_primary or str(e)) if cls is not None else e


async def reserve(conn: AsyncConnection[Any], req: ReserveRequest) -> ReserveResult:
    """Hold money on every scope of the path, all or none, and decide ALLOW/CAPS/DENY."""
    return ReserveResult.model_validate(await _value(conn, reserve_statement(req)))


async def commit(conn: AsyncConnection[Any], req: CommitRequest) -> CommitResult:
    """Record the true cost; works inside the caller's open transaction (tool effect + cost)."""
    return CommitResult.model_validate(await _value(conn, commit_statement(req)))


async def release(conn: AsyncConnection[Any], req: ReleaseRequest) -> ReleaseResult:
    """Return a hold; a no-op (reporting the status) when it was already committed or expired."""
    return ReleaseResult.model_validate(await _value(conn, release_statement(req)))


async def extend(conn: AsyncConnection[Any], req: ExtendRequest) -> ExtendResult:
    """Lengthen a hold's lease (long tool calls); measured on the database clock."""
    out = await _value(
        conn,
        Statement(
            "select keel_budget_extend(%s, %s::int, %s::int, %s)",
            (req.key, Int4(req.ttl_seconds), Int4(req.seq), _hash(op="extend", ttl=req.ttl_seconds)),
        ),
    )
    return ExtendResult.model_validate(out)


async def sweep_expired(conn: AsyncConnection[Any], batch: int = SWEEP_BATCH) -> int:
    """Expire holds whose lease passed and return their money; returns how many."""
    return int(await _value(conn, Statement("select keel_budget_sweep(%s::int)", (Int4(batch),))))


async def set_limit(
    conn: AsyncConnection[Any],
    scope: str,
    limit_micros: int | None,
    observe: bool = False,
    overdraft_micros: int | None = None,
) -> None:
    """Set or clear (``None``) a scope's limit; ``overdraft_micros=None`` keeps the current one."""
    if (limit_micros is not None and limit_micros < 0) or (overdraft_micros or 0) < 0:
        raise ValueError("limit and overdraft must be >= 0 micro-USD")
    await _value(
        conn,
        Statement(
            "select keel_budget_set_limit(%s, %s::bigint, %s, %s::bigint)",
            (scope, _int8(limit_micros), observe, _int8(overdraft_micros)),
        ),
    )


_SCOPE_COLS = (
    "scope, parent, limit_micros, spent_micros, reserved_micros, debt_micros,"
    " overdraft_micros, over_limit_micros, observe"
)


def _remaining(row: dict[str, Any]) -> int | None:
    if row["limit_micros"] is None:
        return None
    return int(row["limit_micros"] - row["spent_micros"] - row["reserved_micros"])


async def show(conn: AsyncConnection[Any], scope: str) -> ScopeView | None:
    """The scope, its effective headroom (ancestors included) and its direct children."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"select {_SCOPE_COLS}, scope = %s as me from keel_budget_scopes"
            " where scope = any(keel_scope_closure(array[%s])) or parent = %s"
            " order by scope",
            (scope, scope, scope),
        )
        rows = await cur.fetchall()
    me = next((r for r in rows if r["me"]), None)
    if me is None:
        return None
    lineage = [r for r in rows if r["parent"] != scope or r["me"]]
    limited = [x for x in (_remaining(r) for r in lineage) if x is not None]
    children = tuple(ScopeView(**_view(r)) for r in rows if r["parent"] == scope and not r["me"])
    return ScopeView(
        **_view(me), effective_remaining_micros=min(limited) if limited else None, children=children
    )


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "me"} | {"remaining_micros": _remaining(row)}


async def history(conn: AsyncConnection[Any], scope: str, limit: int = 50) -> list[HistoryEntry]:
    """Most recent reservations that charged ``scope`` (directly or as an ancestor)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select key, status, kind, subject, run_id, step_id, decision, would_decision,"
            " requested_micros, amount_micros, actual_micros, overrun_micros, over_limit,"
            " reason, created_at, updated_at, expires_at from keel_budget_reservations"
            " where scopes[1] = split_part(%s, '/', 1) and scopes @> array[%s]::text[]"
            " order by scopes[1], created_at desc limit %s",
            (scope, scope, limit),
        )
        return [HistoryEntry(**r) for r in await cur.fetchall()]


async def check_invariant(conn: AsyncConnection[Any]) -> list[str]:
    """Violations of the ledger's accounting invariant (empty list = consistent)."""
    cur = await execute(conn, Statement("select * from keel_check_invariant()", ()))
    return [r[0] for r in await cur.fetchall()]


async def run_sweeper(
    pool: AsyncConnectionPool, interval_seconds: float = 5.0, stop: asyncio.Event | None = None
) -> None:
    """Periodically return the money of expired holds, until ``stop`` is set.

    Every worker process runs one. That is safe because sweeping is idempotent (a hold
    expires once; ``FOR UPDATE SKIP LOCKED`` means two sweepers never wait on each other) and
    cheap (a partial index on held expiry: an empty sweep is one index probe). It is what
    returns money when no new reservations arrive, e.g. after the only worker of a tenant
    was SIGKILLed holding a reservation. Errors are logged and retried next tick: a database
    blip must not kill the worker.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            async with pool.connection() as conn:
                while (n := await sweep_expired(conn)) > 0:
                    log.info("ledger sweeper expired %d holds", n)
                    if n < SWEEP_BATCH:
                        break
        except Exception:  # a database blip must not end the loop: log, retry next tick
            log.exception("ledger sweep failed; retrying in %.1fs", interval_seconds)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        except TimeoutError:
            pass
