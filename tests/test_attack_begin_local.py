"""Attacks on ``begin_local`` (patch ``keel-23-begin-local``): the run's preparation and
first plan as a LOCAL activity inside the first workflow task.

The deadline: ``_begin`` starts the run's deadline timer with the time the beginning took
subtracted (``workflow.now() - started``). For ``begin_run`` (an activity) the next workflow
task's time is after the activity; a local activity resolves inside the SAME workflow task,
whose time does not move, so a preparation that waited on the tenant's run-slot lock would
not count against the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.activities.agent import AgentActivities
from keel.agent_io import PrepareInput, RunContext
from keel.settings import Settings
from tests.doubles.models import step
from tests.scripted import plan, scripted_worker, start, write_policy
from tests.test_begin_local import _slot_lock_held, _wait_blocked, failing_plans, run_served


def _clean(rows: dict[str, Any], wid: str) -> None:
    """``tests.test_begin_local._clean``, not counting the anomaly detector's own row (a
    run among many failed ones may be flagged: ``kind='run'``, key ``<wid>/anomaly``)."""
    from tests.test_begin_local import _clean as clean

    clean({**rows, "audit": [k for k in rows["audit"] if k != f"{wid}/anomaly"]}, wid)


async def _began_with(client: Client, wid: str) -> str:
    async for e in client.get_workflow_handle(wid).fetch_history_events():
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = e.activity_task_scheduled_event_attributes.activity_type.name
            if name == "begin_run":
                return "begin_run"
    return "begin_local"


# Slow variants (the same code on the older path, or a second shape of the same wait) run in
# `make test-slow`; `make test` keeps one of each.
@pytest.mark.parametrize("path", ["begin_local", pytest.param("begin_run", marks=pytest.mark.slow)])
async def test_time_the_preparation_waited_counts_against_the_deadline(
    path: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    pg_url: str,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deadline 4 s; the preparation waits 3 s on the slot lock; the one step takes 3 s.
    The deadline passes 1 s into the step: the run must end ``escape_hatch``/deadline."""
    script = [plan(step("s1", "slow_step", seconds=3, note="long"))]
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        script,
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ) as planner:
        if path == "begin_run":
            planner.in_process = False  # type: ignore[misc]  # the control: begin_run
        async with _slot_lock_held(pg_url) as holder:
            t0 = time.monotonic()
            handle = await start(client, task_queue, deadline_seconds=4)
            await _wait_blocked(pg_url)
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
            await holder.rollback()
        resp = await asyncio.wait_for(handle.result(), timeout=30)
        took = time.monotonic() - t0
    assert await _began_with(client, handle.id) == path
    assert resp.outcome == "escape_hatch" and "deadline" in resp.flags, (resp.outcome, resp.reason, took)


async def test_the_deadline_passing_while_begin_local_waits_on_the_slot_ends_the_run_cleanly(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    pg_url: str,
    task_queue: str,
) -> None:
    """The preparation waits past the whole deadline: the first plan (inside the local
    activity) must stop at once, the run end ``escape_hatch``/deadline, with nothing left."""
    from tests.helpers import make_order, request, running_worker
    from tests.test_begin_local import _rows

    order = await make_order(db_pool, total_usd=12.5)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        async with _slot_lock_held(pg_url) as holder:
            handle = await start(
                client,
                task_queue,
                request(f"Refund order {order} and e-mail the customer", deadline_seconds=2),
            )
            await _wait_blocked(pg_url)
            await asyncio.sleep(3)
            await holder.rollback()
        resp = await asyncio.wait_for(handle.result(), timeout=30)
    assert await _began_with(client, handle.id) == "begin_local"
    assert resp.outcome == "escape_hatch" and "deadline" in resp.flags, (
        resp.outcome,
        resp.reason,
        resp.flags,
    )
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert rows["spent"] in (resp.spend.total_micros, None if resp.spend.total_micros == 0 else -1), rows
    async with db_pool.connection() as conn:
        (refunds,) = await (
            await conn.execute(
                "select count(*) from refunds where idempotency_key like %s", (handle.id + "/%",)
            )
        ).fetchone()  # type: ignore[misc]
    assert refunds == 0


async def test_a_first_plan_that_fails_once_in_process_is_retried_and_charged_once_per_call(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An in-process planner (``in_process = True``) that 503s once: ``begin_local`` retries
    as a whole (preparation again, then the plan). One authorization row, both calls in
    the ledger, and the run's spend is the ledger's."""

    from tests.doubles.models import FunctionModel
    from tests.test_begin_local import _activities as _shape
    from tests.test_begin_local import _rows

    calls: list[int] = []
    model = FunctionModel(failing_plans(calls, billed=True))
    model.in_process = True  # type: ignore[attr-defined]
    handle, resp = await run_served(
        model, client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch, within=30
    )
    assert resp.outcome in ("completed", "partial"), resp
    local, remote = await _shape(client, handle.id)
    assert b'"begin_local"' in local[0] and "begin_run" not in remote, (local, remote)
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert len(calls) == 2, calls
    assert rows["spent"] == resp.spend.total_micros > 0, (rows, resp.spend)
    assert resp.spend.model_calls == 2, resp.spend


async def test_a_preparation_that_commits_then_errors_is_retried_in_process_once_recorded(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    """The preparation's transaction commits, then the connection drops (a transient
    error after the commit): ``begin_local`` retries, preparing again. One authorization
    row, one finish row, no slot and no hold left, spend equals the ledger."""
    from tests.helpers import make_order, request, running_worker
    from tests.test_begin_local import _rows

    seen: list[int] = []
    real = AgentActivities(db_pool, temporal_services)

    @activity.defn(name="prepare_run")
    async def prepare_run(inp: PrepareInput) -> RunContext:
        ctx = await real.prepare_run(inp)
        seen.append(1)
        if len(seen) == 1:
            raise psycopg.OperationalError("scripted: server closed the connection unexpectedly")
        return ctx

    order = await make_order(db_pool, total_usd=12.5)
    async with running_worker(client, db_pool, temporal_services, task_queue, extra_activities=[prepare_run]):
        handle = await start(client, task_queue, request(f"Refund order {order} and e-mail the customer"))
        resp = await asyncio.wait_for(handle.result(), timeout=30)
    assert await _began_with(client, handle.id) == "begin_local"
    assert resp.outcome == "completed", resp
    assert len(seen) == 2, seen
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert rows["spent"] == resp.spend.total_micros > 0, (rows, resp.spend)


@pytest.mark.parametrize(
    ("how", "cache"),
    [
        # All slow (11 s each: they outlast a workflow task's 10 s timeout); the stops inside
        # the preparation in tests/test_begin_local.py run in `make test`.
        pytest.param("temporal_cancel", 0, marks=pytest.mark.slow),
        pytest.param("temporal_cancel", 100, marks=pytest.mark.slow),
        pytest.param("cancel_update", 0, marks=pytest.mark.slow),
        pytest.param("cancel_update", 100, marks=pytest.mark.slow),
    ],
)
async def test_a_stop_while_begin_local_waits_longer_than_a_workflow_task_ends_cleanly(
    how: str,
    cache: int,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    pg_url: str,
    task_queue: str,
) -> None:
    """The preparation waits 11 s on the slot lock, longer than the 10 s workflow task
    timeout (the SDK heartbeats the task: the stop is delivered while the local activity
    still runs). Then: cancelled, one authorization and one finish row, nothing left."""
    from temporalio.client import WorkflowFailureError

    from tests.helpers import make_order, request, running_worker
    from tests.test_begin_local import _rows

    order = await make_order(db_pool, total_usd=12.5)
    update = None
    async with running_worker(client, db_pool, temporal_services, task_queue, max_cached_workflows=cache):
        async with _slot_lock_held(pg_url) as holder:
            t0 = time.monotonic()
            handle = await start(client, task_queue, request(f"Refund order {order} and e-mail the customer"))
            await _wait_blocked(pg_url)
            await asyncio.sleep(2)
            if how == "cancel_update":
                update = asyncio.ensure_future(handle.execute_update("cancel", "test: stop while preparing"))
            else:
                await handle.cancel()
            await asyncio.sleep(max(0.0, 11.0 - (time.monotonic() - t0)))
            await holder.rollback()
        if how == "cancel_update":
            resp = await asyncio.wait_for(handle.result(), timeout=30)
            assert resp.outcome == "cancelled", (resp.outcome, resp.reason)
            assert update is not None
            await asyncio.wait_for(update, timeout=10)
        else:
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), timeout=30)
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    async with db_pool.connection() as conn:
        (left,) = await (
            await conn.execute(
                "select count(*) from refunds where idempotency_key like %s and status <> 'voided'",
                (handle.id + "/%",),
            )
        ).fetchone()  # type: ignore[misc]
    assert left == 0
    from tests.test_replay import _replayer

    await _replayer().replay_workflow(await handle.fetch_history())


async def _begin_local_result(client: Client, wid: str) -> Any:
    from keel.agent_io import BeginOutput

    async for e in client.get_workflow_handle(wid).fetch_history_events():
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            m = e.marker_recorded_event_attributes
            if (
                m.marker_name == "core_local_activity"
                and b'"begin_local"' in m.details["data"].payloads[0].data
            ):
                (out,) = await client.data_converter.decode(m.details["result"].payloads, [BeginOutput])
                return out
    return None


@pytest.mark.parametrize("where", ["tier_env", "agent_definition"])
async def test_a_live_model_never_plans_inside_the_local_activity(
    where: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live model (the tier env, or an agent definition's tier, served by a local fake
    OpenAI): ``begin_local`` answers ``remote`` having done nothing, ``begin_run`` plans."""
    import json

    from keel.activities import agent_defs
    from keel.activities.models import close_clients
    from tests.helpers import make_order, request, running_worker
    from tests.providers.fake_openai import FakeOpenAI, chat
    from tests.providers.sloppy import Roles
    from tests.test_begin_local import _rows

    server = FakeOpenAI(responder=Roles()).start()
    try:
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        agent = ""
        if where == "tier_env":
            monkeypatch.setenv("KEEL_MODEL_FAST", "openai:gpt-4o-mini")
            for t in ("BALANCED", "POWERFUL"):
                monkeypatch.setenv(f"KEEL_MODEL_{t}", "offline")
        else:
            for t in ("FAST", "BALANCED", "POWERFUL"):
                monkeypatch.setenv(f"KEEL_MODEL_{t}", "offline")
            path = tmp_path / "live.yaml"
            path.write_text(
                "name: liveagent\ninstructions: You look orders up.\ntools: [lookup_order]\n"
                "tiers: {fast: 'openai:gpt-4o-mini'}\n"
            )
            monkeypatch.setenv("KEEL_AGENT_PATH", str(path))
            agent_defs.reset()
            agent = "liveagent"
        async with db_pool.connection() as conn:
            await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
        order = await make_order(db_pool)
        plan_json = {
            "steps": [{"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "check"}],
            "answer": "",
            "replan": False,
        }
        server.push(chat(json.dumps(plan_json), prompt_tokens=1000, completion_tokens=100))
        async with running_worker(client, db_pool, temporal_services, task_queue):
            req = request(f"Where is order {order}?", **({"agent": agent} if agent else {}))
            handle = await start(client, task_queue, req)
            resp = await asyncio.wait_for(handle.result(), timeout=30)
    finally:
        server.stop()
        await close_clients()
        agent_defs.reset()
    out = await _begin_local_result(client, handle.id)
    assert out is not None and out.remote and out.plan is None, out
    assert await _began_with(client, handle.id) == "begin_run"
    assert resp.outcome == "completed", (resp.outcome, resp.reason)
    assert any(m.startswith("openai:") for m in resp.spend.by_model), resp.spend
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert rows["spent"] == resp.spend.total_micros > 0, (rows, resp.spend)


@pytest.mark.parametrize("path", ["begin_local", pytest.param("begin_run", marks=pytest.mark.slow)])
async def test_a_beginning_that_gives_up_while_its_preparation_waits_leaves_no_run_slot(
    path: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    pg_url: str,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every attempt of ``begin_local`` times out while its preparation waits on the
    tenant's run-slot lock (a worker frozen inside another preparation's transaction, say).
    The SDK cancels a timed-out activity and the retry starts; ``_prepared`` shields the
    preparation, so each timed-out attempt's preparation stays queued on the lock. When
    the activity gives up, the run ends ``failed`` (finish row; the slot is released by
    workflow id, but there is none yet). Then the lock is let go and the queued
    preparations commit: they take the run slot (and write the authorization row) of a
    run that has already ended. The slot then stays until its lease expires (deadline +
    margin), one fewer concurrent run for the tenant.

    Scaled down: begin_local PREPARE_TIMEOUT 1 s x 3 attempts (really 30 s x 10, ~5.5 min);
    begin_run (the same flaw, older) MODEL_TIMEOUT 2 s x 3 (really 3 min x 5)."""
    from datetime import timedelta

    from temporalio.common import RetryPolicy

    from keel.workflows import deps
    from tests.doubles.models import ScriptedPlanner
    from tests.helpers import make_order, request, running_worker
    from tests.test_begin_local import _rows

    fast = RetryPolicy(
        initial_interval=timedelta(milliseconds=50),
        maximum_attempts=3,
        non_retryable_error_types=list(deps.LOCAL_BEGIN_RETRY.non_retryable_error_types or ()),
    )
    monkeypatch.setattr(deps, "PREPARE_TIMEOUT", timedelta(seconds=1))
    monkeypatch.setattr(deps, "LOCAL_BEGIN_RETRY", fast)
    monkeypatch.setattr(deps, "MODEL_TIMEOUT", timedelta(seconds=2))
    monkeypatch.setattr(deps, "MODEL_RETRY", fast)
    planner = ScriptedPlanner([plan(step("s1", "lookup_order", order_id="ORD-1"))])
    planner.in_process = path == "begin_local"  # type: ignore[misc]
    order = await make_order(db_pool, total_usd=12.5)
    with planner.serving():
        async with running_worker(client, db_pool, temporal_services, task_queue, max_cached_workflows=100):
            async with _slot_lock_held(pg_url) as holder:
                handle = await start(client, task_queue, request(f"Where is order {order}?"))
                await _wait_blocked(pg_url)
                resp = await asyncio.wait_for(handle.result(), timeout=30)  # ends while the lock is held
                assert resp.outcome == "failed", (resp.outcome, resp.reason)
                await holder.rollback()
            await asyncio.sleep(7 if path == "begin_run" else 1)  # the queued preparations commit
    assert await _began_with(client, handle.id) == path
    rows = await _rows(db_pool, handle.id)
    async with db_pool.connection() as conn:  # leave no leaked slot for the tests after this one
        await conn.execute("delete from run_slots where workflow_id = %s", (handle.id,))
    assert rows["slots"] == 0, rows  # a run slot taken after the run ended
    assert rows["audit"] in ([f"{handle.id}/finish"], [f"{handle.id}/authorize", f"{handle.id}/finish"]), rows


@pytest.mark.slow  # ten attempts with their backoff: `make test-slow`
async def test_an_in_process_first_plan_that_always_fails_is_charged_as_the_ledger_says(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every attempt of ``begin_local`` 503s in its plan (the whole hold committed each
    time): the local activity gives up, the run ends failed, and its reported spend is every
    attempt's, as the ledger has it; one authorization row, one finish row, nothing held."""

    from tests.doubles.models import FunctionModel
    from tests.test_begin_local import _rows

    calls: list[int] = []
    model = FunctionModel(failing_plans(calls, failures=None))
    model.in_process = True  # type: ignore[attr-defined]
    handle, resp = await run_served(
        model, client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch, within=40
    )
    assert await _began_with(client, handle.id) == "begin_local"
    assert resp.outcome == "failed", (resp.outcome, resp.reason)
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert resp.spend.model_calls == len(calls) > 1, (resp.spend, len(calls))
    assert rows["spent"] == resp.spend.total_micros, (rows, resp.spend)


@pytest.mark.parametrize("path", ["begin_run", pytest.param("begin_local", marks=pytest.mark.slow)])
async def test_a_temporal_cancel_absorbed_by_the_beginning_still_books_the_first_plan(
    path: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Temporal cancel arrives while the beginning's first plan is with the model, and the
    plan finishes anyway (begin_run: it completes before its next heartbeat would learn of
    the cancel; begin_local: a model that does not stop for a cancellation). The cancel is
    absorbed, and patch ``keel-cancel-at-safe-points`` honours it at the loop's first safe
    point, which comes BEFORE the begun plan's calls are booked (``Planner.accept``): the
    run's reported spend then misses the first plan, which the ledger has committed."""
    from temporalio.client import WorkflowFailureError

    from keel.models import ModelCall, ModelResult, Plan, RunStatus
    from tests.doubles.models import FunctionModel, reply
    from tests.helpers import request, running_worker
    from tests.scripted import serve_test_tools
    from tests.test_begin_local import _rows

    seconds = 2.0 if path == "begin_run" else 10.0  # begin_local: past a workflow-task heartbeat

    async def slow(call: ModelCall) -> ModelResult | None:
        if call.role != "plan":
            return None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(end - time.monotonic())
        return reply(call, Plan(steps=(step("s1", "echo", note="hi"),)).model_dump(mode="json"), billed=True)

    model = FunctionModel(slow)
    model.in_process = path == "begin_local"  # type: ignore[attr-defined]
    serve_test_tools(monkeypatch)
    with model.serving():
        async with running_worker(
            client, db_pool, temporal_services, task_queue, policy_file=write_policy(tmp_path)
        ):
            handle = await start(client, task_queue, request("echo hi"))
            await asyncio.sleep(0.5)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), timeout=40)
            status = await handle.query("status", result_type=RunStatus)
    assert await _began_with(client, handle.id) == path
    from keel.workflows.stop import CANCEL_AT_SAFE_POINTS_PATCH
    from tests.test_replay import _replayer

    history = await handle.fetch_history()
    patches = [
        e.marker_recorded_event_attributes.details["patch-data"].payloads[0].data
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and e.marker_recorded_event_attributes.marker_name == "core_patch"
    ]
    assert any(CANCEL_AT_SAFE_POINTS_PATCH.encode() in p for p in patches), patches
    await _replayer().replay_workflow(history)  # the marker at the loop's first safe point replays
    assert status.outcome == "cancelled", status
    rows = await _rows(db_pool, handle.id)
    assert rows["slots"] == 0 and rows["held"] == [], rows
    assert rows["spent"] and rows["spent"] > 0, rows  # the first plan was charged
    assert status.spend.total_micros == rows["spent"], (status.spend, rows)  # ...and reported
