"""Attacks on ``begin_run`` (patch ``keel-23-begin-run``): a run's preparation and its first
plan in one activity.

What must hold: the tenant's run limit is still enforced when many runs start at once (each
refused run reaches no model and holds nothing, the admitted ones never exceed the limit);
a run cancelled through Temporal (not the ``cancel`` update) while ``begin_run`` is in its
first plan ends cleanly: its finish row, no slot, no open hold, its spend the ledger's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError

from bench.bench_recovery import start_worker, wait_polling, worker_environment
from keel.activities import ledger
from keel.activities.concurrency import in_flight
from keel.activities.models import close_clients
from keel.budget import scope_path
from keel.models import AgentResponse, ModelCall, ModelResult, Plan
from keel.settings import Settings
from tests.doubles.models import FunctionModel, reply, step
from tests.helpers import make_order, request, run_agent, running_worker
from tests.providers import fake_openai as fo
from tests.providers.fake_openai import FakeOpenAI
from tests.providers.sloppy import Roles, ledger_model_rows, role_of, server_bill
from tests.scripted import serve_test_tools, start, write_policy


class _Gated(FunctionModel):
    """A model whose plans wait for ``release``; it records every call it is sent."""

    def __init__(self) -> None:
        super().__init__(self._reply)
        self.calls: list[ModelCall] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def _reply(self, call: ModelCall) -> ModelResult | None:
        self.calls.append(call)
        if call.role != "plan":
            return None
        self.entered.set()
        await self.release.wait()
        return reply(call, Plan(steps=(step("s1", "echo", note="hi"),)).model_dump(mode="json"))


async def _state(pool: AsyncConnectionPool, wids: list[str]) -> dict[str, Any]:
    async with pool.connection() as conn:
        slots = await (
            await conn.execute("select workflow_id from run_slots where workflow_id = any(%s)", (wids,))
        ).fetchall()
        holds = await (
            await conn.execute(
                "select run_id, status from keel_budget_reservations where run_id = any(%s)", (wids,)
            )
        ).fetchall()
        finish = await (
            await conn.execute(
                "select workflow_id from audit_log where idem_key = any(%s)", ([f"{w}/finish" for w in wids],)
            )
        ).fetchall()
    return {"slots": {s for (s,) in slots}, "holds": holds, "finish": sorted(w for (w,) in finish)}


async def test_a_burst_beyond_the_tenants_run_limit_admits_only_the_limit(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six runs of one tenant started at once under a limit of two: while the admitted runs
    sit in their first plan, the four others end ``denied`` without a model call, a hold or
    a slot; never more than two slots; then every run ends with its finish row, no slot is
    left and each admitted run's spend is its ledger scope's."""
    # A cache, unlike the other end-to-end tests: with none, the refused runs' workflow tasks
    # (each running the finish_run local activity) time out one after another, 10 s each.
    limit, n = 2, 6
    async with db_pool.connection() as conn:
        held = await in_flight(conn, "acme")  # earlier tests' runs may still hold acme slots
    monkeypatch.setenv("KEEL_MAX_RUNS_ACME", str(held + limit))
    model = _Gated()
    serve_test_tools(monkeypatch)
    with model.serving():
        async with running_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            policy_file=write_policy(tmp_path),
            max_cached_workflows=100,
        ):
            handles = await asyncio.gather(*(start(client, task_queue, request("echo hi")) for _ in range(n)))
            wids = [h.id for h in handles]
            await asyncio.wait_for(model.entered.wait(), timeout=30)
            # The refused runs end on their own; the admitted ones wait in their plan.
            refused: list[Any] = []
            for _ in range(300):
                refused = []
                for h in handles:
                    d = await h.describe()
                    if d.status is not None and d.status.name == "COMPLETED":
                        refused.append(await h.result())
                if len(refused) == n - limit:
                    break
                await asyncio.sleep(0.1)
            mid = await _state(db_pool, wids)
            plans = [c for c in model.calls if c.role == "plan"]
            assert len(refused) == n - limit, refused
            assert all(r.outcome == "denied" and r.spend.total_micros == 0 for r in refused), refused
            assert all(r.spend.model_calls == 0 for r in refused), refused
            assert len(mid["slots"]) == limit and len(plans) == limit, (mid, len(plans))
            model.release.set()
            resps = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=90)
    end = await _state(db_pool, wids)
    assert end["slots"] == set() and all(s != "held" for _, s in end["holds"]), end
    assert end["finish"] == sorted(wids), end
    admitted = [(h.id, r) for h, r in zip(handles, resps, strict=True) if r.outcome != "denied"]
    assert len(admitted) == limit, [r.outcome for r in resps]
    assert {w for w, _ in end["holds"]} <= {w for w, _ in admitted}, end  # refused runs held nothing
    async with db_pool.connection() as conn:
        for wid, r in admitted:
            view = await ledger.show(conn, scope_path("acme", "default", "alice", wid)[-1])
            assert (
                view is not None and view.spent_micros == r.spend.total_micros and view.reserved_micros == 0
            )


async def test_a_temporal_cancel_during_the_first_plan_ends_the_run_cleanly(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``handle.cancel()`` (an operator's ``temporal workflow cancel``) while ``begin_run``'s
    model call is in flight: the run ends ``cancelled`` with its authorization and finish
    rows once each, no slot, no open hold, and the spend it reports is the ledger's."""
    model = _Gated()
    serve_test_tools(monkeypatch)
    with model.serving():
        async with running_worker(
            client, db_pool, temporal_services, task_queue, policy_file=write_policy(tmp_path)
        ):
            handle = await start(client, task_queue, request("echo hi"))
            await asyncio.wait_for(model.entered.wait(), timeout=30)
            await handle.cancel()
            try:
                with pytest.raises(WorkflowFailureError) as ended:
                    await asyncio.wait_for(handle.result(), timeout=60)
            finally:
                model.release.set()
    # A Temporal cancel ends the workflow Canceled (patch keel-cancel-ends-canceled), after
    # its ending ran.
    assert isinstance(ended.value.cause, CancelledError), ended.value
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    st = await _state(db_pool, [handle.id])
    assert st["slots"] == set() and st["finish"] == [handle.id], st
    assert all(s != "held" for _, s in st["holds"]), st
    async with db_pool.connection() as conn:
        keys = [
            k
            for (k,) in await (
                await conn.execute(
                    "select idem_key from audit_log where workflow_id=%s and kind='run'", (handle.id,)
                )
            ).fetchall()
        ]
        view = await ledger.show(conn, scope_path("acme", "default", "alice", handle.id)[-1])
        (booked,) = await (
            await conn.execute(
                "select coalesce(sum(actual_micros), 0) from keel_budget_reservations where run_id=%s",
                (handle.id,),
            )
        ).fetchone() or (None,)
    assert [k for k in keys if "/authorize" in k] == [f"{handle.id}/authorize"], keys
    assert keys.count(f"{handle.id}/finish") == 1, keys
    # The cancelled plan's hold was settled, not left held; what it booked is all the run spent.
    assert st["holds"] and view is not None and view.reserved_micros == 0, (st, view)
    assert view.spent_micros == booked, (view, booked)


async def test_the_deadline_stops_a_run_whose_first_plan_never_answers(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request's deadline (2 s, known to the workflow before begin_run starts) passes
    while begin_run's model call hangs: the run must end at its deadline, not at the model
    call's timeout, with its finish row, no slot and nothing held."""
    model = _Gated()
    serve_test_tools(monkeypatch)
    with model.serving():
        async with running_worker(
            client, db_pool, temporal_services, task_queue, policy_file=write_policy(tmp_path)
        ):
            handle = await start(client, task_queue, request("echo hi", deadline_seconds=2))
            try:
                await asyncio.wait_for(model.entered.wait(), timeout=30)
                try:
                    resp = await asyncio.wait_for(handle.result(), timeout=10)
                except TimeoutError:
                    resp = None
            finally:
                model.release.set()
                if resp is None:  # let the run end before the worker goes
                    await handle.terminate("test: the deadline did not stop the run")
    assert resp is not None, "the run outlived its 2 s deadline by 10 s, still in its first plan"
    assert "deadline" in resp.flags and resp.outcome == "escape_hatch", resp
    st = await _state(db_pool, [handle.id])
    assert st["slots"] == set() and st["finish"] == [handle.id], st
    assert st["holds"] and all(s != "held" for _, s in st["holds"]), st
    # The interrupted call may have been billed: its whole hold is charged, to the run too.
    async with db_pool.connection() as conn:
        (booked,) = await (
            await conn.execute(
                "select coalesce(sum(actual_micros), 0) from keel_budget_reservations where run_id=%s",
                (handle.id,),
            )
        ).fetchone() or (None,)
    assert booked > 0 and resp.spend.total_micros == booked, (resp.spend, booked)


@pytest.fixture
def openai_roles(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOpenAI, Roles]]:
    roles = Roles()
    server = FakeOpenAI(responder=roles).start()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    yield server, roles
    server.stop()


async def test_a_first_plan_that_5xxs_twice_is_charged_once_per_answered_call(
    openai_roles: tuple[FakeOpenAI, Roles],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    """Through the real OpenAI SDK: the provider answers begin_run's first two plans with a
    503, then a plan. begin_run runs three times (each preparing again): one authorization
    row, one hold per call the server answered, each committed once (the 503s at their hold,
    the others at the server's bill), and the ledger's sum is the run's reported spend."""
    server, roles = openai_roles
    await close_clients()
    try:
        order = await make_order(db_pool)
        roles.raw.extend([fo.error(503, "overloaded", type_="server_error")] * 2)
        roles.plans.append(
            {
                "steps": [{"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"}],
                "answer": "",
            }
        )
        roles.answers.append(f"Order {order} is shipped.")
        async with running_worker(client, db_pool, temporal_services, task_queue):
            resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    finally:
        await close_clients()
    assert resp.outcome == "completed", (resp.reason, [role_of(r) for r, _ in server.answered])
    wid = resp.workflow_id
    attempts = [
        e.activity_task_started_event_attributes.attempt
        async for e in client.get_workflow_handle(wid).fetch_history_events()
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert attempts[0] == 3, attempts  # begin_run's third attempt served the run
    rows = await ledger_model_rows(db_pool, wid)
    answered, _, costs = server_bill([(server, "openai")])
    # One committed hold per answered call, in order: the 503s at their full hold (a 5xx may
    # have been billed unseen: activities/models/errors.py billed_nothing), the rest at
    # exactly what the server's usage prices.
    assert len(rows) == answered == len(server.answered) and all(r[1] == "committed" for r in rows), rows
    failed = [r for r, (_, reply) in zip(rows, server.answered, strict=True) if reply.status != 200]
    assert [r[0] for r in failed] == [f"{wid}/plan1/call1", f"{wid}/plan1/call2"], rows
    assert sum(r[2] for r in rows) - sum(r[2] for r in failed) == sum(costs), (rows, costs)
    assert sum(resp.spend.by_model.values()) == sum(r[2] for r in rows), (resp.spend, rows)
    async with db_pool.connection() as conn:
        keys = [
            k
            for (k,) in await (
                await conn.execute(
                    "select idem_key from audit_log where workflow_id=%s and kind='run'", (wid,)
                )
            ).fetchall()
        ]
        view = await ledger.show(conn, scope_path("acme", "default", "alice", wid)[-1])
    # Every authorization row of the run, whatever its key: a retry must not append another.
    assert [k for k in keys if "/authorize" in k] == [f"{wid}/authorize"], keys
    assert keys.count(f"{wid}/finish") == 1, keys
    assert view is not None and view.reserved_micros == 0 and view.spent_micros == resp.spend.total_micros


@pytest.mark.slow  # the dead worker's begin_run is noticed at its 30 s heartbeat timeout
@pytest.mark.timeout(300)
@pytest.mark.parametrize("then", ["retry", "cancel"])
async def test_sigkill_during_the_first_plans_model_call_books_it_once_and_duplicates_nothing(
    then: str,
    client: Client,
    temporal_services: Settings,
    db_pool: AsyncConnectionPool,
    pg_url: str,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A real ``worker.py`` is SIGKILLed while begin_run's first model call is at the provider
    (the fake server holds its answer): its hold was placed and never settled by the dead
    attempt. A fresh worker retries begin_run (preparing again) to a completed run. Then:
    one authorization row, no slot, every hold of the run settled, the killed call booked
    once at its full hold (it may have been billed), the others at the server's bill, and
    the ledger's sum the run's reported spend. ``cancel``: the run is cancelled right after
    the kill, so begin_run is never retried and ends by its heartbeat timeout, without
    details: the run must still book the hold the dead attempt left."""
    roles = Roles()
    server = FakeOpenAI(responder=roles).start()
    first = second = None
    try:
        order = await make_order(db_pool)
        plan = {"steps": [{"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"}]}
        roles.raw.append(dataclasses.replace(roles.reply({**plan, "answer": ""}), delay_s=60))
        roles.plans.append({**plan, "answer": ""})
        roles.answers.append(f"Order {order} is shipped.")
        queue = f"begin-kill-{uuid.uuid4().hex[:8]}"
        env = {
            **worker_environment(temporal_services, queue, test_env),
            "OPENAI_API_KEY": "sk-test-not-a-real-key-000000000000",
            "OPENAI_BASE_URL": server.url + "/v1",
        }
        first = start_worker(env, tmp_path, "first")
        await wait_polling(client, queue, first, within=90)
        handle = await start(client, queue, request(f"Where is order {order}?"))
        deadline = time.monotonic() + 60
        while not server.answered:  # the first plan's request reached the provider
            assert time.monotonic() < deadline, "begin_run never called the model"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        first.kill()
        second = start_worker(env, tmp_path, "second")
        await wait_polling(client, queue, second, within=90)
        if then == "cancel":
            await handle.execute_update("cancel", "test: cancel after the worker died")
        resp: AgentResponse = await asyncio.wait_for(handle.result(), timeout=180)
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        server.stop()
    assert resp.outcome == ("completed" if then == "retry" else "cancelled"), resp.reason
    wid = handle.id
    rows = await ledger_model_rows(db_pool, wid)
    answered, _, costs = server_bill([(server, "openai")])
    assert all(r[1] == "committed" for r in rows), rows  # nothing left held
    assert len(rows) == answered, (rows, answered)
    killed = [r for r in rows if r[0] == f"{wid}/plan1/call1"]
    assert len(killed) == 1 and killed[0][2] > 0, rows  # the unseen call is booked at its hold
    assert sum(r[2] for r in rows) - killed[0][2] == sum(costs[1:]), (rows, costs)
    assert sum(resp.spend.by_model.values()) == sum(r[2] for r in rows), (resp.spend, rows)
    async with db_pool.connection() as conn:
        keys = [
            k
            for (k,) in await (
                await conn.execute(
                    "select idem_key from audit_log where workflow_id=%s and kind='run'", (wid,)
                )
            ).fetchall()
        ]
        slots = await (
            await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
        ).fetchone()
        view = await ledger.show(conn, scope_path("acme", "default", "alice", wid)[-1])
    assert [k for k in keys if "/authorize" in k] == [f"{wid}/authorize"], keys
    assert keys.count(f"{wid}/finish") == 1 and slots == (0,), (keys, slots)
    assert view is not None and view.reserved_micros == 0 and view.spent_micros == resp.spend.total_micros
