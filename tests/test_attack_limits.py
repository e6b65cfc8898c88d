"""Attacks on the cumulative refund limits enforced at the effect (issue 17,
``keel/activities/tools/demo.py`` ``_within_limits``): other ways past an order or
tenant-day maximum than concurrent runs.

Driven through the real tool activity (``run_tool`` in an ``ActivityEnvironment``) against
the real database as ``keel_app``, with the gate the workflow would send. Every case checks
the money in the ``refunds`` table, not the tool's answer.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities.tools.execute import ToolActivities
from keel.models import EffectLimit, StepGate, ToolCall
from tests.helpers import make_order

ORDER_MAX = (EffectLimit(name="order-max", arg="amount_usd", per="order", max=100),)
DAY_MAX = (EffectLimit(name="day-max", arg="amount_usd", per="tenant_day", max=100),)


def _call(
    tenant: str,
    order: str,
    usd: float,
    run: str,
    limits: tuple[EffectLimit, ...],
    *,
    step: str | None = None,
    tool: str = "issue_refund",
    args: dict[str, Any] | None = None,
) -> ToolCall:
    step = step or f"s{uuid.uuid4().hex[:6]}"
    return ToolCall(
        tool=tool,
        args=args if args is not None else {"order_id": order, "amount_usd": usd, "reason": "attack"},
        idempotency_key=f"{run}/{step}",
        tenant=tenant,
        user="mallory",
        workflow_id=run,
        step_id=step,
        reservation_key=f"{run}/{step}/reserve",
        gate=StepGate(rule="", reason="allowed", scopes=(tenant, f"{tenant}/{run}"), limits=limits),
    )


async def _run(pool: AsyncConnectionPool, *calls: ToolCall) -> list[Any]:
    acts = ToolActivities(pool)
    return await asyncio.gather(
        *(ActivityEnvironment().run(acts.run_tool, c) for c in calls), return_exceptions=True
    )


async def _issued(pool: AsyncConnectionPool, *, tenant: str, order: str | None = None) -> int:
    async with pool.connection() as conn:
        q = "select coalesce(sum(amount_micros),0), count(*) from refunds where tenant=%s and status='issued'"
        args: tuple[Any, ...] = (tenant,)
        if order is not None:
            q += " and order_id=%s"
            args = (tenant, order)
        row = await (await conn.execute(q, args)).fetchone()
    assert row is not None
    return int(row[0])


def _tenant() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def test_retries_of_one_step_refund_once(db_pool: AsyncConnectionPool) -> None:
    """Temporal retries a step with the same idempotency key (a worker died after the
    commit, a timeout raced the answer): five concurrent attempts of one $60 step, plus
    five later ones, issue exactly one $60 refund, and the limit sees $60, not $600."""
    tenant = _tenant()
    order = await make_order(db_pool, total_usd=1000, tenant=tenant)
    run = f"run-{tenant}"
    call = _call(tenant, order, 60, run, ORDER_MAX, step="s1")
    first = await _run(db_pool, *[call] * 5)
    again = await _run(db_pool, *[call] * 5)
    assert all(not isinstance(r, BaseException) and r.ok for r in first + again), first + again
    assert len({r.data["refund_id"] for r in first + again}) == 1
    assert await _issued(db_pool, tenant=tenant, order=order) == 60_000_000
    # The next step ($50) would take the order to $110: refused.
    [over] = await _run(db_pool, _call(tenant, order, 50, run, ORDER_MAX, step="s2"))
    assert isinstance(over, ApplicationError) and over.non_retryable and "order-max" in str(over), over
    assert await _issued(db_pool, tenant=tenant, order=order) == 60_000_000


async def test_void_then_refund_again_never_holds_more_than_the_maximum(db_pool: AsyncConnectionPool) -> None:
    """Compensate (void) a refund and refund again, over and over, racing: a voided refund
    is money returned, so it no longer counts, but at no moment do the issued refunds on
    the order exceed the maximum, and a void of a refund already voided frees nothing twice."""
    tenant = _tenant()
    order = await make_order(db_pool, total_usd=1000, tenant=tenant)
    run = f"run-{tenant}"
    [first] = await _run(db_pool, _call(tenant, order, 100, run, ORDER_MAX, step="s1"))
    assert not isinstance(first, BaseException) and first.ok, first
    for i in range(3):
        void = _call(
            tenant,
            order,
            0,
            run,
            (),
            step=f"s1/compensate{i}",
            tool="void_refund",
            args={"effect": first.data},
        )
        # The same void twice and two new $100 refunds, all at once.
        out = await _run(
            db_pool,
            void,
            void,
            _call(tenant, order, 100, run, ORDER_MAX, step=f"a{i}"),
            _call(tenant, order, 100, run, ORDER_MAX, step=f"b{i}"),
        )
        assert await _issued(db_pool, tenant=tenant, order=order) <= 100_000_000, out
    async with db_pool.connection() as conn:
        row = await (
            await conn.execute("select count(*) from refunds where tenant=%s and status='issued'", (tenant,))
        ).fetchone()
    assert row is not None and row[0] <= 1


@pytest.mark.parametrize("usd", [1e-9, 4e-7])
async def test_an_amount_that_rounds_to_nothing_is_a_clear_permanent_refusal(
    db_pool: AsyncConnectionPool, usd: float
) -> None:
    """``amount_usd`` must be > 0, but $0.0000001 rounds to 0 micros: the refunds table
    refuses a zero amount with a CheckViolation, which the tool activity took for an
    infrastructure failure (retryable, and counted against the tool's circuit breaker, so a
    planner could open the breaker, which is per tool, for every tenant's refunds). It must be one clear,
    non-retryable error that names the amount, with no refund row and no breaker failure."""
    tenant = _tenant()
    order = await make_order(db_pool, total_usd=1000, tenant=tenant)
    [out] = await _run(db_pool, _call(tenant, order, usd, f"run-{tenant}", ORDER_MAX))
    assert isinstance(out, ApplicationError) and out.non_retryable, repr(out)
    assert "amount" in str(out) and "CheckViolation" not in str(out), str(out)
    assert await _issued(db_pool, tenant=tenant) == 0
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute("select count(*) from refunds where tenant=%s", (tenant,))
        ).fetchone()
        failures = await (
            await conn.execute(
                # The breaker is per tool, not per tenant: one tenant's planner could open
                # it for every tenant.
                "select coalesce(sum(consecutive_failures), 0) from circuit_breakers "
                "where scope = 'tool:issue_refund'"
            )
        ).fetchone()
    assert rows == (0,)
    assert failures == (0,)


async def test_lookalike_order_ids_are_not_a_second_order(db_pool: AsyncConnectionPool) -> None:
    """Spellings of one order the tool might take for the same order while the limit's lock
    and sum key on the string: lower case, padding and a trailing newline are refused by the
    argument schema; Unicode digits (Arabic-Indic, full-width) pass ``\\d`` but name no order
    (the lookup is exact), so none of them reaches a second refund on the order."""
    tenant = _tenant()
    order = await make_order(db_pool, total_usd=1000, tenant=tenant)
    digits = order.removeprefix("ORD-")
    run = f"run-{tenant}"
    [ok] = await _run(db_pool, _call(tenant, order, 100, run, ORDER_MAX))
    assert not isinstance(ok, BaseException) and ok.ok, ok
    arabic = "".join(chr(0x660 + int(c)) for c in digits)
    wide = "".join(chr(0xFF10 + int(c)) for c in digits)
    spellings = [
        order.lower(),
        f" {order}",
        f"{order}\n",
        f"ORD-0{digits}",
        f"ORD-{arabic}",
        f"ORD-{wide}",
        order.replace("O", "\u041e", 1),
    ]
    out = await _run(db_pool, *(_call(tenant, s, 50, run, ORDER_MAX) for s in spellings))
    for spelling, r in zip(spellings, out, strict=True):
        assert isinstance(r, ApplicationError) and r.non_retryable, (spelling, r)
    assert await _issued(db_pool, tenant=tenant) == 100_000_000


async def test_another_tenants_refunds_neither_block_nor_free_this_tenants_day(
    db_pool: AsyncConnectionPool,
) -> None:
    """Two tenants at once under the same tenant-day maximum of $100: each gets exactly its
    own $100 (four $50 refunds each, racing), never the other's headroom."""
    a, b = _tenant(), _tenant()
    orders = {t: [await make_order(db_pool, total_usd=100, tenant=t) for _ in range(4)] for t in (a, b)}
    calls = [_call(t, o, 50, f"run-{t}-{i}", DAY_MAX) for t in (a, b) for i, o in enumerate(orders[t])]
    out = await _run(db_pool, *calls)
    assert sum(not isinstance(r, BaseException) for r in out) == 4, out
    assert await _issued(db_pool, tenant=a) == 100_000_000
    assert await _issued(db_pool, tenant=b) == 100_000_000


async def test_a_refund_of_another_tenants_order_is_refused(db_pool: AsyncConnectionPool) -> None:
    """Order ids are global; a tenant naming another tenant's order must not refund it (and
    so must not spend that tenant's order headroom)."""
    a, b = _tenant(), _tenant()
    order = await make_order(db_pool, total_usd=1000, tenant=b)
    [out] = await _run(db_pool, _call(a, order, 10, f"run-{a}", ORDER_MAX))
    assert isinstance(out, ApplicationError) and "not found" in str(out), out
    assert await _issued(db_pool, tenant=a) == 0 and await _issued(db_pool, tenant=b) == 0
