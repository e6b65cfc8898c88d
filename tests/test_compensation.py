"""Saga compensation: reverse order, retried undo, cancellation mid-step, fallback tools."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError

from bench.bench_recovery import relevant_violations
from keel.activities.ledger import check_invariant
from keel.models import RunStatus, StepState
from keel.settings import Settings
from keel.workflows.agent import OUTCOME
from tests.doubles.models import step
from tests.helpers import make_order
from tests.scripted import effects_of, plan, scripted_worker, start, wait_status, write_policy


async def _refund_row(pool: AsyncConnectionPool, workflow_id: str) -> list[tuple[int, str]]:
    async with pool.connection() as conn:
        return await (
            await conn.execute(
                "select amount_micros, status from refunds where idempotency_key like %s",
                (f"{workflow_id}/%",),
            )
        ).fetchall()


async def test_saga_undoes_in_reverse_and_retries_a_failing_undo(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = await make_order(db_pool, total_usd=30.0)
    plans = [
        plan(
            step("s1", "issue_refund", order_id=order, amount_usd=12.5, reason="test"),
            step("s2", "test_effect", note="second"),
            step("s3", "test_effect", note="third", undo_failures=1),
            step("s4", "echo", note="NOT ALLOWED"),
        )
    ]  # denied by policy -> abort
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        resp = await (await start(client, task_queue)).result()
    assert resp.outcome == "denied", resp
    assert "echo-lowercase" in resp.reason or "lower-case" in resp.reason
    assert resp.compensated == ("s3", "s2", "s1")  # newest first
    states = {s.id: s.state for s in resp.steps}
    assert states == {
        "s1": StepState.COMPENSATED,
        "s2": StepState.COMPENSATED,
        "s3": StepState.COMPENSATED,
        "s4": StepState.DENIED,
    }
    assert await _refund_row(db_pool, resp.workflow_id) == [(12_500_000, "voided")]
    async with db_pool.connection() as conn:
        undone = await (
            await conn.execute(
                "select note from test_effects where idempotency_key like %s order by undone_at",
                (f"{resp.workflow_id}/%",),
            )
        ).fetchall()
        # the flaky undo of s3 failed once, was retried, and still ran before s2's
        assert [r[0] for r in undone] == ["third", "second"]
        attempts = await (
            await conn.execute(
                "select result->'data'->>'attempt' from tool_effects where idempotency_key=%s",
                (f"{resp.workflow_id}/s3/compensate",),
            )
        ).fetchone()
        assert attempts == ("2",)


@pytest.mark.parametrize("how", ["update", "temporal"])
async def test_cancel_during_a_step_rolls_back(
    how: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = await make_order(db_pool, total_usd=20.0)
    plans = [
        plan(
            step("s1", "issue_refund", order_id=order, amount_usd=5.0, reason="test"),
            step("s2", "test_effect", note="first"),
            step("s3", "slow_step", seconds=30, note="interrupted"),
            step("s4", "echo", note="never"),
        )
    ]
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
        await wait_status(handle, "s3", StepState.RUNNING)
        if how == "update":
            assert await handle.execute_update("cancel", "customer changed their mind") == "cancelling"
            resp = await handle.result()
            assert resp.outcome == "cancelled", resp
            assert "cancelled" in resp.flags and resp.reason == "customer changed their mind"
            assert resp.compensated == ("s2", "s1")
            steps = resp.steps
        else:
            # A Temporal cancel (the Web UI's button, `keel cancel`) ends Canceled, in
            # Temporal's own terms, after the same compensation.
            await handle.cancel(reason="customer withdrew")
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
            assert isinstance(failed.value.cause, CancelledError)
            desc = await handle.describe()
            assert desc.status == WorkflowExecutionStatus.CANCELED
            assert desc.typed_search_attributes.get(OUTCOME) == "cancelled"
            st = await handle.query("status", result_type=RunStatus)
            assert st.outcome == "cancelled" and st.phase == "done"
            steps = st.steps
            assert [s.state for s in steps[:2]] == [StepState.COMPENSATED, StepState.COMPENSATED]
    assert [s.id for s in steps] == ["s1", "s2", "s3"]  # s4 never started
    assert steps[2].state == StepState.FAILED and "cancelled" in steps[2].error
    if how == "temporal":
        assert "customer withdrew" in steps[2].error  # the cancel's reason, not a generic one
    assert await _refund_row(db_pool, handle.id) == [(5_000_000, "voided")]
    assert await effects_of(db_pool, handle.id) == [("s2", "test_effect", "first", "undone")]
    async with db_pool.connection() as conn:
        assert relevant_violations(await check_invariant(conn), [handle.id]) == []
        held = await (
            await conn.execute(
                "select count(*) from keel_budget_reservations where key like %s and status='held'",
                (f"{handle.id}/%",),
            )
        ).fetchone()
        assert held == (0,)


async def test_flaky_tool_is_retried_by_temporal(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = [plan(step("s1", "flaky", failures=2, note="x"))]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        resp = await (await start(client, task_queue)).result()
    assert resp.outcome == "completed", resp
    assert resp.steps[0].state == StepState.SUCCEEDED and resp.steps[0].result["attempt"] == 3


async def test_fallback_runs_when_the_tool_fails_permanently(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = [plan(step("s1", "fragile_fetch", key="fx-rate"), step("s2", "echo", note="${s1.value}"))]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        plans,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        resp = await (await start(client, task_queue)).result()
    assert resp.outcome == "completed", resp
    by_id = {s.id: s for s in resp.steps}
    assert by_id["s1"].state == StepState.FAILED and "upstream" in by_id["s1"].error
    assert by_id["s1f"].tool == "cached_fetch" and by_id["s1f"].state == StepState.SUCCEEDED
    assert by_id["s2"].result == {"note": "cached:fx-rate"}  # later steps see the fallback's data
    assert "degraded" in resp.flags and "fallback:fragile_fetch->cached_fetch" in resp.flags
    assert "Could not fragile_fetch" in resp.message
