"""Per-step overhead: a controlled Keel agent step against the bare Temporal floor.

A Keel step is what ``AgentWorkflow`` does for every plan step: the gate, pure, in the
workflow, then ONE ``run_tool`` call that makes its decision durable and acts. ``noop`` is a
quick in-process tool, so since patch ``keel-23-local-tools`` that call is a LOCAL activity
in the workflow task that decided it (``keel``), but for the run's first step, which stays an
activity (it ends the task the run began in); ``keel_activity`` runs the same steps with
``noop`` declared ``local=False``, the path of MCP, sandboxed and rate-limited tools: an
activity each. Either way ``run_tool`` acts in two
PostgreSQL transactions and two pipelined round trips (the key's record and the breaker's
state read and, with no record, the permission audit row and the budget hold committed
without a WAL flush of their own, all in one function call, then COMMIT AND CHAIN into the
effect's transaction, its key lock and second look-up; the tool, then its ``tool_effects`` row
with the ledger commit in one statement, and COMMIT), then the rules. The
floor is a bare workflow executing one trivial activity per step; ``floor+LA``
adds one trivial local activity per step, i.e. the same Temporal shape as a Keel step with
none of its work. All three run on the same dev server in the same run, interleaved.

Per-step cost is the difference between runs of N=10 and N=1 steps divided by 9, so the
fixed cost of a run (prepare, plan, evaluate, finish; or workflow start/finish) is reported
separately; history timestamps give the per-step distribution and where the time goes.

This module is also a workflow module: it imports nothing heavy at the top (the workflow
sandbox re-imports it for every run).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow

__all__ = ["FloorInput", "FloorWorkflow", "run"]

FLOOR_TIMEOUT = timedelta(seconds=10)  # trivial work; a slow one means a stuck server
TARGET_RATIO = 1.3
"""Issue 23: a controlled step costs at most 1.3x a bare activity round trip."""
COMMIT_RUNS = 3
STATS_FLUSH_S = 11.0  # PostgreSQL flushes an idle backend's statistics within 10 s


@dataclass(frozen=True)
class FloorInput:
    steps: int
    local: bool = False
    """Also run one trivial local activity per step (the Temporal shape of a Keel step)."""


@activity.defn(name="bench_floor_step")
async def floor_step(i: int) -> int:
    return i


@activity.defn(name="bench_floor_gate")
async def floor_gate(i: int) -> int:
    return i


@workflow.defn(name="BenchFloorWorkflow")
class FloorWorkflow:
    @workflow.run
    async def run(self, inp: FloorInput) -> int:
        for i in range(inp.steps):
            if inp.local:
                await workflow.execute_local_activity(floor_gate, i, start_to_close_timeout=FLOOR_TIMEOUT)
            await workflow.execute_activity(floor_step, i, start_to_close_timeout=FLOOR_TIMEOUT)
        return inp.steps


async def _floor(client: Any, tq: str, steps: int, local: bool) -> tuple[float, str]:
    wid = f"bench-floor-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    await client.execute_workflow(
        FloorWorkflow.run, FloorInput(steps=steps, local=local), id=wid, task_queue=tq
    )
    return time.perf_counter() - t0, wid


def _keep(big_ids: dict[str, list[str]], small_id: dict[str, str], kind: str, wid: str, *, big: bool) -> None:
    if big:
        big_ids[kind].append(wid)
    else:
        small_id[kind] = wid


async def _pg_commits(pool: Any) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute("select xact_commit from pg_stat_database where datname = current_database()")
        ).fetchone()
    return int(row[0]) if row else 0


class _CodecClock:
    """Times the client's payload codec (worker and starter share it in this process).

    The codec is CPU-only with no await inside, so wall time around each call is its cost
    even with other tasks on the loop. Floor runs go through it too (same client), so the
    Keel/floor ratio is unaffected; this isolates what encryption adds to a Keel step.
    """

    def __init__(self, codec: Any) -> None:
        self.seconds, self.payloads = 0.0, 0
        if codec is None:
            return
        for name in ("encode", "decode"):
            setattr(codec, name, self._timed(getattr(codec, name)))

    def _timed(self, fn: Any) -> Any:
        async def timed(payloads: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(payloads)
            finally:
                self.seconds += time.perf_counter() - t0
                self.payloads += len(payloads)

        return timed

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.payloads


async def _codec_micro(codec: Any, repeat: int = 2000) -> dict[str, float]:
    """Encode + decode of one step-sized payload (a ToolCall-like JSON document), in µs."""
    from temporalio.api.common.v1 import Payload

    if codec is None:
        return {}
    body = b'{"tool":"noop","args":{"note":"x"},"workflow_id":"agent/bench/r-0123456789","step_id":"s1"}' * 4
    payload = Payload(metadata={"encoding": b"json/plain"}, data=body)
    t0 = time.perf_counter()
    for _ in range(repeat):
        await codec.decode(await codec.encode([payload]))
    return {"round_trip_us": round((time.perf_counter() - t0) * 1e6 / repeat, 1), "bytes": len(body)}


def _workflow_code_ms(settings: Any, repeat: int = 300) -> dict[str, float]:
    """CPU of the pure per-step decisions the workflow makes, outside the sandbox (ms/step)."""
    from keel.activities.tools.loader import catalog
    from keel.gate import check_tool_call
    from keel.policy import Policy, load_policy

    snapshot = load_policy(settings.policy_file).model_dump(mode="json")
    noop = next(t for t in catalog(include_hidden=True) if t.name == "noop")
    t0 = time.perf_counter()
    for _ in range(repeat):
        policy = Policy.model_validate(snapshot)
    t1 = time.perf_counter()
    for i in range(repeat):
        check_tool_call(policy, "bench", "bench", (), noop, {"note": str(i)}, {})
    t2 = time.perf_counter()
    return {
        "policy_model_validate": round((t1 - t0) * 1000 / repeat, 3),
        "check_tool_call": round((t2 - t1) * 1000 / repeat, 3),
    }


async def run(client: Any, pool: Any, settings: Any, *, smoke: bool = False) -> dict[str, Any]:
    """Measure per-step latency of Keel vs floor; returns figures and a breakdown."""
    from temporalio.worker import Worker

    from bench.common import (
        event_counts,
        history_breakdown,
        keel_worker,
        noop_request,
        run_keel,
        spread,
    )

    rounds = 2 if smoke else 12
    big = 3 if smoke else 10
    tq = f"bench-step-{uuid.uuid4().hex[:8]}"
    kinds = ("keel", "keel_activity", "floor", "floor_la")
    wall: dict[str, dict[int, list[float]]] = {k: {1: [], big: []} for k in kinds}
    wids: dict[str, list[str]] = {k: [] for k in kinds}
    small_wid: dict[str, str] = {}
    timings: dict[str, list[float]] = {}
    codec = getattr(client.data_converter, "payload_codec", None)
    clock = _CodecClock(codec)
    codec_runs: dict[int, list[tuple[float, int]]] = {1: [], big: []}
    floor_worker = Worker(
        client,
        task_queue=tq + "-floor",
        workflows=[FloorWorkflow],
        activities=[floor_step, floor_gate],
        max_cached_workflows=1000,
    )
    async with keel_worker(client, pool, settings, tq, timings=timings), floor_worker:
        # Warm-up: first runs pay for imports, sandbox preparation and cache misses.
        for _ in range(1 if smoke else 2):
            await run_keel(client, tq, noop_request(2))
            await run_keel(client, tq, noop_request(2, activity=True))
            await _floor(client, tq + "-floor", 2, False)
            await _floor(client, tq + "-floor", 2, True)
        for _ in range(rounds):
            for n in (1, big):
                before = clock.snapshot()
                resp, secs, wid = await run_keel(client, tq, noop_request(n))
                after = clock.snapshot()
                codec_runs[n].append((after[0] - before[0], after[1] - before[1]))
                for kind, r in (("keel", resp), ("keel_activity", None)):
                    if r is None:
                        r, secs, wid = await run_keel(client, tq, noop_request(n, activity=True))
                    if r.outcome != "completed" or len(r.steps) != n:
                        raise RuntimeError(
                            f"bench run did not complete its {n} steps: {r.outcome} {r.reason}"
                        )
                    wall[kind][n].append(secs)
                    _keep(wids, small_wid, kind, wid, big=n == big)
                for kind, local in (("floor", False), ("floor_la", True)):
                    secs, wid = await _floor(client, tq + "-floor", n, local)
                    wall[kind][n].append(secs)
                    _keep(wids, small_wid, kind, wid, big=n == big)
        commits = None
        if not smoke:
            # Database transactions per Keel step. Idle backends report their statistics
            # up to 10 s late, so each count waits for that flush.
            counts = []
            for n in (None, 1, big):
                if n:
                    for _ in range(COMMIT_RUNS):
                        await run_keel(client, tq, noop_request(n))
                await asyncio.sleep(STATS_FLUSH_S)
                counts.append(await _pg_commits(pool))
            extra = (counts[2] - counts[1]) - (counts[1] - counts[0])
            commits = extra / (COMMIT_RUNS * (big - 1))

    out: dict[str, Any] = {"steps_small": 1, "steps_big": big, "rounds": rounds}
    for kind in kinds:
        t1, tb = wall[kind][1], wall[kind][big]
        per_step = [(b - a) * 1000 / (big - 1) for a, b in zip(t1, tb, strict=True)]
        med_step = (statistics.median(tb) - statistics.median(t1)) * 1000 / (big - 1)
        fixed = statistics.median(t1) * 1000 - med_step
        activity_name = "run_tool" if kind.startswith("keel") else "bench_floor_step"
        parts: dict[str, list[float]] = {}
        for wid in wids[kind]:
            for key, vals in (await history_breakdown(client, wid, activity_name)).items():
                parts.setdefault(key, []).extend(vals)
        counts = await event_counts(client, wids[kind][-1])
        small = await event_counts(client, small_wid[kind])
        out[kind] = {
            "per_step_ms": round(med_step, 2),
            "per_step_pairs_ms": spread(per_step),
            "fixed_ms": round(fixed, 1),
            "run_ms": {1: spread([t * 1000 for t in t1], 1), big: spread([t * 1000 for t in tb], 1)},
            "history_step_ms": {k: spread(v) for k, v in parts.items()},
            "events_per_step": round((sum(counts.values()) - sum(small.values())) / (big - 1), 2),
            "event_types_per_step": {
                k: round((v - small.get(k, 0)) / (big - 1), 2)
                for k, v in counts.items()
                if v != small.get(k, 0)
            },
            "events_fixed": sum(small.values())
            - round((sum(counts.values()) - sum(small.values())) / (big - 1)),
        }
    out["ratio"] = round(out["keel"]["per_step_ms"] / out["floor"]["per_step_ms"], 2)
    # A Keel run's first step is an activity even for a quick tool (it ends the workflow task
    # the run began in); the others are local. So the N=1 run is one activity step plus the
    # fixed part, and the fixed part is that run less an activity step (measured on the
    # activity path, whose N=1 run has the very same shape), not less a local one.
    out["keel"]["fixed_ms"] = round(
        statistics.median(wall["keel"][1]) * 1000 - out["keel_activity"]["per_step_ms"], 1
    )
    out["keel"]["events_fixed"] += round(out["keel"]["events_per_step"]) - round(
        out["keel_activity"]["events_per_step"]
    )
    # The fixed cost of a run (everything outside its steps) against a bare workflow's (start,
    # one workflow task, completion): issue 23's "fixed per-run cost" figure.
    out["fixed_ratio"] = round(out["keel"]["fixed_ms"] / out["floor"]["fixed_ms"], 2)
    out["ratio_vs_floor_la"] = round(out["keel"]["per_step_ms"] / out["floor_la"]["per_step_ms"], 2)
    # The activity path (MCP, sandboxed, rate-limited or ``local=False`` tools), same floor.
    out["activity_ratio"] = round(out["keel_activity"]["per_step_ms"] / out["floor"]["per_step_ms"], 2)
    out["target_ratio"] = TARGET_RATIO
    out["pg_commits_per_step"] = None if commits is None else round(commits, 2)
    c1, cb = codec_runs[1], codec_runs[big]
    med = statistics.median
    out["codec"] = {
        "per_step_ms": round((med(s for s, _ in cb) - med(s for s, _ in c1)) * 1000 / (big - 1), 3),
        "payloads_per_step": round((med(n for _, n in cb) - med(n for _, n in c1)) / (big - 1), 1),
        "per_run_ms": {1: spread([s * 1000 for s, _ in c1], 2), big: spread([s * 1000 for s, _ in cb], 2)},
        "goal_ms": 1.0,
        "enabled": codec is not None,
        **(await _codec_micro(codec)),
    }
    out["in_process_ms"] = {
        "authorize_step": spread(timings.get("authorize_step", [])),
        "run_tool": spread(timings.get("run_tool", [])),
        **_workflow_code_ms(settings),
    }
    return out
