"""Shared test helpers: an in-process worker on a fresh task queue, and request builders."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from keel.agent_io import PlanInput
from keel.models import AgentRequest, AgentResponse
from keel.settings import Settings
from keel.worker import build_workers


@contextlib.asynccontextmanager
async def running_worker(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    *,
    max_cached_workflows: int = 0,
    extra_activities: Sequence[Any] = (),
    **overrides: Any,
) -> AsyncIterator[Settings]:
    """A worker on ``task_queue``; cache 0 by default so every task replays from history."""
    s = dataclasses.replace(settings, task_queue=task_queue, **overrides)
    workers = build_workers(
        client, pool, s, max_cached_workflows=max_cached_workflows, extra_activities=extra_activities
    )
    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        yield s


async def plan_inputs(client: Client, workflow_id: str) -> list[PlanInput]:
    """What the workflow gave each ``plan`` activity of a run (decoded from its history): the
    tool specs offered, with the metadata the prompt does not show."""
    out: list[PlanInput] = []
    async for e in client.get_workflow_handle(workflow_id).fetch_history_events():
        if not e.HasField("activity_task_scheduled_event_attributes"):
            continue
        a = e.activity_task_scheduled_event_attributes
        if a.activity_type.name == "plan":
            (inp,) = await client.data_converter.decode(a.input.payloads, [PlanInput])
            out.append(inp)
    return out


def request(message: str, **kw: Any) -> AgentRequest:
    base: dict[str, Any] = {
        "tenant": "acme",
        "user": "alice",
        "request_id": f"t-{uuid.uuid4().hex[:10]}",
        "max_budget_usd": 0.5,
    }
    base.update(kw)
    return AgentRequest(message=message, **base)


async def run_agent(client: Client, task_queue: str, req: AgentRequest) -> AgentResponse:
    from keel.workflows.agent import TENANT, USER

    return await client.execute_workflow(
        "AgentWorkflow",
        req,
        id=f"agent/{req.tenant}/{req.request_id}",
        task_queue=task_queue,
        result_type=AgentResponse,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(TENANT, req.tenant), SearchAttributePair(USER, req.user)]
        ),
    )


async def make_order(
    pool: AsyncConnectionPool,
    *,
    total_usd: float = 42.5,
    status: str = "shipped",
    tenant: str = "acme",
    email: str = "alice@example.com",
) -> str:
    """A fresh order of our own, so tests never share refund headroom."""
    import random

    order_id = f"ORD-{random.randint(10**9, 10**12 - 1)}"
    async with pool.connection() as conn:
        await conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s,%s,%s,%s,'SKU-KEEL-1',%s)",
            (order_id, tenant, email, status, round(total_usd * 1_000_000)),
        )
    return order_id
