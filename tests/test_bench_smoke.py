"""The in-process benchmarks still run: smoke sizes against the test session's services.

Structure only, never timing thresholds: this machine's speed is not a test result. The
throughput benchmark (worker subprocesses) and the full runner are exercised by
``make bench-smoke``.
"""

from __future__ import annotations

import dataclasses

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from bench.common import BENCH_POLICY, spread
from keel.settings import Settings


@pytest.fixture
def bench_settings(temporal_services: Settings, task_queue: str) -> Settings:
    return dataclasses.replace(temporal_services, policy_file=BENCH_POLICY, task_queue=task_queue)


def test_spread_reports_percentiles() -> None:
    s = spread([float(v) for v in range(1, 101)])
    assert (s["p50"], s["p90"], s["p99"], s["min"], s["max"], s["n"]) == (50.5, 90, 99, 1, 100, 100)
    assert spread([]) == {"n": 0}


async def test_step_benchmark_smoke(
    client: Client, db_pool: AsyncConnectionPool, bench_settings: Settings
) -> None:
    from bench import bench_step

    r = await bench_step.run(client, db_pool, bench_settings, smoke=True)
    for kind in ("keel", "keel_activity", "floor", "floor_la"):
        assert r[kind]["run_ms"][1]["n"] == r["rounds"]
        assert r[kind]["events_per_step"] > 0
    for kind in ("keel_activity", "floor", "floor_la"):
        assert r[kind]["history_step_ms"]["interval"]["p50"] > 0
    # noop is a quick in-process tool: its step is one local activity, one marker event;
    # declared local=False, one round trip: the same history shape as one bare activity
    # (scheduled, started, completed + one workflow task), no marker.
    assert r["keel"]["events_per_step"] == 1
    assert r["keel_activity"]["events_per_step"] == r["floor"]["events_per_step"] == 6
    assert r["ratio"] != 0 and r["ratio_vs_floor_la"] != 0 and r["activity_ratio"] != 0
    assert r["in_process_ms"]["run_tool"]["n"] > 0


async def test_history_benchmark_smoke(
    client: Client, db_pool: AsyncConnectionPool, bench_settings: Settings
) -> None:
    from bench import bench_history

    r = await bench_history.run(client, db_pool, bench_settings, smoke=True)
    assert r["per_step"]["events"] > 0 and r["per_step"]["bytes"] > 0
    assert 0 < r["long_run"]["events"] < r["limits"]["events"]
    assert r["projection"]["steps_to_event_limit"] > r["long_run"]["steps"]
    assert r["demo_task"]["tools"] == ["lookup_order", "issue_refund", "send_email"]


async def test_peer_benchmark_smoke(
    client: Client, db_pool: AsyncConnectionPool, bench_settings: Settings
) -> None:
    pytest.importorskip("pydantic_ai", reason="the peer needs the optional `bench` extra")
    from bench import bench_peer

    r = await bench_peer.run(client, db_pool, bench_settings, smoke=True)
    for kind in ("keel", "peer"):
        assert r[kind]["runs_per_s"] > 0 and r[kind]["task_ms"]["p50"] > 0
        assert r[kind]["task_history_events"] > 0
    assert r["task_latency_ratio_keel_over_peer"] > 0


async def test_model_cost_benchmark_smoke(
    client: Client, db_pool: AsyncConnectionPool, bench_settings: Settings
) -> None:
    """Offline, the judge and the answer make no model call and cost nothing; plans do."""
    from bench import bench_model_cost

    r = await bench_model_cost.run(client, db_pool, bench_settings, smoke=True)
    assert r["judge_and_answer_micros_per_run"] == 0
    for role in ("check", "evaluate", "respond"):
        assert r["per_role"][role]["calls_per_run"] == 0
    assert r["per_role"]["plan"]["calls_per_run"] >= 1 and r["per_role"]["plan"]["micros_per_run"] > 0
    assert r["runs_where_spend_equals_ledger"] == r["runs"]
    assert r["outcomes"] == ["completed"]
