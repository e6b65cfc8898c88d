"""Holds as leases (migration 009): a PostgreSQL crash may lose a lease hold, never a durable
one, and the commit that follows still records every cent of spend.

This test runs its own PostgreSQL (the session's is shared) and crashes it for real: SIGQUIT
to the postmaster is PostgreSQL's immediate shutdown, which drops WAL still in shared memory,
exactly as a crash does. ``wal_writer_delay`` is raised to 10 s so that the lease hold's WAL
is still there when the crash comes (by default it is written within 200 ms)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.bench_fault import crash_postgres
from keel.activities import ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import CommitRequest, ReservationNotFound, ReserveRequest, scope_path
from keel.db import apply_migrations, open_pool
from keel.devservices import DevServices, free_port
from keel.settings import Settings


@pytest.fixture
def own_pg() -> Iterator[DevServices]:
    state = Path(tempfile.mkdtemp(prefix="keel-lease-"))
    port = free_port()
    services = DevServices(
        Settings(state_dir=state, pg_port=port, database_url=f"postgresql://postgres@127.0.0.1:{port}/keel")
    )
    try:
        services.start_postgres()
        yield services
    finally:
        services.stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


def _keys(url: str, tenant: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as c:
        cur = c.execute("select key from keel_budget_reservations where scopes[1] = %s", (tenant,))
        rows = cur.fetchall()
    return {r[0] for r in rows}


async def test_a_crash_loses_only_lease_holds_and_commits_still_record_the_spend(own_pg: DevServices) -> None:
    url = own_pg.settings.database_url
    apply_migrations(url)
    tenant = f"l{uuid.uuid4().hex[:8]}"
    path = scope_path(tenant, "w", "u", "run1")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("alter system set wal_writer_delay = '10s'")
        c.execute("select pg_reload_conf()")
        c.execute("select keel_budget_set_limit(%s, 1000000, false, 0)", (tenant,))
    await asyncio.sleep(0.5)  # let the WAL writer finish its current (short) sleep

    def req(name: str) -> ReserveRequest:
        return ReserveRequest(key=f"{tenant}/{name}", scopes=path, amount_micros=1_000)

    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        durable = LedgerBatcher(pool, lease_holds=False)
        lease = LedgerBatcher(pool, lease_holds=True)
        await durable.reserve(req("durable"))
        for name in ("lease1", "lease2"):
            assert (await lease.reserve(req(name))).granted_micros == 1_000
    finally:
        await pool.close()
    crash_postgres(own_pg)  # immediate shutdown: no checkpoint, unwritten WAL is gone
    own_pg.start_postgres()  # crash recovery replays what reached the WAL file

    survived = _keys(url, tenant)
    assert f"{tenant}/durable" in survived, "a durable hold must survive a crash"
    lost = {f"{tenant}/lease1", f"{tenant}/lease2"} - survived
    assert lost, "the lease holds were flushed before the crash: they are not leases"

    actual = {"durable": 700, "lease1": 900, "lease2": 1_300}
    pool = await open_pool(url, min_size=1, max_size=2)
    try:
        batcher = LedgerBatcher(pool)
        async with pool.connection() as conn:
            with pytest.raises(ReservationNotFound):  # without the hold's scopes: refused
                await ledger.commit(conn, CommitRequest(key=sorted(lost)[0], actual_micros=1))
        for name, micros in actual.items():
            key = f"{tenant}/{name}"
            done = await batcher.commit(CommitRequest(key=key, actual_micros=micros, scopes=path))
            assert done.committed_micros == micros
            assert done.late == done.lost_hold == (key in lost)
        async with pool.connection() as conn:
            cur = await conn.execute(
                "select scope, spent_micros, reserved_micros from keel_budget_scopes"
                " where scope = any(%s) order by scope",
                (list(path),),
            )
            rows: list[Any] = await cur.fetchall()
            assert [tuple(r[1:]) for r in rows] == [(sum(actual.values()), 0)] * len(path)
            assert await ledger.check_invariant(conn) == []
    finally:
        await pool.close()
