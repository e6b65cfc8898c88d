"""The worker's connection pool: psycopg_pool's, and a lost connection clears every dead one."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from keel.db import Pool, open_pool


def test_the_pool_builds_on_public_api_only() -> None:
    """The worker's pool is psycopg_pool's, with one public method overridden: no private
    attribute of psycopg or psycopg_pool that a release could change under us."""
    own = {n for n in vars(Pool) if not (n.startswith("__") and n.endswith("__"))}
    assert own == {"putconn"}
    assert all(not n.startswith("_") and callable(getattr(AsyncConnectionPool, n)) for n in own)


async def test_one_lost_connection_clears_every_dead_one_from_the_pool(pg_url: str) -> None:
    """After a database restart every idle connection in the pool is dead. Without a check,
    each retry of a failed activity is handed the next dead one (5 attempts of a refund burned
    on 5 dead connections in the fault test), so the step fails although the database is
    back. One caller meeting a lost connection must clear them all."""
    import psycopg

    pool = await open_pool(pg_url, min_size=4, max_size=4)
    try:
        conns = [await pool.getconn() for _ in range(4)]
        pids = [c.info.backend_pid for c in conns]
        for c in conns:
            await pool.putconn(c)
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            await admin.execute("select pg_terminate_backend(pid) from unnest(%s::int[]) pid", (pids,))
        with pytest.raises(psycopg.OperationalError):  # the first caller meets a dead one
            async with pool.connection() as c:
                await c.execute("select 1")
        for _ in range(4):  # every later caller gets a live connection
            async with pool.connection() as c:
                await c.execute("select 1")
                assert c.info.backend_pid not in pids
    finally:
        await pool.close()


def test_the_app_role_gets_a_password_from_the_owner(owner_pg_url: str) -> None:
    """The compose migrate job's last step: keel_app can then log in over TCP with it."""
    import psycopg

    from keel.db import set_app_password

    with pytest.raises(ValueError, match="no password"):
        set_app_password(owner_pg_url, "")
    set_app_password(owner_pg_url, "s3cret-'quoted")  # quoted as a literal, not spliced
    with psycopg.connect(owner_pg_url) as conn:
        row = conn.execute("select rolpassword from pg_authid where rolname = 'keel_app'").fetchone()
        assert row is not None and row[0] and row[0].startswith("SCRAM-SHA-256$")
        conn.execute("alter role keel_app password null")
