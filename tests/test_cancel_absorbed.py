"""A Temporal cancel that arrives while a quick tool is in flight must stop the run.

The tool learns of a cancellation only at its first heartbeat (after a second); one that
finishes sooner completes normally, and the workflow, which awaits it with
``WAIT_CANCELLATION_COMPLETED``, gets its result. asyncio then drops the workflow task's
cancellation (the awaited task absorbed it), so before patch ``keel-cancel-at-safe-points``
the run went on to its next steps and completed, as if never cancelled. Found by
``tests/test_begin_local.py``'s Temporal-cancel attack.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import CancelledError

from keel.models import StepState
from keel.settings import Settings
from keel.workflows.stop import CANCEL_AT_SAFE_POINTS_PATCH
from tests.doubles.models import step
from tests.scripted import effects_of, plan, scripted_worker, start, wait_status, write_policy
from tests.test_replay import HISTORIES, _replayer, _shape

GOLDEN = HISTORIES / "local_cancel_absorbed.json"
"""This test's run, recorded (``KEEL_RECORD_HISTORIES=local``): it carries the patch's marker."""


def _patches(history: WorkflowHistory) -> list[bytes]:
    return _shape(history)[0]


async def test_a_temporal_cancel_during_a_quick_tool_stops_the_run_at_the_next_safe_point(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = [
        plan(step("s1", "slow_step", seconds=0.6, note="first"), step("s2", "test_effect", note="second"))
    ]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        script,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        await wait_status(handle, "s1", StepState.RUNNING)
        await handle.cancel()  # s1 ends before its first heartbeat: it finishes, not cancelled
        with pytest.raises(WorkflowFailureError) as ended:
            await asyncio.wait_for(handle.result(), timeout=60)
    assert isinstance(ended.value.cause, CancelledError), ended.value
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    tools = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in client.get_workflow_handle(handle.id).fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert tools.count("run_tool") == 1, tools  # s2 never started
    notes = [note for _, _, note, _ in await effects_of(db_pool, handle.id)]
    assert "second" not in notes, notes
    history = await handle.fetch_history()
    assert any(CANCEL_AT_SAFE_POINTS_PATCH.encode() in p for p in _patches(history)), _patches(history)
    await _replayer().replay_workflow(history)  # deterministic, marker and all
    if os.environ.get("KEEL_RECORD_HISTORIES") == "local":
        GOLDEN.write_text(history.to_json())


async def test_the_recorded_absorbed_cancel_replays() -> None:
    history = WorkflowHistory.from_json("golden-cancel-absorbed", GOLDEN.read_text())
    assert any(CANCEL_AT_SAFE_POINTS_PATCH.encode() in p for p in _patches(history))
    await _replayer().replay_workflow(history)
