"""PostgreSQL access: one async pool per process, and ordered SQL migrations.

Migrations are plain ``keel/migrations/NNN_name.sql`` files applied in name order, each once,
under an advisory lock so that several workers starting together do not race. Workers apply
them on start (so a production worker needs no separate step) and ``dev up`` applies them for
the embedded default.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["apply_migrations", "open_pool", "MIGRATIONS_DIR"]

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


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> AsyncConnectionPool:
    """Open an autocommit pool; callers open explicit transactions where they need atomicity."""
    pool = AsyncConnectionPool(
        url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True, timeout=15)
    return pool
