"""Global per-tool rate limits (Temporal task-queue rate) and per-tenant run slots."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from keel.activities import concurrency
from keel.activities.concurrency import (
    acquire_run_slot,
    acquire_run_slot_in,
    in_flight,
    release_run_slot,
    tenant_run_limit,
    ttl_for,
)
from keel.activities.tools import registry
from keel.activities.tools.registry import REGISTRY, ToolContext, tool
from keel.client import connect
from keel.models import ToolCall, ToolResult
from keel.settings import Settings
from keel.worker import build_workers

RATE = 2.0
CALLS = 10


class _Args(BaseModel):
    i: int = 0


@workflow.defn(name="RateProbe", sandboxed=False)
class RateProbe:
    """Fans ``n`` tool calls out at once onto the tool's own (rate-limited) task queue."""

    @workflow.run
    async def run(self, args: list[Any]) -> int:
        name, queue, n = args
        results = await asyncio.gather(
            *(
                workflow.execute_activity(
                    "run_tool",
                    ToolCall(
                        tool=name,
                        args={"i": i},
                        tenant="acme",
                        idempotency_key=f"{workflow.info().workflow_id}/s{i}",
                    ),
                    result_type=ToolResult,
                    task_queue=queue,
                    start_to_close_timeout=timedelta(seconds=30),
                )
                for i in range(n)
            )
        )
        return len(results)


async def test_tool_rate_limit_holds_across_two_workers(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    name = f"rl_{uuid.uuid4().hex[:6]}"
    starts: list[float] = []

    async def limited(ctx: ToolContext, args: _Args) -> dict[str, Any]:
        starts.append(time.monotonic())
        return {"i": args.i}

    tool(name, description="rate-limited test tool", args=_Args, rate_limit_per_second=RATE, hidden=True)(
        limited
    )
    try:
        # Two "hosts" (two connections: one client may not run two workers on one queue),
        # each with the full worker set, including its own poller of the tool's queue with
        # max_task_queue_activities_per_second=RATE.
        second_host = await connect(temporal_services)
        fleet = [
            *build_workers(client, db_pool, temporal_services, task_queue=task_queue),
            *build_workers(second_host, db_pool, temporal_services, task_queue=task_queue),
        ]
        tool_queue = f"{task_queue}-tool-{name}"
        assert sum(w.task_queue == tool_queue for w in fleet) == 2  # type: ignore[attr-defined]
        probe = Worker(
            client,
            task_queue=f"{task_queue}-probe",
            workflows=[RateProbe],
            workflow_runner=UnsandboxedWorkflowRunner(),
        )
        async with contextlib.AsyncExitStack() as stack:
            for w in [*fleet, probe]:
                await stack.enter_async_context(w)
            done = await client.execute_workflow(
                "RateProbe",
                [name, tool_queue, CALLS],
                id=f"rate-probe-{uuid.uuid4()}",
                task_queue=f"{task_queue}-probe",
                result_type=int,
            )
    finally:
        REGISTRY.pop(name, None)
        registry._HIDDEN.discard(name)
    assert done == CALLS and len(starts) == CALLS
    starts.sort()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
    # Temporal's matching service enforces the queue's rate with token buckets on the queue's
    # partitions (the dev server has 4, each refilling at RATE/4): a burst of up to one start
    # per partition, then never faster than RATE sustained — for the queue as a whole, not
    # per worker. Were the limit per worker, these two workers would run at 2 x RATE.
    sustained = (len(starts) - 1) / (starts[-1] - starts[0])
    assert sustained <= RATE * 1.05, (sustained, gaps)
    assert sum(g >= 0.5 / RATE for g in gaps) >= (CALLS - 4) // 2, gaps  # throttled, not bursty


# ------------------------------------------------------------------ per-tenant run slots
async def test_run_slots_limit_per_tenant_are_idempotent_and_expire(
    db_pool: AsyncConnectionPool,
) -> None:
    tenant, other = f"t{uuid.uuid4().hex[:6]}", f"o{uuid.uuid4().hex[:6]}"
    async with db_pool.connection() as conn:
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/a", 2, 60)
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/a", 2, 60)  # retry: same slot
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/b", 2, 60)
        assert not await acquire_run_slot(conn, tenant, f"agent/{tenant}/c", 2, 60)
        assert await acquire_run_slot(conn, other, f"agent/{other}/a", 2, 60)  # tenants apart
        assert await in_flight(conn, tenant) == 2
        held = await release_run_slot(conn, f"agent/{tenant}/a")
        assert held is not None and held >= 0
        assert await release_run_slot(conn, f"agent/{tenant}/a") is None
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/c", 2, 60)
        # A dead run's lease ends on the database clock and frees its slot.
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/d", 3, 0.3)
        assert not await acquire_run_slot(conn, tenant, f"agent/{tenant}/e", 3, 60)
        await asyncio.sleep(0.4)
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/e", 3, 60)
        assert await acquire_run_slot(conn, tenant, f"agent/{tenant}/u", None, 60)  # unlimited


async def test_run_slots_never_oversubscribe_under_concurrency(
    db_pool: AsyncConnectionPool,
) -> None:
    tenant = f"c{uuid.uuid4().hex[:6]}"

    async def start(i: int) -> bool:
        async with db_pool.connection() as conn:
            return await acquire_run_slot(conn, tenant, f"agent/{tenant}/r{i}", 3, 60)

    granted = await asyncio.gather(*(start(i) for i in range(15)))
    assert sum(granted) == 3
    async with db_pool.connection() as conn:
        assert await in_flight(conn, tenant) == 3


async def test_a_silent_slot_lock_holder_is_cut_off_and_a_waiter_is_not(
    pg_url: str, monkeypatch: Any
) -> None:
    """The tenant's slot lock is bounded from the moment it is had (``TRANSACTION_BOUND_MS``,
    here 1 s instead of 10): a transaction that holds it and then hears nothing from its
    client (a frozen worker) is ended by the server and the next one goes on; a transaction
    that only waited for the lock longer than the bound is not cut off for the wait."""
    monkeypatch.setattr(concurrency, "TRANSACTION_BOUND_MS", 1000)
    tenant = f"f{uuid.uuid4().hex[:6]}"
    conns = [await psycopg.AsyncConnection.connect(pg_url) for _ in range(4)]
    holder, waiter, silent, late = conns
    try:
        # A longer default configured for the session (as a role or database default would be)
        # starts its timer at BEGIN, and setting a new value alone would not restart it: the
        # bound resets it first, so the silent holder below is still ended after 1 s.
        await silent.execute("set transaction_timeout = 60000")
        await silent.commit()
        await holder.execute("select pg_advisory_xact_lock(7345005, hashtext(%s))", (tenant,))
        waiting = asyncio.ensure_future(acquire_run_slot(waiter, tenant, f"agent/{tenant}/a", None, 60))
        await asyncio.sleep(1.5)  # longer than the bound, all of it waiting for the lock
        assert not waiting.done()
        await holder.rollback()
        assert await asyncio.wait_for(waiting, 5)  # the slot is taken and committed
        assert await acquire_run_slot_in(silent, tenant, f"agent/{tenant}/b", None, 60)  # and silent
        t0 = time.monotonic()
        assert await asyncio.wait_for(acquire_run_slot(late, tenant, f"agent/{tenant}/c", None, 60), 10)
        assert 0.5 < time.monotonic() - t0 < 5, time.monotonic() - t0  # waited for the bound only
        with pytest.raises((psycopg.errors.TransactionTimeout, psycopg.OperationalError)):
            await silent.execute("select 1")
        assert await in_flight(late, tenant) == 2  # a and c: the silent one's b rolled back
    finally:
        for conn in conns:
            await conn.close()


def test_tenant_run_limit_from_environment() -> None:
    assert tenant_run_limit("acme", {}) is None
    assert tenant_run_limit("acme", {"KEEL_MAX_RUNS_PER_TENANT": "5"}) == 5
    env = {"KEEL_MAX_RUNS_PER_TENANT": "5", "KEEL_MAX_RUNS_BIG_CO": "50"}
    assert tenant_run_limit("big-co", env) == 50
    assert tenant_run_limit("acme", {"KEEL_MAX_RUNS_PER_TENANT": "0"}) is None
    assert ttl_for(300) == 600


async def test_prepare_run_never_oversubscribes_and_every_run_has_its_audit_row(
    db_pool: AsyncConnectionPool, settings: Settings, monkeypatch: Any
) -> None:
    """The slot check as runs meet it: ``prepare_run`` takes the slot in a pipelined
    transaction (lock, renewal and count in one round trip, the slot's insert queued with the
    audit row). Fifteen preparations at once under a limit of three: exactly three are
    authorized; each holds a slot and an ``allow`` row, each refused one a ``deny`` row
    (``tenant-concurrency``) and no slot; a retried preparation renews its slot instead of
    taking another, and the ending frees it for the next run."""
    from temporalio.testing import ActivityEnvironment

    from keel.activities.agent import AgentActivities
    from keel.agent_io import FinishInput, PrepareInput
    from tests.helpers import request

    async with db_pool.connection() as conn:
        held = await in_flight(conn, "acme")  # other tests' runs may still hold acme slots
    monkeypatch.setenv("KEEL_MAX_RUNS_ACME", str(held + 3))
    acts, env = AgentActivities(db_pool, settings), ActivityEnvironment()
    reqs = [request("look up order ORD-1") for _ in range(15)]
    wids = [f"agent/acme/{r.request_id}" for r in reqs]

    def prep(i: int) -> Any:
        return env.run(acts.prepare_run, PrepareInput(request=reqs[i], workflow_id=wids[i], chain_id=f"c{i}"))

    ctxs = await asyncio.gather(*(prep(i) for i in range(15)))
    granted = [i for i, c in enumerate(ctxs) if c.authorized]
    assert len(granted) == 3, [c.rule for c in ctxs]
    assert {c.rule for i, c in enumerate(ctxs) if i not in granted} == {"tenant-concurrency"}
    async with db_pool.connection() as conn:
        slots = {r[0] for r in await (await conn.execute("select workflow_id from run_slots")).fetchall()}
        rows = await (
            await conn.execute(
                "select workflow_id, decision, data->>'rule' from audit_log "
                "where idem_key = any(%s) order by workflow_id",
                ([f"{w}/authorize" for w in wids],),
            )
        ).fetchall()
    assert {w for w in wids if w in slots} == {wids[i] for i in granted}
    assert {(w, d) for w, d, _ in rows} == {
        (w, "allow" if i in granted else "deny") for i, w in enumerate(wids)
    }
    assert all(memo.memory == "" and memo.prior_totals == {} for memo in ctxs if not memo.authorized)

    again = await prep(granted[0])  # a retry of a granted preparation: the same slot, renewed
    assert again.authorized
    assert (await prep(next(i for i in range(15) if i not in granted))).rule == "tenant-concurrency"
    first = granted[0]
    await env.run(acts.finish_run, FinishInput(workflow_id=wids[first], request=reqs[first], iterations=1))
    late = request("look up order ORD-1")
    ctx = await env.run(
        acts.prepare_run,
        PrepareInput(request=late, workflow_id=f"agent/acme/{late.request_id}", chain_id="late"),
    )
    assert ctx.authorized  # the finished run's slot went back
