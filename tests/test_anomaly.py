"""Run-shape anomaly flags: the pure function, then each flag raised by a scripted run.

The end-to-end half runs real workflows (dev server, PostgreSQL, the real finish_run) with
a scripted planner: each anomalous script raises exactly its flag, and the normal run beside
it raises none. A flag must show up in the response, the ``KeelFlags`` search attribute,
``run_stats``, the audit log and the ``keel.run.flags`` metric.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel import telemetry
from keel.anomaly import ANOMALY_FLAGS, AnomalyLimits, CallShape, RunShape, canonical_call, run_flags
from keel.models import Plan
from keel.settings import Settings
from tests.doubles.models import step
from tests.helpers import make_order
from tests.scripted import plan, scripted_worker, start, write_policy


def names(shape: RunShape, limits: AnomalyLimits = AnomalyLimits()) -> list[str]:
    return [f.name for f in run_flags(shape, limits)]


def calls(*spec: tuple[str, dict[str, Any], str]) -> tuple[CallShape, ...]:
    return tuple(CallShape(tool=t, args=a, state=s) for t, a, s in spec)


NORMAL = RunShape(
    calls=calls(
        ("lookup_order", {"order_id": "ORD-1"}, "succeeded"),
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": 5}, "succeeded"),
    ),
    plan_sizes=(2, 0),
    iterations=1,
    spend_micros=2300,
    baseline_runs=20,
    baseline_p95_micros=2500,
)


def test_a_normal_run_has_no_flags() -> None:
    assert names(NORMAL) == []


def test_near_miss_thrash_counts_trivially_different_calls() -> None:
    assert canonical_call("t", {"a": " Hello  World ", "n": "42.50"}) == canonical_call(
        "t", {"a": "hello world", "n": 42.5}
    )
    twice = NORMAL.model_copy(
        update={
            "calls": calls(
                ("issue_refund", {"amount_usd": 5}, "succeeded"),
                ("issue_refund", {"amount_usd": "5.0"}, "failed"),
            )
        }
    )
    assert names(twice) == ["near_miss_thrash"]
    assert names(twice.model_copy(update={"hatches": ("thrashing",)})) == []  # the hatch fired instead
    # With a looser thrashing limit, a near miss is one short of it.
    assert names(twice.model_copy(update={"thrash_repeats": 5})) == []
    three = twice.model_copy(update={"calls": twice.calls * 2, "thrash_repeats": 5})
    assert "near_miss_thrash" in names(three)


def test_fan_out_cost_loop_and_errors() -> None:
    assert names(NORMAL.model_copy(update={"plan_sizes": (7,)})) == ["fan_out"]
    big = NORMAL.model_copy(update={"baseline_p95_micros": 25_000})
    assert names(big.model_copy(update={"spend_micros": 75_001})) == ["cost_spike"]
    assert names(big.model_copy(update={"spend_micros": 75_000})) == []
    # Under the $0.01 floor a ratio is noise: 3x of a near-free baseline is not a spike...
    assert names(NORMAL.model_copy(update={"spend_micros": 7501})) == []
    # ...unless the floor is lowered.
    assert names(NORMAL.model_copy(update={"spend_micros": 7501}), AnomalyLimits(cost_min_micros=0)) == [
        "cost_spike"
    ]
    assert names(big.model_copy(update={"spend_micros": 10**6, "baseline_runs": 4})) == []  # too few runs
    assert names(big.model_copy(update={"spend_micros": 10**6, "baseline_p95_micros": 0})) == []
    assert names(NORMAL.model_copy(update={"iterations": 3})) == ["long_loop"]
    failing = NORMAL.model_copy(
        update={
            "calls": calls(
                ("a", {}, "failed"), ("b", {}, "failed"), ("c", {}, "succeeded"), ("d", {}, "skipped")
            )
        }
    )
    assert names(failing) == ["high_error_rate"]
    one_failure = failing.model_copy(update={"calls": failing.calls[1:]})
    assert names(one_failure) == []  # 1 of 2 failed: below error_min_calls


def test_limits_from_the_environment() -> None:
    lim = AnomalyLimits.from_env({"KEEL_FLAG_MAX_FAN_OUT": "2", "KEEL_FLAG_COST_FACTOR": "1.5"})
    assert (lim.max_fan_out, lim.cost_factor) == (2, 1.5)
    with pytest.raises(ValueError, match=r"^KEEL_FLAG_COST_FACTOR: "):
        AnomalyLimits.from_env({"KEEL_FLAG_COST_FACTOR": "-1"})


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def meter() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    telemetry.use_meter_provider(MeterProvider(metric_readers=[reader]))
    try:
        yield reader
    finally:
        telemetry.use_meter_provider(MeterProvider())


def _flag_counts(reader: InMemoryMetricReader) -> dict[str, float]:
    out: dict[str, float] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "keel.run.flags":
                    for p in m.data.data_points:
                        out[str(p.attributes.get("flag"))] = p.value
    return out


async def _run(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    plans: list[Plan],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Any, list[str]]:
    task_queue = f"flags-{uuid.uuid4().hex[:8]}"
    policy = write_policy(tmp_path)
    async with scripted_worker(
        client, pool, settings, task_queue, plans, policy_file=policy, monkeypatch=monkeypatch
    ):
        handle = await start(client, task_queue)
        resp = await handle.result()
        desc = await handle.describe()
    sa = desc.typed_search_attributes
    from keel.workflows.agent import FLAGS

    return resp, list(sa.get(FLAGS) or [])


async def _seed_baseline(pool: AsyncConnectionPool, spend_micros: int) -> str:
    """A full p95 window of acme's agent's runs, each costing ``spend_micros``, dated ahead of
    the runs this test makes, so they are the latest whatever other tests left behind."""
    n = AnomalyLimits().cost_window
    tag = f"seed-{uuid.uuid4().hex[:8]}"
    async with pool.connection() as conn:
        for i in range(n):
            await conn.execute(
                "insert into run_stats (workflow_id, tenant, agent, outcome, spend_micros, iterations, "
                "tool_calls, failed_calls, finished_at) values (%s, 'acme', 'AgentWorkflow', 'completed', "
                "%s, 1, 1, 0, now() + interval '1 hour')",
                (f"{tag}/{i}", spend_micros),
            )
    return tag


async def _unseed(pool: AsyncConnectionPool, tag: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("delete from run_stats where workflow_id like %s", (f"{tag}/%",))


def _echo(sid: str, note: str) -> Any:
    return step(sid, "echo", note=note)


async def test_each_flag_is_raised_by_its_scripted_run_and_not_by_a_normal_one(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    meter: InMemoryMetricReader,
) -> None:
    # Scripted runs cost cents of a cent: let the spike flag look at them.
    monkeypatch.setenv("KEEL_FLAG_COST_MIN_MICROS", "0")
    order = await make_order(db_pool, total_usd=10.0)
    lookup = step("s1", "lookup_order", order_id=order)
    # The baseline: acme's recent runs each cost one lookup (100 uUSD), so p95 = 100.
    tag = await _seed_baseline(db_pool, 100)
    try:
        orders = [await make_order(db_pool, total_usd=10.0) for _ in range(3)]
        scripts: dict[str, list[Plan]] = {
            "normal": [plan(lookup, _echo("s2", "done"))],
            "near_miss_thrash": [plan(_echo("s1", "retry now"), _echo("s2", "retry  now"))],
            "fan_out": [plan(*(_echo(f"s{i}", f"part {i}") for i in range(1, 9)))],
            "cost_spike": [
                plan(
                    lookup,
                    *(step(f"s{i + 2}", "lookup_order", order_id=o) for i, o in enumerate(orders)),
                )
            ],
            "long_loop": [
                plan(_echo("s1", "one"), replan=True),
                plan(_echo("s2", "two"), replan=True),
                plan(_echo("s3", "three")),
            ],
            "high_error_rate": [
                plan(
                    step("s1", "always_fail", note="a"),
                    step("s2", "always_fail", note="b"),
                    _echo("s3", "ok"),
                ),
                plan(),
            ],
        }
        seen: dict[str, tuple[list[str], list[str]]] = {}
        for name, plans in scripts.items():
            resp, attr = await _run(client, db_pool, temporal_services, plans, tmp_path, monkeypatch)
            anomalies = [f for f in resp.flags if f in ANOMALY_FLAGS]
            seen[name] = (anomalies, attr)
            expected = [] if name == "normal" else [name]
            assert anomalies == expected, (name, resp.flags, resp.outcome, resp.spend.total_micros)
            assert all(f in attr for f in resp.flags), (name, attr, resp.flags)
            async with db_pool.connection() as conn:
                row = await (
                    await conn.execute(
                        "select flags from run_stats where workflow_id=%s", (resp.workflow_id,)
                    )
                ).fetchone()
                audit = await (
                    await conn.execute(
                        "select decision, data from audit_log where workflow_id=%s and subject='anomaly'",
                        (resp.workflow_id,),
                    )
                ).fetchall()
            assert row is not None and list(row[0]) == expected
            if expected:
                assert [(d, data["flags"]) for d, data in audit] == [("flagged", expected)]
            else:
                assert audit == []
    finally:
        await _unseed(db_pool, tag)
    counts = _flag_counts(meter)
    assert {k: v for k, v in counts.items() if k in ANOMALY_FLAGS} == {f: 1 for f in ANOMALY_FLAGS}, counts
