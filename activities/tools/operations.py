"""The operations agent's tools: operations tickets (stock comes from ``check_inventory``).

Like the demo tools, the write happens in the tool activity's transaction together with its
``tool_effects`` row, so a retried ``open_ticket`` never opens a second ticket.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.activities.tools.registry import ToolContext, ToolError, tool

__all__ = ["CloseTicket", "OpenTicket"]


class OpenTicket(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=3, max_length=200, description="One line: what needs doing")
    body: str = Field(default="", max_length=4000)
    sku: str | None = Field(default=None, pattern=r"^SKU-[A-Z0-9-]{1,32}$", description="SKU concerned")
    priority: str = Field(default="normal", description="low, normal or high")


class CloseTicket(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    effect: dict[str, Any] = Field(description="The result of the open_ticket call to undo")


@tool(
    "open_ticket",
    description="Open an operations ticket for the warehouse team (restock, damage, ...).",
    args=OpenTicket,
    permissions=("tickets:write",),
    idempotent=False,
    side_effects=True,
    compensation="close_ticket",
    cost_usd=0.0002,
    timeout_seconds=10,
    tags=("tickets",),
)
async def open_ticket(ctx: ToolContext, a: OpenTicket) -> dict[str, Any]:
    row = await (
        await ctx.conn.execute(
            "insert into tickets (tenant, title, body, sku, priority, idempotency_key) "
            "values (%s,%s,%s,%s,%s,%s) returning id",
            (ctx.tenant, a.title, a.body, a.sku, a.priority, ctx.idempotency_key),
        )
    ).fetchone()
    assert row is not None
    return {"ticket_id": row[0], "title": a.title, "sku": a.sku, "priority": a.priority, "status": "open"}


@tool(
    "close_ticket",
    description="Close a ticket opened earlier in this run (compensation).",
    args=CloseTicket,
    permissions=("tickets:write",),
    side_effects=True,
    timeout_seconds=10,
    max_attempts=10,
    hidden=True,
)
async def close_ticket(ctx: ToolContext, a: CloseTicket) -> dict[str, Any]:
    ticket = a.effect.get("ticket_id")
    if not isinstance(ticket, int):
        raise ToolError("close_ticket needs the ticket_id of the ticket to undo")
    await ctx.conn.execute(  # idempotent: closing a closed ticket changes nothing
        "update tickets set status='withdrawn', closed_at=now() where id=%s and tenant=%s and status='open'",
        (ticket, ctx.tenant),
    )
    return {"ticket_id": ticket, "status": "withdrawn"}
