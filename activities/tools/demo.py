"""The demo business tools: real effects on PostgreSQL rows, exactly once per idempotency key.

Each write happens in the transaction the tool activity opened, together with the
``tool_effects`` row for its key and the ledger commit, so a retry after a crash either
finds all three or none of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from keel.activities.tools import effects
from keel.activities.tools.registry import LimitExceeded, ToolContext, ToolError, tool
from keel.models import EffectLimit

__all__ = ["LookupOrder", "CheckInventory", "IssueRefund", "VoidRefund", "SendEmail", "Noop"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LookupOrder(_Args):
    order_id: str = Field(pattern=r"^ORD-\d{1,12}$", description="Order id like ORD-123")


class CheckInventory(_Args):
    sku: str = Field(pattern=r"^SKU-[A-Z0-9-]{1,32}$", description="Stock keeping unit like SKU-KEEL-1")


class IssueRefund(_Args):
    order_id: str = Field(pattern=r"^ORD-\d{1,12}$")
    amount_usd: float = Field(gt=0, le=100_000, description="Amount to refund in USD")
    reason: str = Field(default="", max_length=500)


class VoidRefund(_Args):
    effect: dict[str, Any] = Field(description="The result of the issue_refund call to undo")


class SendEmail(_Args):
    to: EmailStr
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1, max_length=5000)


class Noop(_Args):
    note: str = ""


def _usd(micros: int) -> float:
    return round(micros / 1_000_000, 2)


@tool(
    "lookup_order",
    description="Look up an order: status, customer e-mail, item and total.",
    args=LookupOrder,
    permissions=("orders:read",),
    cost_usd=0.0001,
    timeout_seconds=10,
    tags=("orders",),
    facts={"customer_email": "order_customer", "order_id": "order_ids"},
    local=True,
)
async def lookup_order(ctx: ToolContext, a: LookupOrder) -> dict[str, Any]:
    row = await (
        await ctx.conn.execute(
            "select id, status, customer_email, item_sku, total_micros from orders where id=%s and tenant=%s",
            (a.order_id, ctx.tenant),
        )
    ).fetchone()
    if row is None:
        raise ToolError(f"order {a.order_id} not found for tenant {ctx.tenant}")
    refunded = await (
        await ctx.conn.execute(
            "select coalesce(sum(amount_micros),0) from refunds where order_id=%s and status='issued'",
            (a.order_id,),
        )
    ).fetchone()
    shipped = row[1] in ("shipped", "delivered")
    left = row[4] - (refunded[0] if refunded else 0)
    return {
        "order_id": row[0],
        "status": row[1],
        "shipped": shipped,
        "customer_email": row[2],
        "item_sku": row[3],
        "total_usd": _usd(row[4]),
        "refunded_usd": _usd(row[4] - left),
        "refundable_usd": _usd(left),
        "refundable": shipped and left > 0,
    }


@tool(
    "check_inventory",
    description="Check how many units of a SKU are in stock.",
    args=CheckInventory,
    permissions=("inventory:read",),
    cost_usd=0.0001,
    timeout_seconds=10,
    optional=True,
    tags=("inventory",),
    local=True,
)
async def check_inventory(ctx: ToolContext, a: CheckInventory) -> dict[str, Any]:
    row = await (
        await ctx.conn.execute(
            "select name, quantity from inventory where tenant=%s and sku=%s", (ctx.tenant, a.sku)
        )
    ).fetchone()
    if row is None:
        raise ToolError(f"unknown SKU {a.sku}")
    return {"sku": a.sku, "name": row[0], "quantity": row[1], "in_stock": row[1] > 0}


@tool(
    "issue_refund",
    description="Refund part or all of an order to the customer's card.",
    args=IssueRefund,
    permissions=("refunds:write",),
    idempotent=False,
    side_effects=True,
    compensation="void_refund",
    cost_usd=0.002,
    risk="high",
    timeout_seconds=20,
    max_attempts=5,
    tags=("orders", "refunds"),
    facts={"order_id": "order_ids"},
    local=True,
)
async def issue_refund(ctx: ToolContext, a: IssueRefund) -> dict[str, Any]:
    order = await (
        await ctx.conn.execute(
            "select total_micros from orders where id=%s and tenant=%s for update", (a.order_id, ctx.tenant)
        )
    ).fetchone()
    if order is None:
        raise ToolError(f"order {a.order_id} not found for tenant {ctx.tenant}")
    amount = round(a.amount_usd * 1_000_000)
    if amount <= 0:
        # amount_usd > 0 passes the schema, yet $0.0000004 is 0 micros: refused here, not by the
        # table's check (an infrastructure error: retried, and a failure for the breaker).
        raise ToolError(f"refund amount ${a.amount_usd:g} is less than one micro-dollar")
    done = await (
        await ctx.conn.execute(
            "select coalesce(sum(amount_micros),0) from refunds where order_id=%s and status='issued'",
            (a.order_id,),
        )
    ).fetchone()
    already = done[0] if done else 0
    if already + amount > order[0]:
        raise ToolError(
            f"refund of ${a.amount_usd:.2f} exceeds what is left on {a.order_id} "
            f"(${_usd(order[0] - already):.2f})"
        )
    await _within_limits(ctx, a, amount)
    row = await (
        await ctx.conn.execute(
            "insert into refunds (tenant, order_id, amount_micros, reason, idempotency_key) "
            "values (%s,%s,%s,%s,%s) returning id",
            (ctx.tenant, a.order_id, amount, a.reason, ctx.idempotency_key),
        )
    ).fetchone()
    assert row is not None
    return {"refund_id": row[0], "order_id": a.order_id, "amount_usd": _usd(amount), "status": "issued"}


_SUMS = {
    "order": "select coalesce(sum(amount_micros),0) from refunds "
    "where tenant=%s and order_id=%s and status='issued'",
    "run": "select coalesce(sum(amount_micros),0) from refunds "
    "where tenant=%s and left(idempotency_key, length(%s) + 1) = %s || '/' and status='issued'",
    "tenant_day": "select coalesce(sum(amount_micros),0) from refunds where tenant=%s and status='issued' "
    "and created_at >= date_trunc('day', now() at time zone 'UTC') at time zone 'UTC'",
}
"""What each scope of a cumulative limit already holds: issued refunds (a voided refund is a
compensated effect and no longer counts). The ``refunds`` row is written in the same
transaction as the step's ``tool_effects`` record, so it is exactly the recorded effects."""


async def _within_limits(ctx: ToolContext, a: IssueRefund, amount: int) -> None:
    """The policy's cumulative limits, enforced where the money moves.

    The gate judged the step against sums read at run start, so two runs refunding one order
    at once each pass alone. Here, inside the effect's transaction, every scope the limits
    name is locked (sorted, so concurrent refunds never deadlock), the issued refunds are
    summed, and a refund that would take a sum above ``max`` is refused, as is one crossing
    ``approval_over`` in a step no human (or approve-on-timeout rule) approved, or one that
    takes the sum above the total a human approved on that limit.
    """
    gate = ctx.gate
    if gate is None or not gate.limits:
        return
    run = ctx.idempotency_key.rsplit("/", 1)[0]
    for key in sorted({_scope_key(lim, ctx.tenant, a.order_id, run) for lim in gate.limits}):
        await effects.lock(ctx.conn, key)
    for lim in gate.limits:
        args: tuple[object, ...] = {
            "order": (ctx.tenant, a.order_id),
            "run": (ctx.tenant, run, run),
            "tenant_day": (ctx.tenant,),
        }[lim.per]
        row = await (await ctx.conn.execute(_SUMS[lim.per], args)).fetchone()
        total = (row[0] if row else 0) + amount
        where = {"order": f"order {a.order_id}", "run": "this run", "tenant_day": "the tenant today"}[lim.per]
        if lim.max is not None and total > round(lim.max * 1_000_000):
            raise LimitExceeded(
                f"{lim.name}: refunds on {where} would reach ${_usd(total):.2f}, above the limit "
                f"${lim.max:g} (checked at the effect, with concurrent runs' refunds)",
                rule=lim.name,
                amount=_usd(total),
            )
        seen = gate.approved_total if gate.approved_by and gate.approved_rule == lim.name else None
        if seen is not None and total > round(seen * 1_000_000):
            raise LimitExceeded(
                f"{lim.name}: a human approved refunds on {where} of ${seen:g} in total; with "
                f"concurrent runs' refunds they would reach ${_usd(total):.2f}",
                rule=lim.name,
                amount=_usd(total),
            )
        if (
            lim.approval_over is not None
            and total > round(lim.approval_over * 1_000_000)
            and not gate.approved_by
        ):
            raise LimitExceeded(
                f"{lim.name}: refunds on {where} would reach ${_usd(total):.2f}, over "
                f"${lim.approval_over:g}, and no human approved this step (checked at the effect, "
                "with concurrent runs' refunds)",
                rule=lim.name,
                amount=_usd(total),
            )


def _scope_key(lim: EffectLimit, tenant: str, order_id: str, run: str) -> str:
    """The advisory-lock key of a limit's scope (shared by every worker)."""
    return {
        "order": f"limit/{tenant}/order/{order_id}",
        "run": f"limit/{tenant}/run/{run}",
        "tenant_day": f"limit/{tenant}/day",
    }[lim.per]


@tool(
    "void_refund",
    description="Void a refund issued earlier in this run (compensation).",
    args=VoidRefund,
    permissions=("refunds:write",),
    side_effects=True,
    cost_usd=0.0005,
    timeout_seconds=20,
    max_attempts=10,
    hidden=True,
)
async def void_refund(ctx: ToolContext, a: VoidRefund) -> dict[str, Any]:
    refund_id = a.effect.get("refund_id")
    if not isinstance(refund_id, int):
        raise ToolError("void_refund needs the refund_id of the refund to undo")
    # Idempotent by construction: voiding a voided refund changes nothing.
    await ctx.conn.execute(
        "update refunds set status='voided', voided_at=now() where id=%s and tenant=%s and status='issued'",
        (refund_id, ctx.tenant),
    )
    return {"refund_id": refund_id, "status": "voided"}


@tool(
    "send_email",
    description="Send an e-mail to a customer (queued in the outbox).",
    args=SendEmail,
    permissions=("email:send",),
    idempotent=False,
    side_effects=True,
    cost_usd=0.001,
    risk="medium",
    timeout_seconds=20,
    tags=("email",),
    local=True,
)
async def send_email(ctx: ToolContext, a: SendEmail) -> dict[str, Any]:
    row = await (
        await ctx.conn.execute(
            "insert into email_outbox (tenant, to_addr, subject, body, idempotency_key) "
            "values (%s,%s,%s,%s,%s) returning id",
            (ctx.tenant, str(a.to), a.subject, a.body, ctx.idempotency_key),
        )
    ).fetchone()
    assert row is not None
    return {"message_id": row[0], "to": str(a.to), "queued": True}


@tool(
    "noop",
    description="Do nothing (benchmarks and tests).",
    args=Noop,
    permissions=("debug:noop",),
    cost_usd=0.0,
    timeout_seconds=5,
    hidden=True,
    local=True,
)
async def noop(ctx: ToolContext, a: Noop) -> dict[str, Any]:
    return {"ok": True, "note": a.note}
