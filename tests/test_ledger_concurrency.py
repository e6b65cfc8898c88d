"""The ledger under real concurrency: several OS processes, each with its own connections.

Every worker process runs ``_WORKER`` (below) with ``python -c``, so nothing is shared but
the database, exactly as between Keel workers on different machines. With ``batched`` in its
config, a process's clients share one ``LedgerBatcher`` (as a worker's activities do), so
batched transactions race single-operation ones from the other processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from keel.activities.ledger import run_sweeper

ROOT = Path(__file__).resolve().parent.parent

_WORKER = r"""
import asyncio, json, random, sys, time
import psycopg
from psycopg_pool import AsyncConnectionPool
from keel.activities import ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import *

class Direct:
    def __init__(self, c):
        self.reserve = lambda req: ledger.reserve(c, req)
        self.commit = lambda req: ledger.commit(c, req)
        self.release = lambda req: ledger.release(c, req)

async def main(url, mode, cfg):
    rng = random.Random(cfg.get("seed", 0))
    out = []
    order = list(cfg.get("keys", ())); rng.shuffle(order)
    batcher = None
    if cfg.get("batched"):
        pool = AsyncConnectionPool(url, min_size=1, max_size=3, open=False,
                                   kwargs={"autocommit": True})
        await pool.open(wait=True)
        batcher = LedgerBatcher(pool)
    async def client(i):
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
            api = batcher or Direct(c)
            if mode == "hammer":
                for n in range(cfg["ops"]):
                    key = f"{cfg['prefix']}/c{i}/{n}"
                    amt = rng.randint(1, cfg["max_amount"])
                    r = await api.reserve(ReserveRequest(key=key, scopes=cfg["scopes"],
                        amount_micros=amt, min_micros=rng.choice([0, amt // 2]), ttl_seconds=1))
                    if r.granted_micros == 0:
                        continue
                    roll = rng.random()
                    if roll < cfg["p_abandon"]:
                        continue  # a worker "dies": the lease must expire
                    if roll < cfg["p_abandon"] + cfg["p_release"]:
                        await api.release(ReleaseRequest(key=key))
                    else:
                        await api.commit(CommitRequest(key=key,
                            actual_micros=rng.randint(0, r.granted_micros)))
            elif mode == "same_key":
                keys = list(cfg["keys"]); rng.shuffle(keys)
                for key in keys:
                    r = await api.reserve(ReserveRequest(key=key, scopes=cfg["scopes"],
                        amount_micros=cfg["amount"]))
                    out.append(r.model_dump(mode="json"))
            elif mode in ("commit", "release"):
                for key in order[i::cfg["clients"]]:
                    try:
                        if mode == "commit":
                            r = await api.commit(CommitRequest(
                                key=key, actual_micros=cfg["actual"]))
                        else:
                            r = await api.release(ReleaseRequest(key=key))
                        out.append({"key": key, "ok": True, **r.model_dump(mode="json")})
                    except ReservationClosed:
                        out.append({"key": key, "ok": False})
            elif mode == "hold":
                await ledger.reserve(c, ReserveRequest(key=cfg["key"], scopes=cfg["scopes"],
                    amount_micros=cfg["amount"], ttl_seconds=1))
                print("held", flush=True)
                await asyncio.sleep(3600)
            elif mode in ("naive", "ledger_slow"):
                await asyncio.sleep(max(0.0, cfg["start_at"] - time.time()))
                granted = 0
                for n in range(10_000):
                    if mode == "naive":  # read, decide, call the model, then write
                        cur = await c.execute("select limit_micros, spent_micros from"
                                              " ledger_test_naive where id = %s", (cfg["id"],))
                        limit, spent = await cur.fetchone()
                        if spent + cfg["amount"] > limit:
                            break
                        await asyncio.sleep(cfg["work"])
                        await c.execute("update ledger_test_naive set spent_micros ="
                                        " spent_micros + %s where id = %s",
                                        (cfg["amount"], cfg["id"]))
                    else:
                        key = f"{cfg['prefix']}/c{i}/{n}"
                        r = await ledger.reserve(c, ReserveRequest(key=key, scopes=cfg["scopes"],
                                                 amount_micros=cfg["amount"]))
                        if r.granted_micros == 0:
                            break
                        await asyncio.sleep(cfg["work"])
                        await ledger.commit(c, CommitRequest(key=key, actual_micros=cfg["amount"]))
                    granted += cfg["amount"]
                out.append(granted)
    await asyncio.gather(*(client(i) for i in range(cfg["clients"])))
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


def _spawn(url: str, mode: str, cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, url, mode, json.dumps(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_all(url: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Start every job at once, wait for all; each returns the JSON it printed last."""
    procs = [_spawn(url, mode, cfg) for mode, cfg in jobs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _scope_row(url: str, scope: str) -> tuple[int | None, int, int]:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "select limit_micros, spent_micros, reserved_micros from keel_budget_scopes where scope = %s",
            (scope,),
        ).fetchone()
    assert row is not None
    return row


def _violations(url: str, tenant: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as c:
        return [r[0] for r in c.execute("select * from keel_check_invariant()") if tenant in r[0]]


def _drain_expired(url: str, tenant: str) -> None:
    """Wait out the tenant's last lease on the database clock, then sweep."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "select extract(epoch from max(expires_at) - now()) from"
            " keel_budget_reservations where scopes @> array[%s]::text[]"
            " and status = 'held'",
            (tenant,),
        ).fetchone()
        if row and row[0] is not None:
            time.sleep(max(0.0, float(row[0])) + 0.05)
        c.execute("select keel_budget_sweep(100000)")
        held = c.execute(
            "select count(*) from keel_budget_reservations where status = 'held'"
            " and scopes @> array[%s]::text[]",
            (tenant,),
        ).fetchone()
    assert held == (0,)


@settings(
    max_examples=3,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    limit=st.integers(1_000, 8_000),
    max_amount=st.integers(500, 3_000),
    p_abandon=st.sampled_from([0.0, 0.15]),
    p_release=st.sampled_from([0.1, 0.4]),
)
def test_processes_hammering_one_limit_never_overspend(
    pg_url: str, limit: int, max_amount: int, p_abandon: float, p_release: float
) -> None:
    tenant = f"h{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("select keel_budget_set_limit(%s, %s, false, null)", (tenant, limit))
    jobs = [
        (
            "hammer",
            {
                "scopes": [f"{tenant}/ws:w/user:u{p}/run:r{p}"],
                "ops": 25,
                "prefix": f"{tenant}/p{p}",
                "clients": 3,
                "seed": p,
                "batched": p % 2 == 0,
                "max_amount": max_amount,
                "p_abandon": p_abandon,
                "p_release": p_release,
            },
        )
        for p in range(3)
    ]
    procs = [_spawn(pg_url, mode, cfg) for mode, cfg in jobs]
    while any(p.poll() is None for p in procs):  # invariant holds at every instant we look
        assert _violations(pg_url, tenant) == []
        time.sleep(0.1)
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    _, spent, _ = _scope_row(pg_url, tenant)
    assert spent <= limit
    with psycopg.connect(pg_url, autocommit=True) as c:
        denied = c.execute(
            "select count(*) from keel_budget_reservations where status ="
            " 'denied' and scopes @> array[%s]::text[]",
            (tenant,),
        ).fetchone()
    assert denied is not None and denied[0] > 0, "the limit must actually have bound"
    _drain_expired(pg_url, tenant)
    assert _scope_row(pg_url, tenant)[2] == 0
    assert _violations(pg_url, tenant) == []


def test_same_key_retries_make_exactly_one_reservation(pg_url: str) -> None:
    tenant = f"s{uuid.uuid4().hex[:10]}"
    keys = [f"{tenant}/wf/step{i}" for i in range(20)]
    cfg = {"scopes": [tenant], "keys": keys, "amount": 7, "clients": 2}
    answers = [
        a
        for out in _run_all(
            pg_url, [("same_key", {**cfg, "seed": s, "batched": s % 2 == 0}) for s in range(4)]
        )
        for a in out
    ]
    assert len(answers) == 4 * 2 * len(keys)
    for key in keys:
        mine = [a for a in answers if a["key"] == key]
        assert sum(not a["replayed"] for a in mine) == 1
        assert len({json.dumps({**a, "replayed": 0}, sort_keys=True) for a in mine}) == 1
    with psycopg.connect(pg_url, autocommit=True) as c:
        n = c.execute(
            "select count(*) from keel_budget_reservations where key like %s", (f"{tenant}/%",)
        ).fetchone()
    assert n == (len(keys),)
    assert _scope_row(pg_url, tenant)[2] == 7 * len(keys)
    assert _violations(pg_url, tenant) == []


def test_commit_release_race_has_exactly_one_winner(pg_url: str) -> None:
    tenant = f"r{uuid.uuid4().hex[:10]}"
    keys = [f"{tenant}/wf/step{i}" for i in range(40)]
    _run_all(pg_url, [("same_key", {"scopes": [tenant], "keys": keys, "amount": 10, "clients": 1})])
    commits, releases = _run_all(
        pg_url,
        [
            ("commit", {"keys": keys, "actual": 9, "clients": 2, "seed": 1, "batched": True}),
            ("release", {"keys": keys, "clients": 2, "seed": 2}),
        ],
    )
    by_key_c = {r["key"]: r for r in commits}
    by_key_r = {r["key"]: r for r in releases}
    winners = {"commit": 0, "release": 0}
    for key in keys:
        c, r = by_key_c[key], by_key_r[key]
        commit_won = c["ok"]
        release_won = r["released_micros"] > 0
        assert commit_won != release_won, (c, r)
        if commit_won:
            assert r["status"] == "committed"
        winners["commit" if commit_won else "release"] += 1
    _, spent, reserved = _scope_row(pg_url, tenant)
    assert (spent, reserved) == (9 * winners["commit"], 0)
    assert _violations(pg_url, tenant) == []


async def test_sigkilled_holder_is_swept(pg_url: str, db_pool: AsyncConnectionPool) -> None:
    tenant = f"k{uuid.uuid4().hex[:10]}"
    cfg = {"key": f"{tenant}/wf/s1", "scopes": [tenant], "amount": 500, "clients": 1}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER,
        pg_url,
        "hold",
        json.dumps(cfg),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"held"
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert _scope_row(pg_url, tenant)[2] == 500
    stop = asyncio.Event()
    sweeper = asyncio.create_task(run_sweeper(db_pool, interval_seconds=0.2, stop=stop))
    try:
        deadline = time.monotonic() + 15
        while _scope_row(pg_url, tenant)[2] != 0:
            assert time.monotonic() < deadline, "the sweeper never returned the dead hold"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await sweeper
    with psycopg.connect(pg_url, autocommit=True) as c:
        status = c.execute(
            "select status from keel_budget_reservations where key = %s", (cfg["key"],)
        ).fetchone()
    assert status == ("expired",)
    assert _violations(pg_url, tenant) == []


def test_naive_counter_runs_away_but_the_ledger_does_not(pg_url: str, owner_pg_url: str) -> None:
    tenant = f"n{uuid.uuid4().hex[:10]}"
    amount, limit = 100, 2_000
    with psycopg.connect(owner_pg_url, autocommit=True) as c:  # test scaffolding: the owner's DDL
        c.execute(
            "create table if not exists ledger_test_naive (id text primary key,"
            " limit_micros bigint not null, spent_micros bigint not null)"
        )
        c.execute("grant select, insert, update, delete on ledger_test_naive to keel_app")
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("insert into ledger_test_naive values (%s, %s, 0)", (tenant, limit))
        c.execute("select keel_budget_set_limit(%s, %s, false, null)", (tenant, limit))
    start_at = time.time() + 1.5  # let every process connect, then start together
    common = {"amount": amount, "work": 0.02, "clients": 4, "start_at": start_at}
    jobs = [("naive", {**common, "id": tenant}) for _ in range(3)]
    jobs += [("ledger_slow", {**common, "scopes": [tenant], "prefix": f"{tenant}/p{p}"}) for p in range(3)]
    results = _run_all(pg_url, jobs)
    naive_granted = sum(sum(r) for r in results[:3])
    ledger_granted = sum(sum(r) for r in results[3:])
    with psycopg.connect(pg_url, autocommit=True) as c:
        (naive_spent,) = c.execute(
            "select spent_micros from ledger_test_naive where id = %s", (tenant,)
        ).fetchone() or (0,)
    assert naive_spent == naive_granted > limit, "the read-then-write counter overspends"
    _, spent, reserved = _scope_row(pg_url, tenant)
    assert spent == ledger_granted == limit and reserved == 0
    assert _violations(pg_url, tenant) == []
