"""What the Web UI shows, asserted through ``describe()``, the metadata query and history.

The UI's workflow list reads the execution status and the search attributes; a run's page
reads Current Details (the ``__temporal_workflow_metadata`` query, answered by the worker)
and each timer's summary (its ``TimerStarted`` event's user metadata). These tests read the
same fields the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle

from keel.models import StepState
from keel.settings import Settings
from keel.workflows.agent import OUTCOME
from tests.doubles.models import step
from tests.scripted import plan, scripted_worker, start, wait_status, write_policy

WAITING = [plan(step("s1", "test_effect", note="first"), step("s2", "test_effect", note="approve-me"))]


async def _details(handle: WorkflowHandle[Any, Any]) -> str:
    meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return meta.current_details


async def _timer_summaries(client: Client, handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Each timer's summary as the UI shows it (decoded through the codec server, so here
    through the client's converter: summaries are encrypted like every payload)."""
    history = await handle.fetch_history()
    out = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED and e.user_metadata.HasField("summary"):
            [text] = await client.data_converter.decode([e.user_metadata.summary])
            out.append(str(text))
    return out


async def test_a_wait_says_what_it_waits_for_and_how_to_answer(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        WAITING,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        st = await wait_status(handle, "s2", StepState.WAITING_APPROVAL)
        details = await _details(handle)
        assert details == st.details
        assert details.startswith(
            "waiting for approval: s2 test_effect note=approve-me — rule effect-needs-approval"
        )
        assert "(note = approve-me)" in details
        assert f"answer with `keel approve {handle.id}` (or `--reject`)" in details
        assert details.endswith("reject by itself after 1 h")
        assert st.waiting_step == "s2" and st.waiting_since is not None
        summaries = await _timer_summaries(client, handle)
        assert "approval of s2 test_effect: reject after 3600 s" in summaries
        assert any(s.startswith("run deadline: 60 s left") for s in summaries), summaries
        await handle.cancel(reason="operator gave up")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        desc = await handle.describe()
        assert desc.status == WorkflowExecutionStatus.CANCELED  # the UI's list shows Canceled
        assert desc.typed_search_attributes.get(OUTCOME) == "cancelled"
        done = await _details(handle)
    assert done.startswith("done: cancelled — spent $"), done


async def test_the_deadline_pauses_while_a_person_decides(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Approval timeout 4 s, deadline 2 s: the documented safe default (reject) still fires."""
    policy = write_policy(tmp_path, approval_timeout_seconds=4, deadline_seconds=2)
    async with scripted_worker(
        client, db_pool, temporal_services, task_queue, WAITING, policy_file=policy, monkeypatch=monkeypatch
    ):
        handle = await start(client, task_queue)
        resp = await asyncio.wait_for(handle.result(), timeout=60)
    assert "deadline" not in resp.reason, resp.reason
    assert resp.steps[1].state != StepState.SUCCEEDED
    assert "no answer within 4 s (policy default: reject)" in " ".join(
        [resp.reason, *(s.error for s in resp.steps)]
    ), resp


async def test_details_follow_the_run_to_its_end(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        [plan(step("s1", "slow_step", seconds=3, note="slow"))],
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        await wait_status(handle, "s1", StepState.RUNNING)
        running = await _details(handle)
        assert running.startswith("running s1 slow_step seconds=3, note=slow — spent $"), running
        resp = await handle.result()
        final = await _details(handle)
    assert resp.outcome == "completed"
    assert (
        final
        == f"done: completed — spent {'$0.00' if resp.spend.total_micros == 0 else final.split('spent ')[1]}"
    )
    desc = await handle.describe()
    assert desc.status == WorkflowExecutionStatus.COMPLETED
    assert desc.typed_search_attributes.get(OUTCOME) == "completed"
