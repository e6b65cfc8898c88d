"""Throughput and scaling: completed agent runs per second with 1 and 2 worker processes.

Each run is the 3-tool demo task (lookup_order -> issue_refund -> send_email) planned by the
offline model, on a fresh order with a small total (no approval). Workers are real
``worker.py`` processes started by ``DevServices.start_workers`` on a task queue of their
own; all runs of a batch are started at once and the clock runs from the first start to
the last result. CPU is the user+system time of the workers, the dev server and PostgreSQL
over the batch (psutil), so "CPU per run" includes the server side of durability.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

__all__ = ["run"]

WARMUP_TIMEOUT_S = 60.0  # a cold worker imports, migrates and connects before it polls


async def _batch(client: Any, pool: Any, tq: str, runs: int, tenant: str, user: str) -> tuple[float, int]:
    from bench.common import demo_request, run_keel

    reqs = [await demo_request(pool, tenant=tenant, user=user) for _ in range(runs)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run_keel(client, tq, r) for r in reqs))
    wall = time.perf_counter() - t0
    ok = sum(1 for resp, _, _ in results if resp.outcome == "completed" and len(resp.steps) == 3)
    return wall, ok


async def run(
    client: Any,
    pool: Any,
    settings: Any,
    *,
    smoke: bool = False,
    worker_counts: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    from bench.common import (
        BENCH_POLICY,
        ProcCpu,
        demo_request,
        postgres_pids,
        run_keel,
        temporal_pids,
        worker_env,
    )
    from keel.devservices import DevServices

    runs = 6 if smoke else 60
    worker_counts = worker_counts or ((1,) if smoke else (1, 2))
    services = DevServices(settings)
    out: dict[str, Any] = {
        "runs_per_batch": runs,
        "task": "lookup_order -> issue_refund -> send_email (offline planner, real tools)",
        "by_workers": {},
    }
    for count in worker_counts:
        tq = f"bench-tp-{count}-{uuid.uuid4().hex[:8]}"
        services.start_workers(count, env=worker_env(settings, tq, BENCH_POLICY))
        try:
            # Warm-up: every worker process imports, connects and fills its caches first.
            warm = [await demo_request(pool) for _ in range(2 * count)]
            await asyncio.wait_for(asyncio.gather(*(run_keel(client, tq, r) for r in warm)), WARMUP_TIMEOUT_S)
            cpu = ProcCpu(
                {
                    "workers": services.worker_pids(),
                    "temporal": temporal_pids(settings),
                    "postgres": postgres_pids(settings),
                }
            )
            wall, ok = await _batch(client, pool, tq, runs, "bench", "bench")
            used = cpu.delta()
        finally:
            services.stop_workers()
        total = sum(used.values())
        out["by_workers"][count] = {
            "runs_per_s": round(ok / wall, 2),
            "wall_s": round(wall, 2),
            "completed": ok,
            "cpu_ms_per_run": {k: round(v * 1000 / max(ok, 1), 1) for k, v in used.items()},
            "cpu_ms_per_run_total": round(total * 1000 / max(ok, 1), 1),
            "server_cpu_share_pct": round(100 * used["temporal"] / total, 1) if total else None,
            "cpu_utilisation_pct_of_all_cores": round(100 * total / (wall * (os.cpu_count() or 1)), 1),
        }
    counts = sorted(out["by_workers"])
    if len(counts) > 1:
        out["scaling"] = round(
            out["by_workers"][counts[-1]]["runs_per_s"] / out["by_workers"][counts[0]]["runs_per_s"], 2
        )
    return out
