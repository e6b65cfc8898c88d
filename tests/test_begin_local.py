"""``begin_local`` (patch ``keel-23-begin-local``): with only the built-in offline model, a
run's preparation and first plan are a local activity inside its first workflow task.

What must hold, and what each test tries to break:

- the in-process path is taken only when no model can wait or fail: a provider served in
  the offline model's place that does not declare itself in process sends the run to the
  ``begin_run`` activity, with nothing prepared twice (one authorization row);
- the offline plan is charged like any model call (the run's spend is the ledger's);
- a stop that arrives while the local activity waits inside its preparation (here: on the
  tenant's run-slot lock, held by the test) is honoured only after the preparation has
  committed, for the ``cancel`` update and for a Temporal cancel alike: the run ends
  cancelled with its finish row, no run slot and no open hold;
- a preparation that fails (a broken policy file) ends the run ``failed`` with the local
  activity named, and cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from keel.activities import ledger
from keel.budget import scope_path
from keel.errors import UNAVAILABLE
from keel.models import AgentResponse, ModelCall, ModelResult, Plan
from keel.settings import Settings
from tests.doubles.models import FunctionModel, reply, step
from tests.helpers import make_order, request, running_worker
from tests.scripted import serve_test_tools, start, write_policy
from tests.test_replay import _shape

SLOT_LOCK_CLASS = 7_345_005  # activities/concurrency.py _LOCK_CLASS


async def _activities(client: Client, wid: str) -> tuple[list[bytes], list[str]]:
    """The run's local-activity markers (their metadata) and its scheduled activities."""
    _, local, remote = _shape(await client.get_workflow_handle(wid).fetch_history())
    return local, remote


async def _rows(pool: AsyncConnectionPool, wid: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        audit = await (
            await conn.execute(
                "select idem_key from audit_log where workflow_id=%s and kind='run' order by seq", (wid,)
            )
        ).fetchall()
        holds = await (
            await conn.execute("select status from keel_budget_reservations where key like %s", (wid + "/%",))
        ).fetchall()
        slots = await (
            await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
        ).fetchone()
        view = await ledger.show(conn, scope_path("acme", "default", "alice", wid)[-1])
    return {
        "audit": [k for (k,) in audit],
        "held": [s for (s,) in holds if s == "held"],
        "slots": slots[0] if slots else None,
        "spent": view.spent_micros if view else None,
        "reserved": view.reserved_micros if view else None,
    }


def _clean(rows: dict[str, Any], wid: str) -> None:
    assert rows["audit"] == [f"{wid}/authorize", f"{wid}/finish"], rows  # prepared once, ended once
    assert rows["slots"] == 0 and rows["held"] == [] and rows["reserved"] in (0, None), rows


def failing_plans(
    calls: list[int], *, failures: int | None = 1, billed: bool = False
) -> Callable[[ModelCall], Awaitable[ModelResult | None]]:
    """A planner that answers its first ``failures`` plan calls with a 503 (``None``: every
    one), then plans one ``echo`` step; every plan call is counted in ``calls``."""

    async def plans(call: ModelCall) -> ModelResult | None:
        if call.role != "plan":
            return None
        calls.append(1)
        if failures is None or len(calls) <= failures:
            raise ApplicationError("scripted: unavailable (503)", type=UNAVAILABLE)
        planned = Plan(steps=(step("s1", "echo", note="hi"),)).model_dump(mode="json")
        return reply(call, planned, billed=billed)

    return plans


async def run_served(
    model: FunctionModel,
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    within: float = 60,
) -> tuple[WorkflowHandle[Any, AgentResponse], AgentResponse]:
    """One ``echo hi`` run on a worker whose offline model is ``model`` (test tools, test policy)."""
    serve_test_tools(monkeypatch)
    with model.serving():
        async with running_worker(client, pool, settings, task_queue, policy_file=write_policy(tmp_path)):
            handle = await start(client, task_queue, request("echo hi"))
            resp = await asyncio.wait_for(handle.result(), timeout=within)
    return handle, resp


async def test_an_offline_run_begins_in_process_and_its_plan_is_charged(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = await make_order(db_pool, total_usd=12.5)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        handle = await start(client, task_queue, request(f"Refund order {order} and e-mail the customer"))
        resp = await handle.result()
    assert resp.outcome == "completed", resp
    local, remote = await _activities(client, handle.id)
    assert b'"begin_local"' in local[0], local
    # The demo's tools are quick and in-process: local activities (keel-23-local-tools), but
    # the first, which ends the workflow task that began the run.
    assert remote == ["run_tool"] and sum(b'"run_tool"' in d for d in local) == 2, (local, remote)
    assert resp.spend.model_calls >= 1 and resp.model_label.startswith("offline"), resp
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert rows["spent"] == resp.spend.total_micros > 0, (rows, resp.spend)  # the plan was charged


async def test_a_served_model_that_may_fail_begins_with_begin_run_and_prepares_once(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider in the offline model's place that does not say it is in process (it
    fails once here, as a network model would): ``begin_local`` answers ``remote`` having
    done nothing, and ``begin_run``'s retry is what plans."""
    calls: list[int] = []
    handle, resp = await run_served(
        FunctionModel(failing_plans(calls)),
        client,
        db_pool,
        temporal_services,
        task_queue,
        tmp_path,
        monkeypatch,
    )
    assert resp.outcome in ("completed", "partial"), resp
    local, remote = await _activities(client, handle.id)
    assert b'"begin_local"' in local[0] and remote[0] == "begin_run", (local, remote)
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    assert rows["spent"] == resp.spend.total_micros and len(calls) == 2, (rows, calls)


@contextlib.asynccontextmanager
async def _slot_lock_held(pg_url: str, tenant: str = "acme"):  # type: ignore[no-untyped-def]
    """Hold the tenant's run-slot lock, so a preparation blocks inside its transaction."""
    holder = await psycopg.AsyncConnection.connect(pg_url)
    try:
        await holder.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (SLOT_LOCK_CLASS, tenant))
        yield holder
    finally:
        with contextlib.suppress(psycopg.Error):
            await holder.rollback()
        await holder.close()


async def _wait_blocked(pg_url: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = await (
                await conn.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                    "and query ilike '%pg_advisory_xact_lock%' and pid <> pg_backend_pid()"
                )
            ).fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the preparation never waited on the run-slot lock")


@pytest.mark.parametrize("how", ["cancel_update", "temporal_cancel"])
async def test_a_stop_while_begin_local_is_inside_its_preparation_ends_cleanly(
    how: str,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    pg_url: str,
    task_queue: str,
) -> None:
    order = await make_order(db_pool, total_usd=12.5)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        async with _slot_lock_held(pg_url) as holder:
            handle: WorkflowHandle[Any, AgentResponse] = await start(
                client, task_queue, request(f"Refund order {order} and e-mail the customer")
            )
            await _wait_blocked(pg_url)
            if how == "cancel_update":
                # Delivered once the workflow task that runs the local activity ends.
                update = asyncio.ensure_future(handle.execute_update("cancel", "test: stop while preparing"))
            else:
                await handle.cancel()
            await asyncio.sleep(0.5)
            await holder.rollback()  # let the preparation commit: only then may the run end
        if how == "cancel_update":
            resp = await asyncio.wait_for(handle.result(), timeout=60)
            assert resp.outcome == "cancelled", resp
            await asyncio.wait_for(update, timeout=10)
        else:
            with pytest.raises(WorkflowFailureError):  # a Temporal cancel ends the run Canceled
                await asyncio.wait_for(handle.result(), timeout=60)
    rows = await _rows(db_pool, handle.id)
    _clean(rows, handle.id)
    async with db_pool.connection() as conn:
        refunds = await (
            await conn.execute(
                "select count(*) from refunds where idempotency_key like %s", (handle.id + "/%",)
            )
        ).fetchone()
    # Whatever ran before the stop was honoured is undone: no refund stands.
    assert refunds is not None
    if refunds[0]:
        async with db_pool.connection() as conn:
            left = await (
                await conn.execute(
                    "select count(*) from refunds where idempotency_key like %s and status <> 'voided'",
                    (handle.id + "/%",),
                )
            ).fetchone()
        assert left is not None and left[0] == 0, left


async def test_a_preparation_that_fails_in_process_ends_the_run_failed_and_cleanly(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
) -> None:
    policy = tmp_path / "broken.yaml"
    policy.write_text("roles: [unterminated\n")
    async with running_worker(client, db_pool, temporal_services, task_queue, policy_file=policy):
        handle = await start(client, task_queue, request("Status of ORD-1?"))
        resp = await asyncio.wait_for(handle.result(), timeout=60)
    assert resp.outcome == "failed" and resp.reason.startswith("begin_local failed: "), resp
    assert "activity_failed" in resp.flags and resp.spend.total_micros == 0, resp
    local, remote = await _activities(client, handle.id)
    assert b'"begin_local"' in local[0] and remote == [], (local, remote)
    rows = await _rows(db_pool, handle.id)
    assert rows["audit"] == [f"{handle.id}/finish"] and rows["slots"] == 0 and rows["held"] == [], rows
