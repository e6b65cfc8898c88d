"""Circuit breakers shared by every worker, with their state in PostgreSQL.

One breaker per scope (``tool:<name>``, ``model:<provider>``)::

    closed ──N consecutive failures──▶ open ──cooldown over (DB clock)──▶ half-open
       ▲                                 ▲                                   │
       └────────── probe succeeds ───────┼───────────── probe fails ─────────┘

While half-open exactly ONE call in the whole fleet is let through: the probe is claimed
with one conditional ``UPDATE`` (PostgreSQL re-checks the ``WHERE`` after a concurrent
writer commits, so two workers can never both win). The claim is a lease, so a prober that
dies frees the probe when the lease ends instead of wedging the breaker half-open.

Only transient, infrastructure failures count (the caller decides; see ``run_tool`` and
``call_model``); validation errors and idempotent replays never touch a breaker. Every
transition is appended to ``breaker_events`` for ``starter.py breakers`` and the metrics.
"""

from __future__ import annotations

import os
import socket
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict
from temporalio.exceptions import ApplicationError

from keel import telemetry
from keel.errors import CIRCUIT_OPEN
from keel.redact import redact

__all__ = [
    "BREAKER_POOL",
    "CIRCUIT_OPEN",
    "WORKER_ID",
    "BreakerConfig",
    "BreakerEvent",
    "BreakerView",
    "Permit",
    "acquire",
    "circuit_open_error",
    "closed_permit",
    "config_from_env",
    "events",
    "peek_statement",
    "record_failure",
    "record_success",
    "snapshot",
]

"""``ApplicationError.type`` raised when a breaker refuses a call."""

State = Literal["closed", "open", "half_open"]
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

BREAKER_POOL: ContextVar[Any] = ContextVar("keel_breaker_pool", default=None)
"""The connection pool of the worker running the current activity (set by the worker's
activity interceptor). ``call_model`` is also called directly inside ``plan``/``evaluate``;
outside a Keel worker (unit tests with ``ActivityEnvironment``) it is unset and model calls
run without a breaker."""


@dataclass(frozen=True)
class BreakerConfig:
    """How eager a breaker is. Defaults suit remote APIs; tune with ``KEEL_BREAKER_*``."""

    failure_threshold: int = 5
    """Consecutive transient failures that open the breaker."""
    cooldown_seconds: float = 30.0
    """How long it stays open before one probe is let through."""
    probe_lease_seconds: float = 120.0
    """How long a probe may take before another worker may probe instead (set it to the
    call's timeout: a longer lease only delays recovery after a prober dies)."""


def config_from_env(env: dict[str, str] | None = None, **overrides: float) -> BreakerConfig:
    """``KEEL_BREAKER_THRESHOLD`` / ``KEEL_BREAKER_COOLDOWN_S`` / ``KEEL_BREAKER_PROBE_LEASE_S``."""
    e = os.environ if env is None else env
    base = BreakerConfig(
        failure_threshold=int(e.get("KEEL_BREAKER_THRESHOLD") or 5),
        cooldown_seconds=float(e.get("KEEL_BREAKER_COOLDOWN_S") or 30.0),
        probe_lease_seconds=float(e.get("KEEL_BREAKER_PROBE_LEASE_S") or 120.0),
    )
    return BreakerConfig(**{**base.__dict__, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Permit:
    """The answer to "may I call?": ``allowed``; ``probe`` when this call is the one probe."""

    allowed: bool
    state: State = "closed"
    probe: bool = False
    retry_at: datetime | None = None
    """While refused: when the breaker may let a call through again (DB clock)."""
    transition: tuple[State, State] | None = None
    failures: int = 0
    """Consecutive failures seen when the permit was granted (0: nothing to reset)."""


class BreakerView(BaseModel):
    """One breaker as ``starter.py breakers --json`` prints it."""

    model_config = ConfigDict(frozen=True)

    scope: str
    state: State
    consecutive_failures: int
    opened_until: datetime | None = None
    probe_lease_until: datetime | None = None
    last_error: str = ""
    opened_count: int = 0
    updated_at: datetime


class BreakerEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    scope: str
    from_state: State
    to_state: State
    reason: str
    worker: str
    at: datetime


Conn = psycopg.AsyncConnection[Any]


def peek_statement(scope: str) -> tuple[str, tuple[Any, ...]]:
    """The read ``acquire`` starts with, for callers that pipeline it with other statements
    (``run_tool``); a closed breaker needs nothing more (see ``closed_permit``)."""
    return (
        "select state, opened_until, probe_lease_until, now() as now, consecutive_failures "
        "from circuit_breakers where scope = %s",
        (scope,),
    )


def closed_permit(row: Any) -> Permit | None:
    """The permit a ``peek_statement`` row grants without any write (no breaker yet, or a
    closed one), else None: the caller must ``acquire``, whose probe claim commits alone."""
    if row is None or row[0] == "closed":
        return Permit(allowed=True, failures=row[4] if row else 0)
    return None


async def acquire(conn: Conn, scope: str, cfg: BreakerConfig, owner: str) -> Permit:
    """May ``owner`` call ``scope`` now? Claims the half-open probe if it is free.

    Call outside any transaction of your own: a claim must commit even if your work fails.
    """
    row = await (await conn.execute(*peek_statement(scope))).fetchone()
    permit = closed_permit(row)
    if permit is not None:
        return permit
    assert row is not None
    state, opened_until, lease_until, now, _ = row
    if state == "open" and opened_until is not None and now < opened_until:
        return Permit(allowed=False, state="open", retry_at=opened_until)
    claimed = await (
        await conn.execute(
            "with old as (select scope, state from circuit_breakers where scope = %(s)s for update) "
            "update circuit_breakers b set state = 'half_open', probe_owner = %(o)s, "
            "  probe_lease_until = now() + make_interval(secs => %(lease)s), updated_at = now() "
            "from old where b.scope = old.scope and ("
            "  (b.state = 'open' and b.opened_until <= now()) or "
            "  (b.state = 'half_open' and "
            "   (b.probe_lease_until is null or b.probe_lease_until <= now())))"
            " returning old.state",
            {"s": scope, "o": owner, "lease": cfg.probe_lease_seconds},
        )
    ).fetchone()
    if claimed is None:  # another worker holds the probe (or just closed/opened it)
        return Permit(allowed=False, state="half_open", retry_at=lease_until or opened_until)
    reason = (
        "cooldown over: one probe let through"
        if claimed[0] == "open"
        else "previous probe's lease expired: probing again"
    )
    await _event(conn, scope, claimed[0], "half_open", reason)
    return Permit(allowed=True, state="half_open", probe=True, transition=(claimed[0], "half_open"))


async def record_success(conn: Conn, scope: str, owner: str) -> tuple[State, State] | None:
    """A call succeeded: the probe closes its breaker; a closed one forgets its failures.

    A success that started before the breaker opened (a straggler) changes nothing: only
    the probe speaks for a breaker that is not closed. Returns the transition, if any.
    """
    row = await (
        await conn.execute(
            "with old as (select scope, state from circuit_breakers where scope = %(s)s for update) "
            "update circuit_breakers b set state = 'closed', consecutive_failures = 0, "
            "  opened_until = null, probe_owner = null, probe_lease_until = null, updated_at = now() "
            "from old where b.scope = old.scope and ("
            "  (b.state = 'closed' and b.consecutive_failures > 0) or "
            "  (b.state = 'half_open' and b.probe_owner = %(o)s)) "
            "returning old.state",
            {"s": scope, "o": owner},
        )
    ).fetchone()
    if row is None or row[0] == "closed":
        return None
    await _event(conn, scope, "half_open", "closed", "probe succeeded")
    return ("half_open", "closed")


async def record_failure(
    conn: Conn, scope: str, cfg: BreakerConfig, owner: str, error: str
) -> tuple[State, State] | None:
    """A transient failure: count it; open at the threshold; a failed probe re-opens."""
    # Stored in circuit_breakers.last_error and shown by ``starter.py breakers``: redacted.
    error = redact(error.splitlines()[0])[:300] if error else ""
    async with conn.transaction():
        await conn.execute(
            "insert into circuit_breakers (scope) values (%s) on conflict (scope) do nothing", (scope,)
        )
        state, failures, probe_owner = await _one(
            conn,
            (
                "select state, consecutive_failures, probe_owner from circuit_breakers "
                "where scope = %s for update"
            ),
            (scope,),
        )
        failures += 1
        opens = (state == "closed" and failures >= cfg.failure_threshold) or (
            state == "half_open" and probe_owner == owner
        )
        if opens:
            await conn.execute(
                "update circuit_breakers set state = 'open', consecutive_failures = %s, "
                "opened_until = now() + make_interval(secs => %s), probe_owner = null, "
                "probe_lease_until = null, last_error = %s, opened_count = opened_count + 1, "
                "updated_at = now() where scope = %s",
                (failures, cfg.cooldown_seconds, error, scope),
            )
            reason = (
                f"probe failed: {error}"
                if state == "half_open"
                else f"{failures} consecutive failures, last: {error}"
            )
            await _event(conn, scope, state, "open", reason)
            return (state, "open")
        await conn.execute(
            "update circuit_breakers set consecutive_failures = %s, last_error = %s, "
            "updated_at = now() where scope = %s",
            (failures, error, scope),
        )
    return None


async def snapshot(conn: Conn) -> list[BreakerView]:
    """Every breaker that ever failed, most recently changed first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select scope, state, consecutive_failures, opened_until, probe_lease_until, "
            "last_error, opened_count, updated_at from circuit_breakers "
            "order by updated_at desc, scope"
        )
        return [BreakerView.model_validate(r) for r in await cur.fetchall()]


async def events(conn: Conn, scope: str | None = None, limit: int = 20) -> list[BreakerEvent]:
    """The latest transitions, newest first (optionally for one scope)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select id, scope, from_state, to_state, reason, worker, at from breaker_events "
            "where %(s)s::text is null or scope = %(s)s order by id desc limit %(n)s",
            {"s": scope, "n": limit},
        )
        return [BreakerEvent.model_validate(r) for r in await cur.fetchall()]


def circuit_open_error(scope: str, permit: Permit, *, retryable: bool = False) -> ApplicationError:
    """The failure a refused call raises. Non-retryable by default: the workflow takes the
    declared fallback or fails the step now instead of burning retries on a known outage.
    ``retryable`` (compensations, which must eventually run) waits out the cooldown."""
    name = scope.split(":", 1)[1] if ":" in scope else scope
    until = permit.retry_at.isoformat(timespec="seconds") if permit.retry_at else "a probe ends"
    delay = None
    if retryable and permit.retry_at is not None:
        from datetime import UTC, timedelta

        delay = max(timedelta(seconds=1), permit.retry_at - datetime.now(UTC))
    return ApplicationError(
        f"circuit open for {name} until {until}",
        {"scope": scope},
        type=CIRCUIT_OPEN,
        non_retryable=not retryable,
        next_retry_delay=delay,
    )


async def _event(conn: Conn, scope: str, from_state: str, to_state: str, reason: str) -> None:
    await conn.execute(
        "insert into breaker_events (scope, from_state, to_state, reason, worker) "
        "values (%s, %s, %s, %s, %s)",
        (scope, from_state, to_state, reason[:500], WORKER_ID),
    )
    telemetry.record_breaker_transition(scope, from_state, to_state)


async def _one(conn: Conn, sql: str, params: tuple[Any, ...]) -> Any:
    row = await (await conn.execute(sql, params)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row
