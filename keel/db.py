"""PostgreSQL access: one async pool per process, and ordered SQL migrations.

Migrations are plain ``keel/migrations/NNN_name.sql`` files applied in name order, each once,
under an advisory lock so that several workers starting together do not race. Workers apply
them on start (so a production worker needs no separate step) and ``dev up`` applies them for
the embedded default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["apply_migrations", "open_pool", "Pool", "MIGRATIONS_DIR"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7_345_001  # arbitrary advisory-lock id owned by Keel's migrator


def apply_migrations(url: str) -> list[str]:
    """Apply pending migrations; returns the names applied now (empty when up to date)."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "create table if not exists keel_migrations ("
                "name text primary key, applied_at timestamptz not null default now())"
            )
            done = {r[0] for r in conn.execute("select name from keel_migrations")}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())  # type: ignore[arg-type]
                    conn.execute("insert into keel_migrations(name) values (%s)", (path.name,))
                applied_now.append(path.name)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now


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
