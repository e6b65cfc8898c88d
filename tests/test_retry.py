"""Retry and reset without repeating effects.

A run stopped half-way (terminated while its second step ran) is run again two ways: with
``keel retry`` (a new run that reuses the recorded effects of the old one) and with
Temporal's own reset (the same workflow id replayed to its first task, so every step key is
the old one). In both, the first step's effect exists exactly once afterwards, and the
ledger invariant holds.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from asyncio.subprocess import DEVNULL, PIPE
from datetime import timedelta
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecutionStatus

from bench.bench_recovery import relevant_violations
from keel.activities.ledger import check_invariant
from keel.models import AgentResponse, Plan, StepState
from keel.settings import PROJECT_ROOT, Settings, offline_env
from tests.doubles.models import PlanCall, step
from tests.scripted import effects_of, plan, scripted_worker, start, wait_status, write_policy
from tests.test_cli import PY, STARTER


def _script(inp: PlanCall) -> Plan:
    """Every run plans the same two steps (as a deterministic planner would); s2 takes a few
    seconds, long enough to stop the first run inside it."""
    if inp.iteration > 1:
        return plan()
    return plan(step("s1", "test_effect", note="first"), step("s2", "slow_step", seconds=3, note="second"))


async def _stopped_half_way(client: Client, task_queue: str) -> str:
    handle = await start(client, task_queue)
    await wait_status(handle, "s2", StepState.RUNNING)
    await handle.terminate(reason="operator stopped it mid-step")
    assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
    return handle.id


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The CLI as a subprocess, without blocking the loop the in-process worker runs on."""
    proc = await asyncio.create_subprocess_exec(
        PY, *STARTER, *args, cwd=PROJECT_ROOT, env=env, stdout=PIPE, stderr=PIPE, stdin=DEVNULL
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def _no_violations(pool: AsyncConnectionPool, *wids: str) -> None:
    async with pool.connection() as conn:
        assert relevant_violations(await check_invariant(conn), list(wids)) == []


async def test_keel_retry_reuses_recorded_effects(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        _script,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        old = await _stopped_half_way(client, task_queue)
        assert await effects_of(db_pool, old) == [("s1", "test_effect", "first", "done")]
        env = offline_env(temporal_services, KEEL_TASK_QUEUE=task_queue)
        code, out, err = await _cli(env, "retry", old, "-o", "json")
        assert code == 0, err
        body = json.loads(out)
        assert body.pop("retry_of") == old
        resp = AgentResponse.model_validate(body)
    assert resp.outcome == "completed", resp
    # The retry's id follows the run id scheme (agent/<tenant>/<agent>/<request id>-retry-N).
    assert resp.workflow_id == f"agent/acme/support/{old.rsplit('/', 1)[1]}-retry-1"
    s1, s2 = resp.steps
    assert s1.state == StepState.SUCCEEDED and "(replayed)" in s1.summary and s1.cost_micros == 0
    assert s2.state == StepState.SUCCEEDED and "(replayed)" not in s2.summary
    # s1's effect happened once, under the old run's key; the retry acted only for s2.
    assert await effects_of(db_pool, old) == [("s1", "test_effect", "first", "done")]
    assert await effects_of(db_pool, resp.workflow_id) == [("s2", "slow_step", "second", "done")]
    await _no_violations(db_pool, old, resp.workflow_id)


async def test_retry_refuses_a_running_run(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        _script,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        await wait_status(handle, "s2", StepState.RUNNING)
        env = offline_env(temporal_services, KEEL_TASK_QUEUE=task_queue)
        code, _, err = await _cli(env, "retry", handle.id)
        assert code == 2 and "is still running" in err, err
        await handle.terminate()


async def test_temporal_reset_does_not_repeat_effects(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``temporal workflow reset --type FirstWorkflowTask``: same id, same step keys."""
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        _script,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        old = await _stopped_half_way(client, task_queue)
        history = await client.get_workflow_handle(old).fetch_history()
        first_task = next(
            e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
        )
        reset = await client.workflow_service.reset_workflow_execution(
            ResetWorkflowExecutionRequest(
                namespace="default",
                workflow_execution=WorkflowExecution(workflow_id=old),
                reason="retry after operator stop",
                workflow_task_finish_event_id=first_task.event_id,
                request_id=str(uuid.uuid4()),
            ),
            timeout=timedelta(seconds=10),
        )
        resp = await client.get_workflow_handle(old, run_id=reset.run_id, result_type=AgentResponse).result()
    assert resp.outcome == "completed", resp
    assert "(replayed)" in resp.steps[0].summary
    assert await effects_of(db_pool, old) == [
        ("s1", "test_effect", "first", "done"),
        ("s2", "slow_step", "second", "done"),
    ]
    await _no_violations(db_pool, old)
