"""The worker's connection pool hands out the most recently returned connection first."""

from __future__ import annotations

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
