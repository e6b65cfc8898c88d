"""Crash recovery on the real services: a SIGKILLed worker process, a restarted dev server.

The kill harness lives in ``bench/bench_recovery.py`` (the benchmark runs more rounds of the
same thing and reports timings); here it runs K=2 rounds and every round asserts exactly-once
side effects, the retried attempt on the surviving worker and the ledger invariant.
"""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from bench.bench_recovery import kill_rounds, relevant_violations
from keel.activities.ledger import check_invariant
from keel.devservices import DevServices
from keel.models import StepState
from keel.settings import Settings
from tests.doubles.models import step
from tests.helpers import make_order, request, run_agent, running_worker
from tests.scripted import effects_of, plan, scripted_worker, start, wait_status, write_policy


@pytest.mark.timeout(180)
async def test_sigkill_mid_step_finishes_on_another_worker_exactly_once(
    client: Client, temporal_services: Settings, test_env: dict[str, str], tmp_path
) -> None:
    # One round here (each asserts exactly-once effects, attempt placement and the ledger's
    # invariant); bench/bench_recovery.py runs many more for the recovery-time figures.
    rounds = await kill_rounds(client, temporal_services, k=1, log_dir=tmp_path, base_env=test_env)
    assert len(rounds) == 1
    for r in rounds:  # each round already asserted effects, attempt placement and invariant
        assert r["refund_attempt"] >= 2
        assert r["kill_to_step_s"] < 30


@pytest.mark.timeout(120)
async def test_dev_server_restart_mid_run(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = [
        plan(
            step("s1", "test_effect", note="before restart"),
            step("s2", "slow_step", seconds=2, note="across restart"),
            step("s3", "test_effect", note="after restart"),
        )
    ]
    services = DevServices(temporal_services)
    try:
        async with scripted_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            plans,
            policy_file=write_policy(tmp_path),
            monkeypatch=monkeypatch,
        ):
            handle = await start(client, task_queue)
            await wait_status(handle, "s2", StepState.RUNNING)
            services.stop_temporal()
            assert not services.temporal_running()
            services.start_temporal()  # same SQLite file: history, timers and tasks survive
            resp = await handle.result()
    finally:
        services.start_temporal()  # other tests share this server: never leave it down
    assert resp.outcome == "completed", resp
    assert [s.state for s in resp.steps] == [StepState.SUCCEEDED] * 3
    assert [e[1:] for e in await effects_of(db_pool, resp.workflow_id)] == [
        ("test_effect", "before restart", "done"),
        ("slow_step", "across restart", "done"),
        ("test_effect", "after restart", "done"),
    ]
    # The session's client reconnected by itself: a normal run works on it afterwards.
    order = await make_order(db_pool, total_usd=10.0)
    async with running_worker(client, db_pool, temporal_services, task_queue + "-after"):
        after = await run_agent(
            client, task_queue + "-after", request(f"Check if order {order} is shipped and refund it if so")
        )
    assert after.outcome == "completed"
    async with db_pool.connection() as conn:
        violations = await check_invariant(conn)
    assert relevant_violations(violations, [resp.workflow_id, after.workflow_id]) == []
