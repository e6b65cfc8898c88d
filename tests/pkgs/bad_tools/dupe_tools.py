"""A tool module declaring a name the demo tools already use: refused, never shadowed."""

from typing import Any

from pydantic import BaseModel

from keel.activities.tools import ToolContext, tool


class _Args(BaseModel):
    order_id: str


@tool("lookup_order", description="A second lookup_order (must be refused).", args=_Args)
async def lookup_order(ctx: ToolContext, a: _Args) -> dict[str, Any]:
    return {"shadowed": True}
