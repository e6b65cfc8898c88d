"""Escape hatches end a run predictably: a flag, a reason, and the partial result so far.

Workflow-logic tests: the planner is scripted (``tests/scripted.py``); the dev server, the
database, the gate, the ledger and the tools are real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.models import StepState
from keel.settings import Settings
from tests.doubles.models import step
from tests.helpers import request
from tests.scripted import effects_of, plan, scripted_worker, start, write_policy


async def _run(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    plans,
    policy=None,
    **req,
):
    policy_file = write_policy(tmp_path, **(policy or {}))
    async with scripted_worker(
        client, pool, settings, task_queue, plans, policy_file=policy_file, monkeypatch=monkeypatch
    ):
        handle = await start(client, task_queue, request("scripted run", **req))
        return handle, await handle.result()


async def test_iteration_cap(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch) -> None:
    plans = [plan(step("s1", "echo", note=f"round {i}"), replan=True) for i in (1, 2, 3)]
    _, resp = await _run(
        client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch, plans, max_iterations=2
    )
    assert resp.outcome == "escape_hatch", resp
    assert "iteration_cap" in resp.flags and resp.reason.startswith("iteration_cap")
    assert resp.iterations == 2
    assert [(s.id, s.state) for s in resp.steps] == [
        ("s1", StepState.SUCCEEDED),
        ("s1.2", StepState.SUCCEEDED),
    ]


async def test_tool_call_cap(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch) -> None:
    plans = [plan(*(step(f"s{i}", "echo", note=f"call {i}") for i in range(1, 6)))]
    _, resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        tmp_path,
        monkeypatch,
        plans,
        policy={"max_tool_calls": 3},
    )
    assert resp.outcome == "escape_hatch", resp
    assert "tool_call_cap" in resp.flags
    assert [s.id for s in resp.steps if s.state == StepState.SUCCEEDED] == ["s1", "s2", "s3"]
    assert "Stopped early" in resp.message


async def test_thrashing(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch) -> None:
    plans = [plan(*(step(f"s{i}", "echo", note="same") for i in range(1, 6)))]
    _, resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        tmp_path,
        monkeypatch,
        plans,
        policy={"thrash_repeats": 3},
    )
    assert resp.outcome == "escape_hatch", resp
    assert "thrashing" in resp.flags and "4th time" in resp.reason
    assert len([s for s in resp.steps if s.state == StepState.SUCCEEDED]) == 3


async def test_error_cascade(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch) -> None:
    plans = [
        plan(
            step("s1", "echo", note="ok"),
            *(step(f"s{i}", "always_fail", note=f"n{i}") for i in range(2, 5)),
            step("s5", "echo", note="never"),
        )
    ]
    _, resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        tmp_path,
        monkeypatch,
        plans,
        policy={"max_consecutive_failures": 3},
    )
    assert resp.outcome == "escape_hatch", resp
    assert "error_cascade" in resp.flags
    assert [s.state for s in resp.steps] == [StepState.SUCCEEDED] + [StepState.FAILED] * 3
    assert "always_fail refuses" in resp.steps[1].error


async def test_deadline_cancels_the_pending_activity(
    client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch
) -> None:
    plans = [
        plan(step("s1", "test_effect", note="before"), step("s2", "slow_step", seconds=30, note="too slow"))
    ]
    handle, resp = await _run(
        client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch, plans, deadline_seconds=2
    )
    assert resp.outcome == "escape_hatch", resp
    assert "deadline" in resp.flags and resp.reason.startswith("deadline")
    slow = next(s for s in resp.steps if s.id == "s2")
    assert slow.state == StepState.FAILED and slow.error.startswith("cancelled")
    assert resp.compensated == ("s1",)
    # The slow step was cancelled (not left running): its effect never committed.
    assert await effects_of(db_pool, resp.workflow_id) == [("s1", "test_effect", "before", "undone")]
    events = [e.event_type async for e in handle.fetch_history_events()]
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in events
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED in events


async def test_low_confidence_hands_to_a_human(
    client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch
) -> None:
    plans = [plan(step("s1", "test_effect", note="kept"))]
    _, resp = await _run(
        client,
        db_pool,
        temporal_services,
        task_queue,
        tmp_path,
        monkeypatch,
        plans,
        policy={"min_confidence": 0.95},
    )
    assert resp.outcome == "needs_human", resp
    assert "low_confidence" in resp.flags and "below 0.95" in resp.reason
    # A hand-off keeps the work done so far for the human to judge; nothing is rolled back.
    assert resp.compensated == ()
    assert await effects_of(db_pool, resp.workflow_id) == [("s1", "test_effect", "kept", "done")]
