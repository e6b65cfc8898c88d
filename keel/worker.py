"""Build and run a Keel worker: workflows, activities, the ledger sweeper, tool queues.

Any number of workers may run against the same Temporal and PostgreSQL; they share nothing
in memory. Each also runs a ledger sweeper (expired reservations return their money even
when no new reservation arrives) — sweeping is idempotent, so N sweepers are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from keel.settings import Settings

__all__ = ["build_workers", "run_worker", "STICKY_TIMEOUT"]

STICKY_TIMEOUT = timedelta(seconds=2)
"""How long a workflow task waits for the worker that cached its run before any worker may
take it. The SDK default (10 s) dominates recovery after a SIGKILL; cache hits on a live
worker are immediate, so a short value costs nothing."""


def _activities(pool: Any, settings: Settings) -> list[Any]:
    from activities.agent import AgentActivities
    from activities.budget import BudgetActivities
    from activities.control import ControlActivities
    from activities.llm import call_model
    from activities.tools import ToolActivities

    agent, budget = AgentActivities(pool, settings), BudgetActivities(pool)
    control, tools = ControlActivities(pool), ToolActivities(pool)
    return [agent.prepare_run, agent.plan, agent.evaluate, agent.finish_run,
            control.authorize_step, control.settle_step, tools.run_tool, call_model,
            budget.open_run, budget.reserve, budget.commit,
            budget.release, budget.extend]


def build_workers(client: Client, pool: Any, settings: Settings, *,
                  task_queue: str | None = None, max_cached_workflows: int = 1000,
                  extra_activities: Sequence[Any] = ()) -> list[Worker]:
    """The main worker plus one per rate-limited tool (Temporal enforces the queue's rate)."""
    from activities.tools import ToolActivities, catalog
    from workflows.agent import AgentWorkflow

    queue = task_queue or settings.task_queue
    workers = [Worker(
        client, task_queue=queue, workflows=[AgentWorkflow],
        activities=[*_activities(pool, settings), *extra_activities],
        max_cached_workflows=max_cached_workflows,
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        graceful_shutdown_timeout=timedelta(seconds=5),
    )]
    for tool in catalog(include_hidden=True):
        if tool.rate_limit_per_second:
            workers.append(Worker(
                client, task_queue=f"{queue}-tool-{tool.name}",
                activities=[ToolActivities(pool).run_tool],
                max_task_queue_activities_per_second=tool.rate_limit_per_second))
    return workers


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or forever): connect, migrate, serve, sweep."""
    from activities.ledger import run_sweeper
    from keel.client import connect
    from keel.db import apply_migrations, open_pool

    await asyncio.to_thread(apply_migrations, settings.database_url)
    pool = await open_pool(settings.database_url, max_size=20)
    client = await connect(settings)
    stop = stop or asyncio.Event()
    workers = build_workers(client, pool, settings)
    sweeper = asyncio.create_task(run_sweeper(pool, interval_seconds=5.0, stop=stop))
    try:
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            await stop.wait()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sweeper
        await pool.close()
