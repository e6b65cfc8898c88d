"""Acme's shipment tools: an HTTP API called exactly once through its idempotency header.

The carrier is an external service: its writes are not in Keel's PostgreSQL, so the tool
activity's transaction cannot make them happen once. The carrier's own idempotency
mechanism does: every request carries ``Idempotency-Key: <ctx.idempotency_key>``
(``workflow_id/step_id``, the same on every retry, replay and worker), and the carrier
answers a repeated key with the response it gave the first time instead of shipping twice.
So a retry after a lost response, a worker killed mid-call or a timeout is harmless.

* ``create_shipment``  books a shipment (side effect; compensation ``cancel_shipment``;
  fallback ``queue_shipment`` when the carrier is down or its breaker is open).
* ``cancel_shipment``  the compensation: cancels the shipment a run booked (idempotent: a
  cancelled or unknown shipment counts as cancelled).
* ``queue_shipment``   the fallback: records the request for a relay to book later; its
  record is the activity's ``tool_effects`` row, written in the activity's transaction.

Configuration comes from the worker's environment, never from payloads:
``ACME_CARRIER_URL`` (default ``http://127.0.0.1:9``) and ``ACME_CARRIER_TOKEN``.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from keel.activities.tools import ToolContext, ToolError, tool

__all__ = ["CancelShipment", "CreateShipment", "carrier_request"]

TIMEOUT_S = 5.0
"""One HTTP attempt; Temporal retries (the tool's ``max_attempts``), never httpx."""


class CreateShipment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    order_id: str = Field(pattern=r"^ORD-\d{1,12}$", description="Order to ship, like ORD-123")
    address: str = Field(min_length=3, max_length=300, description="Delivery address")


class CancelShipment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    effect: dict[str, Any] = Field(description="The result of the create_shipment call to undo")


async def carrier_request(
    method: str, path: str, key: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    """One call to the carrier with the idempotency header; errors translated once, here.

    408/409/429/5xx and network failures are transient (``retryable=True``: Temporal tries
    again with the same key, which is safe). Other 4xx are permanent.
    """
    base = os.environ.get("ACME_CARRIER_URL", "http://127.0.0.1:9")
    headers = {"Idempotency-Key": key}
    token = os.environ.get("ACME_CARRIER_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as http:
            resp = await http.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as e:  # connection refused, reset, timeout: it may have run; retry
        raise ToolError(f"carrier unreachable: {type(e).__name__}", retryable=True) from e
    if resp.status_code in (408, 409, 429) or resp.status_code >= 500:
        raise ToolError(f"carrier answered {resp.status_code}", retryable=True)
    return resp


@tool(
    "create_shipment",
    description="Book a shipment of an order with the carrier.",
    args=CreateShipment,
    permissions=("shipments:write",),
    idempotent=False,  # exactly once comes from the carrier's idempotency key
    side_effects=True,
    compensation="cancel_shipment",
    fallback="queue_shipment",
    cost_usd=0.001,
    timeout_seconds=15,
    max_attempts=4,
    tags=("shipping",),
)
async def create_shipment(ctx: ToolContext, a: CreateShipment) -> dict[str, Any]:
    resp = await carrier_request(
        "POST", "/v1/shipments", ctx.idempotency_key, {"order_id": a.order_id, "address": a.address}
    )
    if resp.status_code >= 400:
        raise ToolError(f"carrier refused the shipment: {resp.status_code} {resp.text[:200]}")
    data = resp.json()
    return {"shipment_id": data["id"], "order_id": a.order_id, "status": data.get("status", "booked")}


@tool(
    "cancel_shipment",
    description="Cancel a shipment booked earlier in this run (compensation).",
    args=CancelShipment,
    permissions=("shipments:write",),
    side_effects=True,
    timeout_seconds=15,
    max_attempts=10,
    hidden=True,
)
async def cancel_shipment(ctx: ToolContext, a: CancelShipment) -> dict[str, Any]:
    shipment = a.effect.get("shipment_id")
    if not isinstance(shipment, str) or not shipment:
        if a.effect.get("queued"):  # the fallback booked nothing: nothing to cancel
            return {"status": "nothing to cancel"}
        raise ToolError("cancel_shipment needs the shipment_id of the shipment to undo")
    resp = await carrier_request("POST", f"/v1/shipments/{shipment}/cancel", ctx.idempotency_key)
    if resp.status_code not in (200, 404):  # 404: never booked or already purged
        raise ToolError(f"carrier refused the cancellation: {resp.status_code}")
    return {"shipment_id": shipment, "status": "cancelled"}


@tool(
    "queue_shipment",
    description="Queue a shipment for later booking when the carrier is unavailable (fallback).",
    args=CreateShipment,
    permissions=("shipments:write",),
    side_effects=True,
    timeout_seconds=10,
    tags=("shipping",),
)
async def queue_shipment(ctx: ToolContext, a: CreateShipment) -> dict[str, Any]:
    # The activity writes this result to tool_effects under the step's key in its own
    # transaction: that row is the queue entry, recorded exactly once.
    return {"queued": True, "order_id": a.order_id, "address": a.address, "key": ctx.idempotency_key}
