"""Human approval through the ``approve`` update: granted, rejected, and silence (timeout)."""

from __future__ import annotations

import asyncio

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowUpdateFailedError

from keel.models import Approval, StepState
from keel.settings import Settings
from tests.doubles.models import step
from tests.scripted import effects_of, plan, scripted_worker, start, wait_status, write_policy

PLANS = [plan(step("s1", "test_effect", note="first"), step("s2", "test_effect", note="approve-me"))]


async def _audit(pool: AsyncConnectionPool, workflow_id: str) -> list[tuple[str, str]]:
    async with pool.connection() as conn:
        return await (
            await conn.execute(
                "select decision, reason from audit_log where workflow_id=%s and kind='approval' order by id",
                (workflow_id,),
            )
        ).fetchall()


@pytest.mark.parametrize("answer", [True, False])
async def test_approve_update(
    answer: bool,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        PLANS,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        status = await wait_status(handle, "s2", StepState.WAITING_APPROVAL)
        assert status.phase == "waiting_approval" and "effect-needs-approval" in status.waiting_for
        with pytest.raises(WorkflowUpdateFailedError):  # nothing else is waiting
            await handle.execute_update("approve", Approval(step_id="s1"))
        reply = await handle.execute_update(
            "approve", Approval(approve=answer, reason="checked by bob", by="bob"), result_type=str
        )
        assert reply == ("approved" if answer else "rejected")
        resp = await handle.result()
    effects = await effects_of(db_pool, resp.workflow_id)
    if answer:
        assert resp.outcome == "completed", resp
        assert effects == [
            ("s1", "test_effect", "first", "done"),
            ("s2", "test_effect", "approve-me", "done"),
        ]
        assert [d for d, _ in await _audit(db_pool, resp.workflow_id)] == ["requested", "approve"]
    else:
        assert resp.outcome == "rejected", resp
        assert "rejected" in resp.flags and "checked by bob" in resp.reason
        assert resp.compensated == ("s1",)
        assert [s.state for s in resp.steps] == [StepState.COMPENSATED, StepState.DENIED]
        assert effects == [("s1", "test_effect", "first", "undone")]
        assert [d for d, _ in await _audit(db_pool, resp.workflow_id)] == ["requested", "reject"]
    rows = await _audit(db_pool, resp.workflow_id)
    assert "checked by bob" in rows[1][1] and "by bob" in rows[1][1]
    async with db_pool.connection() as conn:
        data = await (
            await conn.execute(
                "select data from audit_log where workflow_id=%s and kind='approval' order by id",
                (resp.workflow_id,),
            )
        ).fetchall()
    assert data[0][0]["approval_rule"] == "effect-needs-approval" and data[1][0]["by"] == "bob"


async def test_approval_timeout_is_a_safe_rejection(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        PLANS,
        policy_file=write_policy(tmp_path, approval_timeout_seconds=1),
        monkeypatch=monkeypatch,
    ):
        resp = await (await start(client, task_queue)).result()
    assert resp.outcome == "rejected", resp
    assert "no answer within 1 s" in resp.reason and "reject" in resp.reason
    assert resp.compensated == ("s1",)
    assert await effects_of(db_pool, resp.workflow_id) == [("s1", "test_effect", "first", "undone")]
    assert [d for d, _ in await _audit(db_pool, resp.workflow_id)] == ["requested", "timed_out"]


async def test_run_stopped_while_waiting_leaves_an_abandoned_row(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run is stopped while a human has not answered: the audit trail says so. (The
    deadline no longer does this: it pauses while a person decides, see test_ui_fields.)"""
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        PLANS,
        policy_file=write_policy(tmp_path, deadline_seconds=2),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        await wait_status(handle, "s2", StepState.WAITING_APPROVAL)
        await asyncio.sleep(3)  # past the 2 s deadline: the wait goes on, the deadline is paused
        assert await handle.execute_update("cancel", "operator stopped it", result_type=str) == "cancelling"
        resp = await handle.result()
    assert resp.outcome == "cancelled" and "operator stopped it" in resp.reason, resp
    rows = await _audit(db_pool, resp.workflow_id)
    assert [d for d, _ in rows] == ["requested", "abandoned"], rows
    assert "operator stopped it" in rows[1][1]
