"""PostgreSQL access: one async pool per process, and ordered SQL migrations.

Migrations are plain ``keel/migrations/NNN_name.sql`` files applied in name order, each once,
under an advisory lock so that several workers starting together do not race. Workers apply
them on start (so a production worker needs no separate step) and ``dev up`` applies them for
the embedded default.

A baseline (``keel/migrations/baseline/*.sql``) is the current schema of one part, written as
one file to be read: ``baseline/ledger.sql`` is the whole budget ledger. Its first line names
the numbered migrations it stands for (``-- replaces: 002_ledger.sql ...``). A database that
has applied none of them, nor anything numbered after the first of them (a new database), gets
the baseline in their place, and they are recorded as applied; a database that has applied
any of them keeps upgrading through the numbered files. Both end at the same schema
(``tests/test_migrations.py`` builds one each way and compares their dumps), so a change to
the ledger's SQL is a new numbered migration AND the same change in the baseline.

Demo data is not a migration: :func:`seed_demo` applies ``keel/seed/demo.sql`` (the demo
tenants' orders and stock) for ``dev up`` / ``make demo`` and the tests; a production
database starts empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

__all__ = [
    "apply_migrations",
    "open_ledger_pool",
    "open_pool",
    "seed_demo",
    "Pool",
    "BASELINE_DIR",
    "MIGRATIONS_DIR",
    "SEED_DIR",
    "LEDGER_POOL_SIZE",
]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BASELINE_DIR = MIGRATIONS_DIR / "baseline"
SEED_DIR = Path(__file__).parent / "seed"
LEDGER_POOL_SIZE = 2
"""Connections of a worker's ledger pool: its batcher's ``max_in_flight`` (one batch travels
while the previous one flushes), so a batch never waits for a connection."""
_MIGRATION_LOCK = 7_345_001  # arbitrary advisory-lock id owned by Keel's migrator
_REPLACES = "-- replaces:"


def _replaces(baseline: Path) -> list[str]:
    """The numbered migrations a baseline stands for, from its first line."""
    first = baseline.read_text().splitlines()[0] if baseline.stat().st_size else ""
    if not first.startswith(_REPLACES) or not first[len(_REPLACES) :].split():
        raise ValueError(f"{baseline}: the first line must be '{_REPLACES} NNN_name.sql ...'")
    return sorted(first[len(_REPLACES) :].split())


def _plan(done: set[str], *, baselines: bool, upto: str | None) -> list[tuple[Path, list[str]]]:
    """(file to run, names it records) in order: a baseline takes the place of the first
    migration it replaces when nothing from there on has been applied."""
    numbered = sorted(p for p in MIGRATIONS_DIR.glob("*.sql") if upto is None or p.name <= upto)
    instead: dict[str, tuple[Path, list[str]]] = {}
    skipped: set[str] = set()
    for baseline in sorted(BASELINE_DIR.glob("*.sql")) if baselines else []:
        names = _replaces(baseline)
        if upto is not None and names[-1] > upto:
            continue
        if not any(name >= names[0] for name in done):
            instead[names[0]] = (baseline, [*names, f"baseline/{baseline.name}"])
            skipped.update(names)
    steps: list[tuple[Path, list[str]]] = []
    for path in numbered:
        if path.name in done:
            continue
        if path.name in instead:
            steps.append(instead[path.name])
        elif path.name not in skipped:
            steps.append((path, [path.name]))
    return steps


def apply_migrations(url: str, *, baselines: bool = True, upto: str | None = None) -> list[str]:
    """Apply pending migrations; returns the names recorded now (empty when up to date). A
    baseline applied is recorded as the migrations it replaces plus ``baseline/<file>``.
    ``baselines=False`` takes the numbered path only and ``upto`` stops after that file:
    both for tests and staged upgrades, not for normal use."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        if _up_to_date(conn):  # no DDL at all: a role without CREATE may call this safely
            return applied_now
        conn.execute("select pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "create table if not exists keel_migrations ("
                "name text primary key, applied_at timestamptz not null default now())"
            )
            done = {r[0] for r in conn.execute("select name from keel_migrations")}
            for path, names in _plan(done, baselines=baselines, upto=upto):
                with conn.transaction():
                    conn.execute(path.read_text())
                    for name in names:
                        conn.execute("insert into keel_migrations(name) values (%s)", (name,))
                applied_now.extend(names)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now


def _up_to_date(conn: psycopg.Connection[Any]) -> bool:
    """Every numbered migration recorded (a baseline records those it replaces): nothing to
    do, checked without DDL, so the app role (no CREATE) may call ``apply_migrations``."""
    if conn.execute("select to_regclass('keel_migrations')").fetchone() in (None, (None,)):
        return False
    done = {r[0] for r in conn.execute("select name from keel_migrations")}
    return all(p.name in done for p in MIGRATIONS_DIR.glob("*.sql"))


def seed_demo(url: str) -> None:
    """Insert the demo data (``keel/seed/demo.sql``) into a migrated database; idempotent,
    and rows that exist are left as they are."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((SEED_DIR / "demo.sql").read_text())


class Pool(AsyncConnectionPool):
    """psycopg_pool's pool, plus one rule: a connection that comes back broken (the server
    closed it: a restart, a crash, an administrator) means its idle siblings are most likely
    dead too, so the pool checks them all at once (``check()``), before the caller retries.
    Otherwise each Temporal retry of the failed activity is handed the next dead connection
    and a step can run out of attempts on a database that is already back. Healthy traffic
    pays nothing: no check on checkout. Public API only (``putconn``, ``check``, ``broken``).
    """

    async def putconn(self, conn: Any) -> None:
        lost = conn.broken
        await super().putconn(conn)
        if lost:
            await self.check()  # discards the dead idle connections and opens new ones


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> AsyncConnectionPool:
    """Open an autocommit pool; callers open explicit transactions where they need
    atomicity. ``kwargs`` are connection parameters (e.g. ``options``)."""
    pool = Pool(url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True, **kwargs})
    await pool.open(wait=True, timeout=15)
    return pool


async def open_ledger_pool(url: str, **kwargs: Any) -> AsyncConnectionPool:
    """The ledger batcher's own pool: at most ``LEDGER_POOL_SIZE`` connections, one kept open.

    Why not the worker's pool: psycopg_pool hands out its idle connections oldest first, so
    in a pool that grew to serve many activities a lone ledger call lands on the backend that
    has slept the longest. Measured interleaved on the reserve under load on the 2-core VM: the
    20-connection-kind pool cost 0.1-0.5 ms more per call than reusing a warm backend, and a
    pool of two as much as a most-recently-used pool (which needed psycopg_pool internals).
    The batcher never has more than two transactions out, so two connections are enough, and
    both stay warm. Same ``Pool`` class: a broken connection clears its dead siblings."""
    return await open_pool(url, min_size=1, max_size=LEDGER_POOL_SIZE, **kwargs)


def set_app_password(owner_url: str, password: str, role: str = "keel_app") -> None:
    """Give the application role (migration 012) a password, as the schema owner.

    Production workers log in as ``keel_app`` over TCP, where PostgreSQL asks for a password;
    the migration creates the role without one (a password in SQL would sit in every
    database's migration history). The deployment's one-shot migrate job calls this with a
    secret from its environment; workers never receive the owner's credentials.
    """
    if not password:
        raise ValueError(f"no password given for {role}")
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("alter role {} with login password {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
