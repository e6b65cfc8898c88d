"""The worker's connection pool hands out the most recently returned connection first."""

from __future__ import annotations

import pytest

from keel.db import open_pool


async def test_pool_is_lifo(pg_url: str) -> None:
    pool = await open_pool(pg_url, min_size=3, max_size=3)
    try:
        conns = [await pool.getconn() for _ in range(3)]
        for c in conns:  # returned oldest-first: the last one back is the hottest
            await pool.putconn(c)
        again = await pool.getconn()
        assert again is conns[-1]  # a FIFO pool would give conns[0]
        await pool.putconn(again)
        # One caller at a time keeps reusing the same backend.
        pids = set()
        for _ in range(5):
            async with pool.connection() as c:
                pids.add(c.info.backend_pid)
        assert len(pids) == 1
    finally:
        await pool.close()


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
