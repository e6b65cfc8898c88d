"""Per-tenant concurrency limit on runs: a slot per in-flight run, leased in PostgreSQL.

``acquire_run_slot_in`` is called when a run starts (``prepare_run``) and
``RELEASE_AND_BOUND_SQL`` frees the slot when it finishes (``finish_run``). A slot is a lease
that ends at ``expires_at`` (database clock): a run whose worker died, or that was
terminated so ``finish_run`` never ran, stops counting once its lease ends, so a crash
cannot leak a tenant's capacity for ever. Choose the TTL above the run's wall-clock deadline
(``ttl_for``).

Acquisition is serialised per tenant with a transaction-scoped advisory lock, so N workers
admitting runs of one tenant at the same moment can never exceed the limit; tenants do not
contend with each other. Both calls are idempotent per ``workflow_id`` (activity retries).

A worker that stops answering in the middle of one of these transactions (frozen by SIGSTOP,
a paused VM, a stalled event loop) would hold the tenant's lock, or the run's slot row, for
as long as it stays frozen, and every run of the tenant would wait on it; PostgreSQL only
notices a dead client, never a silent one. So each transaction that takes them bounds how
long it may hold them (``_BOUND``, in the statement that takes the lock and evaluated after
it, so a wait for it is never counted): the server ends the session
``TRANSACTION_BOUND_MS`` later, its transaction rolls back, its locks go, and the next
attempt (another worker's) goes on.

The same table doubles as the registry of in-flight runs: the release returns how long the
run held its slot, which is the run's duration for the ``keel.run.duration`` metric.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import psycopg

__all__ = [
    "TRANSACTION_BOUND_MS",
    "RELEASE_AND_BOUND_SQL",
    "SLOT_MARGIN_SECONDS",
    "RunEnded",
    "acquire_run_slot",
    "acquire_run_slot_in",
    "bound_ms",
    "held_seconds",
    "in_flight",
    "release_run_slot",
    "tenant_run_limit",
    "ttl_for",
]

SLOT_MARGIN_SECONDS = 300
"""Added to a run's deadline for its lease: a run may overrun its deadline while it
compensates and finishes, and must not lose its slot while doing so."""

TRANSACTION_BOUND_MS = 10_000
"""How long a transaction may go on once it holds the tenant's slot lock or a run's slot row.
What follows is a few pipelined statements, milliseconds on a live worker; but waits that
come after the lock count too (the preparation's append to the tenant's audit chain and its
ledger scopes, behind another transaction holding them). The bound is below the 30 s that the
next attempt's local activity may wait on the lock before it times out. A transaction cut off
by it rolls back whole (nothing half-written; every write is idempotent) and its activity is
retried by Temporal."""

_BOUND = "set_config('transaction_timeout', '0', true), set_config('transaction_timeout', %s, true)"
"""Set inside a transaction, ``transaction_timeout`` (PostgreSQL 17+) counts from the moment
it is set, so a wait for the lock (behind a live holder, or a frozen one the bound will end)
is never counted; set to 0 first, so that a default configured for the role or database
(whose timer started at ``BEGIN``) cannot keep its own start. ``transaction_timeout``, not
``idle_in_transaction_session_timeout``: a client frozen in the middle of a pipeline leaves
its backend ``active``, reading the rest of the pipeline, which the idle timeout never
counts (``tests/test_attack_lean_kill.py`` freezes a worker there). ``true`` scopes both to
the transaction, so the pooled connection (and a tool's long effect transaction later on it)
keeps the server's default. It is in the same statement as the lock, evaluated after it, so
no moment exists when a frozen client holds the lock unbounded."""

_LOCK_AND_BOUND_SQL = (
    "select " + _BOUND + " from (select pg_advisory_xact_lock(%s, hashtext(%s)) offset 0) locked"
)

RELEASE_AND_BOUND_SQL = (
    "with released as (delete from run_slots where workflow_id = %s "
    "returning extract(epoch from now() - acquired_at)::float8 as held) "
    "select (select held from released), " + _BOUND
)
"""``finish_run``'s release of the run's slot, bounded from the moment it has the row
(parameters: the workflow id, then ``bound_ms()``); ``held_seconds`` reads its row."""


def bound_ms() -> str:
    """``TRANSACTION_BOUND_MS`` as the statement's parameter (read at call time)."""
    return str(TRANSACTION_BOUND_MS)


_LOCK_CLASS = 7_345_005  # advisory-lock namespace owned by the run-slot code

Conn = psycopg.AsyncConnection[Any]


async def acquire_run_slot(
    conn: Conn, tenant: str, workflow_id: str, limit: int | None, ttl_seconds: float
) -> bool:
    """Take one of ``tenant``'s ``limit`` run slots for ``workflow_id``; ``False`` when full.

    ``limit=None`` never refuses (the slot is still recorded, for the duration metric).
    Re-acquiring a slot the run already holds renews its lease and returns ``True``.
    """
    async with conn.transaction():
        return await acquire_run_slot_in(conn, tenant, workflow_id, limit, ttl_seconds)


class RunEnded(Exception):
    """The run already has its finish row: a late preparation must take no slot."""


async def acquire_run_slot_in(
    conn: Conn,
    tenant: str,
    workflow_id: str,
    limit: int | None,
    ttl_seconds: float,
    *,
    ended_key: str | None = None,
) -> bool:
    """``acquire_run_slot`` inside the caller's transaction. In the caller's pipeline
    (``conn.pipeline()``) the tenant's lock, the renewal, the purge of expired slots and the
    count share one round trip with whatever the caller queued before (the purge and the
    count are harmless when the renewal succeeds: expired slots hold nothing), and the slot's
    insert is queued, not awaited: it travels with the caller's next statements and commits
    or rolls back with them. Outside a pipeline each statement is its own round trip.

    ``ended_key``: the run's finish-row key; found once the lock is held, it raises
    ``RunEnded`` (the caller rolls back). A preparation queued on the lock while its attempt
    timed out would otherwise take a slot, and write its authorization row, after the run
    finished, holding the slot until its lease expired.
    """
    await conn.execute(_LOCK_AND_BOUND_SQL, (bound_ms(), _LOCK_CLASS, tenant), prepare=True)
    ended = (
        await conn.execute("select exists(select 1 from audit_log where idem_key = %s)", (ended_key,))
        if ended_key
        else None
    )
    renewing = await conn.execute(
        "update run_slots set expires_at = now() + make_interval(secs => %s) "
        "where workflow_id = %s and expires_at > now() returning 1",
        (ttl_seconds, workflow_id),
    )
    await conn.execute("delete from run_slots where tenant = %s and expires_at <= now()", (tenant,))
    counted = (
        await conn.execute("select count(*) from run_slots where tenant = %s", (tenant,))
        if limit is not None
        else None
    )
    renewed = await renewing.fetchone() is not None  # in a pipeline: its one sync
    if ended is not None and (row := await ended.fetchone()) is not None and row[0]:
        raise RunEnded(workflow_id)
    if renewed:
        return True
    if counted is not None and limit is not None:
        row = await counted.fetchone()
        if row is not None and row[0] >= limit:
            return False
    await conn.execute(
        "insert into run_slots (workflow_id, tenant, expires_at) "
        "values (%s, %s, now() + make_interval(secs => %s)) "
        "on conflict (workflow_id) do update set tenant = excluded.tenant, "
        "acquired_at = now(), expires_at = excluded.expires_at",
        (workflow_id, tenant, ttl_seconds),
    )
    return True


async def release_run_slot(conn: Conn, workflow_id: str) -> float | None:
    """Free the run's slot; returns seconds it was held (``None`` if it held none). Outside a
    run's finish (which releases with ``RELEASE_AND_BOUND_SQL``, in its own transaction)."""
    row = await (
        await conn.execute(
            "delete from run_slots where workflow_id = %s "
            "returning extract(epoch from now() - acquired_at)::float8",
            (workflow_id,),
        )
    ).fetchone()
    return held_seconds(row)


def held_seconds(row: Any) -> float | None:
    """Seconds a released slot was held, from the release's row (``None``: no slot)."""
    return None if row is None or row[0] is None else float(row[0])


async def in_flight(conn: Conn, tenant: str) -> int:
    """Runs of ``tenant`` currently holding an unexpired slot."""
    row = await (
        await conn.execute(
            "select count(*) from run_slots where tenant = %s and expires_at > now()", (tenant,)
        )
    ).fetchone()
    return int(row[0]) if row else 0


def tenant_run_limit(tenant: str, env: Mapping[str, str] | None = None) -> int | None:
    """The limit for ``tenant``: ``KEEL_MAX_RUNS_<TENANT>`` (upper-cased, ``-``/``.`` → ``_``),
    else ``KEEL_MAX_RUNS_PER_TENANT``, else unlimited (``None``). ``0`` means unlimited too."""
    e = os.environ if env is None else env
    own = "KEEL_MAX_RUNS_" + tenant.upper().replace("-", "_").replace(".", "_")
    raw = (e.get(own) or e.get("KEEL_MAX_RUNS_PER_TENANT") or "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"run limit for tenant {tenant!r} must be an integer, got {raw!r}") from None
    return value if value > 0 else None


def ttl_for(deadline_seconds: int | float) -> float:
    """Lease length for a run with this wall-clock deadline."""
    return float(deadline_seconds) + SLOT_MARGIN_SECONDS
