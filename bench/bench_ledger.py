"""Budget ledger benchmark: reserve latency and reserve→commit lifecycles/s vs the floor.

The floor is what this database can do at all for a hot row: a single-row ``UPDATE`` +
``COMMIT`` on one shared row, same client counts, measured in the same run. Every client
runs reserve→commit lifecycles over a 5-scope path (tenant, workspace, user, run, model;
tenant, workspace and run limited) whose tenant, workspace and model rows are shared by all
clients: one hot tenant, the worst case.

Clients call the ledger the way a worker's activities do: through one ``LedgerBatcher`` per
process, so concurrent calls share transactions. For contrast, the 32-client point is also
measured ``unbatched`` (one transaction per operation, each client on its own connection):
there every operation holds the tenant row through its own WAL flush, which is what caps it.

Reserve latency has a second floor: a bare ``SELECT 1`` round trip through the same pool, a
psycopg prepared statement as the ledger's calls are, interleaved: ``vs_select1`` is what the ledger's
work costs over the cheapest call this client can make, independent of this machine's load.

Each configuration is measured next to its own floor:
  * ``lease`` (the default): the server's ``synchronous_commit`` (durable), and a transaction
    that only places holds commits without waiting for its flush (``KEEL_LEDGER_HOLDS=lease``,
    migration 009). Every commit and release is durable.
  * ``durable``: the same with ``KEEL_LEDGER_HOLDS=durable``: every hold waits for its flush.
    Reserve latency and the 32-client point only.
  * ``off``: ``synchronous_commit=off`` on the benchmark's sessions for everything (a
    PostgreSQL or OS crash, not an application crash, can lose the last few hundred
    milliseconds of commits): what the ledger costs without any flush.

    python bench/bench_ledger.py --url postgresql://postgres@127.0.0.1:55432/keel [--smoke]

Leaves its reservations in the ledger (they are real history); drops its floor table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from keel.activities import ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import CommitRequest, CommitResult, ReserveRequest, ReserveResult, model_scope, scope_path
from keel.db import apply_migrations, open_ledger_pool

__all__ = ["run"]

CLIENTS = (1, 8, 32)
TARGET_P50_MS = 1.0
TARGET_LIFECYCLES_32 = 1_500
LATENCY_ROUNDS = 10
CONFIGS = (("lease", "", True), ("durable", "", False), ("off", "off", True))
"""(label, the sessions' synchronous_commit ("" = the server's), holds as leases)."""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _connect(url: str, sync_commit: str = "") -> psycopg.AsyncConnection[Any]:
    options = f"-c synchronous_commit={sync_commit}" if sync_commit else ""
    return await psycopg.AsyncConnection.connect(url, autocommit=True, options=options)


class _Direct:
    """One operation per transaction, one connection per client (the unbatched contrast). Same
    statements and client path as a batcher's lone call (``ledger.run_op``): only batching
    differs."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], lease: bool) -> None:
        self.conn = conn
        self.lease = lease

    async def _run(self, req: ReserveRequest | CommitRequest) -> dict[str, Any]:
        answer = await ledger.run_op(self.conn, ledger.batch_op(req), lease=self.lease)
        error = ledger.answer_error(answer)
        if error is not None:
            raise error
        return answer

    async def reserve(self, req: ReserveRequest) -> Any:
        return ReserveResult.model_validate(await self._run(req))

    async def commit(self, req: CommitRequest) -> Any:
        return CommitResult.model_validate(await self._run(req))


async def _lifecycles(
    callers: list[Any],
    tenant: str,
    tag: str,
    seconds: float,
    timings: list[float] | None = None,
    key_tag: str = "",
) -> int:
    """Every client loops reserve→commit until the deadline; returns completed lifecycles.
    ``tag`` names the run scopes, ``key_tag`` (default ``tag``) the idempotency keys."""
    deadline = time.perf_counter() + seconds
    done = 0

    async def client(i: int, via: Any) -> None:
        nonlocal done
        scopes = (
            *scope_path(tenant, "bench", f"u{i}", f"{tag}-{i}"),
            model_scope(tenant, "openai:gpt-4o-mini"),
        )
        n = 0
        while time.perf_counter() < deadline:
            key = f"{tenant}/{key_tag or tag}/{i}/{n}"
            t0 = time.perf_counter()
            await via.reserve(
                ReserveRequest(key=key, scopes=scopes, amount_micros=900, max_tokens=1024, subject="bench")
            )
            if timings is not None:
                timings.append((time.perf_counter() - t0) * 1000)
            await via.commit(CommitRequest(key=key, actual_micros=700, scopes=scopes))
            n += 1
        done += n

    await asyncio.gather(*(client(i, c) for i, c in enumerate(callers)))
    return done


async def _floor(
    conns: list[psycopg.AsyncConnection[Any]],
    table: str,
    seconds: float,
    timings: list[float] | None = None,
) -> int:
    """Single-row UPDATE+COMMIT round trips until the deadline (timed like a reserve when
    ``timings`` is given); returns how many."""
    deadline = time.perf_counter() + seconds
    done = 0

    async def client(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await conn.execute(f"update {table} set n = n + 1 where id = 1")  # autocommit
            if timings is not None:
                timings.append((time.perf_counter() - t0) * 1000)
            n += 1
        done += n

    await asyncio.gather(*(client(c) for c in conns))
    return done


async def _select1(pool: AsyncConnectionPool, seconds: float, timings: list[float]) -> None:
    """Bare ``SELECT 1`` round trips through the pool, as a psycopg prepared statement (what
    ``ledger.execute`` sends), timed like a reserve."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        async with pool.connection() as conn:
            await (await conn.execute("select 1", prepare=True)).fetchone()
        timings.append((time.perf_counter() - t0) * 1000)


async def _pool(url: str, mode: str) -> AsyncConnectionPool:
    """The worker's ledger pool (``keel.db.open_ledger_pool``: autocommit, two connections)."""
    return await open_ledger_pool(url, **({"options": f"-c synchronous_commit={mode}"} if mode else {}))


async def run(url: str, smoke: bool = False, owner_url: str | None = None) -> dict[str, Any]:
    """Measure and return the figures (also used by the aggregate benchmark report).

    ``url`` is the role measured (the app role ``keel_app`` under the dev services);
    ``owner_url`` migrates and creates the floor table (the app role has no CREATE)."""
    owner_url = owner_url or url
    apply_migrations(owner_url)
    seconds = 1.0 if smoke else 5.0
    tenant = f"bench{uuid.uuid4().hex[:8]}"
    table = f"keel_bench_floor_{uuid.uuid4().hex[:8]}"
    admin = await _connect(url)
    # Limited (so every decision checks them) but roomy: tenant, workspace and each run.
    await ledger.set_limit(admin, tenant, 10**15)
    await ledger.set_limit(admin, f"{tenant}/ws:bench", 10**14)
    async with await psycopg.AsyncConnection.connect(owner_url, autocommit=True) as owner:
        await owner.execute(f"create table {table} (id int primary key, n bigint not null)")
        await owner.execute(f"grant select, insert, update, delete on {table} to public")
    await admin.execute(f"insert into {table} values (1, 0)")
    sync_commit = (await (await admin.execute("show synchronous_commit")).fetchone() or ("?",))[0]
    out: dict[str, Any] = {
        "smoke": smoke,
        "seconds_per_point": seconds,
        "synchronous_commit": sync_commit,
        "reserve_ms": {},
        "points": [],
    }

    async def limit_runs(tag: str, clients: int) -> None:
        for i in range(clients):
            run_scope = scope_path(tenant, "bench", f"u{i}", f"{tag}-{i}")[-1]
            await ledger.set_limit(admin, run_scope, 10**12)

    try:
        for label, mode, lease in CONFIGS:
            pool = await _pool(url, mode)
            try:
                # Latency: one client, sequential lifecycles (warm-up first: prepared
                # statements), in rounds interleaved with the floor's UPDATE+COMMIT so that
                # this machine's drift hits both alike.
                batcher = LedgerBatcher(pool, lease_holds=lease)
                await limit_runs(f"lat{label}", 1)
                await _lifecycles([batcher], tenant, f"lat{label}", 0.3, key_tag=f"warm{label}")
                timings: list[float] = []
                floor_ms: list[float] = []
                select1_ms: list[float] = []
                floor_conn = await _connect(url, mode)
                try:
                    for r in range(LATENCY_ROUNDS):
                        slot = seconds / LATENCY_ROUNDS
                        await _lifecycles([batcher], tenant, f"lat{label}", slot, timings, f"lat{label}r{r}")
                        await _floor([floor_conn], table, slot / 2, floor_ms)
                        await _select1(pool, slot / 2, select1_ms)
                finally:
                    await floor_conn.close()
                p50 = statistics.median(timings)
                floor_p50 = statistics.median(floor_ms)
                select1_p50 = statistics.median(select1_ms)
                out["reserve_ms"][label] = {
                    "synchronous_commit": mode or sync_commit,
                    "p50": round(p50, 3),
                    "p99": round(_pct(timings, 0.99), 3),
                    "n": len(timings),
                    "floor_p50": round(floor_p50, 3),
                    "vs_floor": round(p50 / floor_p50, 2),
                    "select1_p50": round(select1_p50, 3),
                    "vs_select1": round(p50 / select1_p50, 2),
                }
                points = [(c, "batched") for c in CLIENTS] + [(CLIENTS[-1], "unbatched")]
                if label == "durable":
                    points = [(CLIENTS[-1], "batched")]
                for clients, how in points:
                    conns = [await _connect(url, mode) for _ in range(clients)]
                    try:
                        await _floor(conns, table, 0.2)
                        floor = await _floor(conns, table, seconds) / seconds
                        batcher = LedgerBatcher(pool, lease_holds=lease)
                        callers: list[Any] = (
                            [batcher] * clients if how == "batched" else [_Direct(c, lease) for c in conns]
                        )
                        tag = f"{how[0]}{clients}{label}"
                        await limit_runs(tag, clients)
                        await _lifecycles(callers, tenant, f"w{tag}", 0.2)
                        ops0, batches0 = batcher.operations, batcher.batches
                        life = await _lifecycles(callers, tenant, tag, seconds) / seconds
                    finally:
                        for c in conns:
                            await c.close()
                    batches = batcher.batches - batches0
                    out["points"].append(
                        {
                            "config": label,
                            "clients": clients,
                            "calls": how,
                            "lifecycles_per_s": round(life),
                            "floor_updates_per_s": round(floor),
                            "ratio_vs_floor": round(life / floor, 3),
                            "ops_per_transaction": round((batcher.operations - ops0) / batches, 1)
                            if batches
                            else 1.0,
                        }
                    )
            finally:
                await pool.close()
        out["invariant_violations"] = await ledger.check_invariant(admin)
    finally:
        await admin.close()
        async with await psycopg.AsyncConnection.connect(owner_url, autocommit=True) as owner:
            await owner.execute(f"drop table if exists {table}")
    out["targets_met"] = {
        label: {
            "reserve_p50_at_most_1ms": lat["p50"] <= TARGET_P50_MS,
            "lifecycles_32_at_least_1500": next(
                p["lifecycles_per_s"]
                for p in out["points"]
                if p["clients"] == 32 and p["config"] == label and p["calls"] == "batched"
            )
            >= TARGET_LIFECYCLES_32,
        }
        for label, lat in out["reserve_ms"].items()
    }
    out["targets_met"]["zero_violations"] = not out["invariant_violations"]
    return out


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"reserve latency, 1 client, {label} (synchronous_commit={lat['synchronous_commit']}): "
        f"p50 {lat['p50']} ms, "
        f"p99 {lat['p99']} ms (n={lat['n']}); floor UPDATE+COMMIT p50 {lat['floor_p50']} ms "
        f"(reserve = {lat['vs_floor']}x); SELECT 1 through the pool p50 {lat.get('select1_p50')} ms "
        f"(reserve = {lat.get('vs_select1')}x)"
        for label, lat in r["reserve_ms"].items()
    ]
    lines += [
        "",
        "| config | clients | calls | lifecycles/s | floor UPDATE+COMMIT/s | vs floor"
        " | ops per transaction |",
        "|--|--:|--|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {p['config']} | {p['clients']} | {p['calls']} | {p['lifecycles_per_s']} | "
        f"{p['floor_updates_per_s']} | {p['ratio_vs_floor']} | {p['ops_per_transaction']} |"
        for p in r["points"]
    ]
    lines += ["", f"invariant violations: {len(r['invariant_violations'])}; targets: {r['targets_met']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="PostgreSQL URL of the role to measure")
    parser.add_argument("--owner-url", help="the schema owner (migrations, the floor table); default --url")
    parser.add_argument("--smoke", action="store_true", help="1 s per point instead of 5 s")
    parser.add_argument("--json", action="store_true", help="print the raw figures too")
    args = parser.parse_args()
    result = asyncio.run(run(args.url, smoke=args.smoke, owner_url=args.owner_url))
    print(_markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
