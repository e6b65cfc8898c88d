"""Issue 17, cumulative limits where the money moves: concurrent runs cannot together pass
what each passed alone.

The gate judges a refund against the sums it could see when its run started, so N runs that
start together on one order all see nothing refunded. The refund tool re-checks every
cumulative limit of the policy inside its effect's transaction, under a lock on the limit's
scope (order, run, tenant-day). Checked in the database: the sum of issued refunds never
exceeds the maximum, and nothing crosses the approval threshold without a human.

The end-to-end cases use real workers, the real workflow and the obedient model (a fake
OpenAI server); the tenant-day and run scopes are driven through the real tool activity
(``run_tool`` in an ``ActivityEnvironment``) with the gate the workflow would send.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import audit
from keel.activities.tools.execute import ToolActivities
from keel.models import AgentResponse, Approval, EffectLimit, RunStatus, StepGate, StepState, ToolCall
from keel.settings import Settings
from tests.adversarial.obedient import ObedientModel
from tests.helpers import make_order, request, running_worker
from tests.scripted import start

SHIPPED = Path(__file__).parent.parent / "config" / "policy.yaml"


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[ObedientModel]:
    server = ObedientModel().start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    try:
        yield server
    finally:
        server.stop()


async def _issued(pool: AsyncConnectionPool, order: str) -> int:
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "select coalesce(sum(amount_micros), 0) from refunds where order_id=%s and status='issued'",
                (order,),
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _wait_waiting(handle: WorkflowHandle[Any, AgentResponse], within: float = 60.0) -> RunStatus:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = await handle.query("status", result_type=RunStatus)
        if last.phase == "waiting_approval":
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"never waited for approval; last status: {last}")


async def _blocked_on_order(pool: AsyncConnectionPool, n: int, within: float = 60.0) -> None:
    """Wait until ``n`` refund transactions wait on the order row the test holds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with pool.connection() as conn:
            row = await (
                await conn.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                    "and query ilike '%total_micros from orders%for update%'"
                )
            ).fetchone()
        if row and row[0] >= n:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {n} refunds ever waited on the order")


async def test_concurrent_approved_parts_never_exceed_the_order_maximum(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    model: ObedientModel,
) -> None:
    """Four runs, each refunding $120 of one $1000 order, each approved by a human (over
    $100): every gate saw $0 refunded (the runs started together), so every gate allowed
    $120 under a per-order maximum of $250. The tool lets two through: $240 issued."""
    policy = tmp_path / "policy.yaml"
    text = SHIPPED.read_text()
    assert "        max: 500\n        approval_over: 100\n" in text
    policy.write_text(text.replace("        max: 500\n        approval_over: 100\n", "        max: 250\n", 1))
    order = await make_order(db_pool, total_usd=1000)
    async with running_worker(
        client, db_pool, temporal_services, task_queue, policy_file=policy, max_cached_workflows=10
    ):
        handles = [
            await start(client, task_queue, request(f"Refund {order} for $120", session=f"p{i}"))
            for i in range(4)
        ]
        # All four have made their plan and passed the gate before any refund exists.
        for h in handles:
            await _wait_waiting(h)
        await asyncio.gather(
            *(h.execute_update("approve", Approval(reason="split", by="carol")) for h in handles)
        )
        results = await asyncio.gather(*(h.result() for h in handles))
    assert await _issued(db_pool, order) == 240_000_000
    outcomes = sorted(r.outcome for r in results)
    assert outcomes.count("completed") == 2, [(r.outcome, r.reason) for r in results]
    refused = [r for r in results if r.outcome != "completed"]
    for r in refused:
        assert r.outcome == "partial", (r.outcome, r.reason)  # a clear step failure, not a wedge
        [err] = [x.error for x in r.steps if x.tool == "issue_refund"]
        assert "refund-order-total" in err and "above the limit $250" in err, err
        assert x_state(r) == [StepState.FAILED]
        async with db_pool.connection() as conn:
            trail = await audit.trail(conn, r.workflow_id)
        denies = [x for x in trail if x.decision == "deny" and x.data.get("enforced_by") == "tool"]
        assert [(x.kind, x.data["rule"], float(x.data["amount"])) for x in denies] == [
            ("permission", "refund-order-total", 360.0)
        ], trail
        async with db_pool.connection() as conn:
            effects = await (
                await conn.execute(
                    "select count(*) from tool_effects "
                    "where idempotency_key like %s and tool='issue_refund' and ok",
                    (r.workflow_id + "/%",),
                )
            ).fetchone()
        assert effects == (0,)  # a refusal is never an effect
    async with db_pool.connection() as conn:
        assert (await audit.verify(conn, "acme")).ok


async def test_concurrent_unapproved_parts_cannot_cross_the_approval_threshold(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    model: ObedientModel,
) -> None:
    """Three runs refund $90 each on one order (shipped policy: a human must approve once the
    order's refunds pass $100). Each gate alone sees $90: no approval asked. The refunds are
    made to meet at the effect (the test holds the order row until all three wait on it):
    exactly one is issued; the other two fail, non-retryable, with a deny row."""
    order = await make_order(db_pool, total_usd=1000)
    async with running_worker(client, db_pool, temporal_services, task_queue, max_cached_workflows=10):
        async with db_pool.connection() as holder:
            async with holder.transaction():
                await holder.execute("select 1 from orders where id=%s for update", (order,))
                handles = [
                    await start(client, task_queue, request(f"Refund {order} for $90", session=f"u{i}"))
                    for i in range(3)
                ]
                await _blocked_on_order(db_pool, 3)
        results = await asyncio.gather(*(h.result() for h in handles))
    assert await _issued(db_pool, order) == 90_000_000
    done = [r for r in results if r.outcome == "completed"]
    refused = [r for r in results if r.outcome != "completed"]
    assert len(done) == 1 and len(refused) == 2, [(r.outcome, r.reason) for r in results]
    for r in refused:
        [err] = [x.error for x in r.steps if x.tool == "issue_refund"]
        assert "refund-order-total" in err and "no human approved" in err, err
        assert x_state(r) == [StepState.FAILED]
        async with db_pool.connection() as conn:
            trail = await audit.trail(conn, r.workflow_id)
            attempts = await (
                await conn.execute(
                    "select count(*) from refunds where idempotency_key like %s", (r.workflow_id + "/%",)
                )
            ).fetchone()
        assert attempts == (0,)
        assert [x.data.get("rule") for x in trail if x.data.get("enforced_by") == "tool"] == [
            "refund-order-total"
        ]


async def test_an_approval_covers_the_total_the_human_saw_not_what_concurrent_runs_add(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    model: ObedientModel,
) -> None:
    """$80 already refunded; two runs ask $30 each. Each gate sees $110 in total (over the
    $100 threshold), so each asks a human, who approves "$110 in total on the order". The
    first refund makes it $110; the second would make it $140, which nobody approved."""
    order = await make_order(db_pool, total_usd=1000)
    async with db_pool.connection() as conn:
        await conn.execute(
            "insert into refunds (tenant, order_id, amount_micros, reason, idempotency_key) "
            "values ('acme', %s, 80000000, 'earlier', %s)",
            (order, f"earlier/{order}"),
        )
    async with running_worker(client, db_pool, temporal_services, task_queue, max_cached_workflows=10):
        handles = [
            await start(client, task_queue, request(f"Refund {order} for $30", session=f"a{i}"))
            for i in range(2)
        ]
        for h in handles:
            status = await _wait_waiting(h)
            assert "refund-order-total" in status.waiting_for and "110" in status.waiting_for, status
        await asyncio.gather(
            *(h.execute_update("approve", Approval(reason="ok", by="carol")) for h in handles)
        )
        results = await asyncio.gather(*(h.result() for h in handles))
    assert await _issued(db_pool, order) == 110_000_000
    assert sorted(r.outcome for r in results) == ["completed", "partial"], [
        (r.outcome, r.reason) for r in results
    ]
    [refused] = [r for r in results if r.outcome == "partial"]
    [err] = [x.error for x in refused.steps if x.tool == "issue_refund"]
    assert "a human approved refunds on order" in err and "$110 in total" in err and "$140.00" in err, err


def x_state(r: AgentResponse) -> list[StepState]:
    return [x.state for x in r.steps if x.tool == "issue_refund"]


def _call(
    tenant: str, order: str, usd: float, run: str, limits: tuple[EffectLimit, ...], by: str = ""
) -> ToolCall:
    step = f"s{uuid.uuid4().hex[:6]}"
    return ToolCall(
        tool="issue_refund",
        args={"order_id": order, "amount_usd": usd, "reason": "test"},
        idempotency_key=f"{run}/{step}",
        tenant=tenant,
        user="alice",
        workflow_id=run,
        step_id=step,
        reservation_key=f"{run}/{step}/reserve",
        gate=StepGate(
            rule="", reason="allowed", scopes=(tenant, f"{tenant}/{run}"), limits=limits, approved_by=by
        ),
    )


async def _race(pool: AsyncConnectionPool, calls: list[ToolCall]) -> list[Any]:
    acts = ToolActivities(pool)
    return await asyncio.gather(
        *(ActivityEnvironment().run(acts.run_tool, c) for c in calls), return_exceptions=True
    )


async def test_tenant_day_and_run_limits_hold_under_concurrent_calls(db_pool: AsyncConnectionPool) -> None:
    """Six concurrent $60 refunds on six orders of a fresh tenant, under a tenant-day maximum
    of $200: three are issued. Then, in one run, concurrent approved refunds under a per-run
    maximum of $100 issue one $60, and an unapproved call over a tenant-day approval
    threshold is refused even though its own amount is small."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    orders = [await make_order(db_pool, total_usd=100, tenant=tenant) for _ in range(8)]
    day = (EffectLimit(name="day-max", arg="amount_usd", per="tenant_day", max=200),)
    out = await _race(
        db_pool, [_call(tenant, o, 60, f"run-{i}-{tenant}", day) for i, o in enumerate(orders[:6])]
    )
    ok = [r for r in out if not isinstance(r, BaseException)]
    errors = [r for r in out if isinstance(r, BaseException)]
    assert len(ok) == 3, out
    assert all(isinstance(e, ApplicationError) and e.non_retryable and "day-max" in str(e) for e in errors), (
        errors
    )
    async with db_pool.connection() as conn:
        row = await (
            await conn.execute(
                "select sum(amount_micros) from refunds where tenant=%s and status='issued'", (tenant,)
            )
        ).fetchone()
    assert row == (180_000_000,)

    run = f"run-x-{tenant}"
    per_run = (EffectLimit(name="run-max", arg="amount_usd", per="run", max=100),)
    out = await _race(
        db_pool,
        [_call(tenant, orders[6], 30, run, per_run, by="carol"), _call(tenant, orders[7], 80, run, per_run)],
    )
    assert sum(not isinstance(r, BaseException) for r in out) == 1, out
    assert any(isinstance(r, ApplicationError) and "run-max" in str(r) for r in out), out

    # The day's sum is $180 + this run's part: any unapproved refund now crosses $150.
    over = (EffectLimit(name="day-approval", arg="amount_usd", per="tenant_day", approval_over=150),)
    [refused] = await _race(db_pool, [_call(tenant, orders[7], 1, f"run-y-{tenant}", over)])
    assert isinstance(refused, ApplicationError) and "no human approved" in str(refused), refused
    [approved] = await _race(db_pool, [_call(tenant, orders[7], 1, f"run-z-{tenant}", over, by="carol")])
    assert not isinstance(approved, BaseException) and approved.ok, approved
