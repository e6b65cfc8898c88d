"""Shared test helpers: an in-process worker on a fresh task queue, and request builders."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from keel.activities.agent import AgentActivities
from keel.activities.begin import begin_activity, local_begin_activity
from keel.agent_io import BeginInput, BeginOutput, PlanInput, PrepareInput, RunContext, first_plan_input
from keel.models import AgentRequest, AgentResponse
from keel.settings import Settings
from keel.tiers import clamp_tier
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
        client,
        pool,
        s,
        max_cached_workflows=max_cached_workflows,
        extra_activities=_with_begin(pool, s, extra_activities),
    )
    async with contextlib.AsyncExitStack() as stack:
        for w in workers:
            await stack.enter_async_context(w)
        yield s


@activity.defn(name="begin_local")
async def _remote_begin(inp: BeginInput) -> BeginOutput:
    """``begin_local`` that always sends the run to ``begin_run``."""
    return BeginOutput(context=RunContext(authorized=False), remote=True)


def _with_begin(pool: AsyncConnectionPool, settings: Settings, extra: Sequence[Any]) -> list[Any]:
    """A test that replaces ``plan`` or ``prepare_run`` gets a ``begin_run`` made of its
    replacement, as the worker makes it of the real ones: the run's first plan is then the
    test's too."""
    named = {activity._Definition.must_from_callable(fn).name: fn for fn in extra}
    if "begin_run" in named and "begin_local" not in named:
        # The test's own begin_run must serve every run: the worker's in-process beginning
        # (made of the real planner) would bypass it.
        return [*extra, _remote_begin]
    if "begin_run" in named or not {"plan", "prepare_run"} & set(named):
        return list(extra)
    real = AgentActivities(pool, settings)
    prepare, plan = named.get("prepare_run", real.prepare_run), named.get("plan", real.plan)
    return [
        *extra,
        begin_activity(prepare, plan),
        local_begin_activity(prepare, plan, real.plans_in_process),
    ]


async def plan_inputs(client: Client, workflow_id: str) -> list[PlanInput]:
    """What each plan of a run was given (decoded from its history): the tool specs offered,
    with the metadata the prompt does not show. A run that began with ``begin_run`` or
    ``begin_local`` made its first plan from that activity's snapshot (``first_plan_input``)."""
    out: list[PlanInput] = []
    begun: dict[int, BeginInput] = {}
    req: AgentRequest | None = None
    async for e in client.get_workflow_handle(workflow_id).fetch_history_events():
        if e.HasField("workflow_execution_started_event_attributes"):
            (req,) = await client.data_converter.decode(
                e.workflow_execution_started_event_attributes.input.payloads, [AgentRequest]
            )
            continue
        if e.HasField("marker_recorded_event_attributes") and req is not None:
            # ``begin_local``: a local activity records its result, not its input; the input
            # is what the workflow built from its request (``AgentWorkflow._begin``).
            m = e.marker_recorded_event_attributes
            meta = m.details["data"].payloads[0].data if m.marker_name == "core_local_activity" else b""
            if b'"begin_local"' in meta:
                (done,) = await client.data_converter.decode(m.details["result"].payloads, [BeginOutput])
                if not done.remote and done.plan is not None:
                    first = BeginInput(
                        prepare=PrepareInput(request=req, workflow_id=workflow_id),
                        tier=clamp_tier(req.model_policy.min_tier, req.model_policy.max_tier),
                        started_at=e.event_time.ToDatetime(tzinfo=UTC),
                    )
                    out.insert(0, first_plan_input(first, done.context))
            continue
        if e.HasField("activity_task_completed_event_attributes"):
            c = e.activity_task_completed_event_attributes
            if c.scheduled_event_id in begun:
                (done,) = await client.data_converter.decode(c.result.payloads, [BeginOutput])
                out.insert(0, first_plan_input(begun[c.scheduled_event_id], done.context))
            continue
        if not e.HasField("activity_task_scheduled_event_attributes"):
            continue
        a = e.activity_task_scheduled_event_attributes
        if a.activity_type.name == "plan":
            (inp,) = await client.data_converter.decode(a.input.payloads, [PlanInput])
            out.append(inp)
        elif a.activity_type.name == "begin_run":
            (first,) = await client.data_converter.decode(a.input.payloads, [BeginInput])
            begun[e.event_id] = first
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
