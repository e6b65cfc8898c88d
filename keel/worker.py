"""Build and run a Keel worker: workflows, activities, the ledger sweeper, tool queues.

Any number of workers may run against the same Temporal and PostgreSQL; they share nothing
in memory (circuit breakers and run slots live in PostgreSQL too). Each also runs a ledger
sweeper (expired reservations return their money even when no new reservation arrives) —
sweeping is idempotent, so N sweepers are harmless.

Telemetry comes from the standard ``OTEL_*`` variables (see ``keel.telemetry``): with an
exporter configured, the client gets Temporal's tracing interceptor, so every workflow and
activity of a run lands in one trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.activity import _Definition
from temporalio.client import Client
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    PollerBehaviorAutoscaling,
    Worker,
    WorkflowInterceptorClassInput,
)

from keel.activities.agent import AgentActivities
from keel.activities.agent_defs import agent_definitions
from keel.activities.begin import begin_activity, local_begin_activity
from keel.activities.breaker import BREAKER_POOL
from keel.activities.budget import BudgetActivities
from keel.activities.control import ControlActivities
from keel.activities.ledger import run_sweeper
from keel.activities.llm import check_model_config
from keel.activities.models import close_clients
from keel.activities.tools import ToolActivities, catalog
from keel.agents import McpServer
from keel.client import connect
from keel.codec import load_keyring
from keel.db import apply_migrations, open_ledger_pool, open_pool
from keel.runner import KeelWorkflowRunner
from keel.settings import Settings
from keel.telemetry import annotate, setup_telemetry, shutdown_telemetry, tenant_of, with_tracing
from keel.workflows.agent import AgentWorkflow
from keel.workflows.arity import OneRequest

__all__ = ["STICKY_TIMEOUT", "KeelActivityInterceptor", "build_workers", "main_worker", "run_worker"]

STICKY_TIMEOUT = timedelta(seconds=2)
"""How long a workflow task waits for the worker that cached its run before any worker may
take it. The SDK default (10 s) dominates recovery after a SIGKILL; cache hits on a live
worker are immediate, so a short value costs nothing."""


HEARTBEAT_THROTTLE = timedelta(seconds=1)
"""Send heartbeats at least this often. The SDK's default throttle is 0.8x the heartbeat
timeout, which leaves tools (4 s timeout) under a second of slack and delays cancellation."""


POLLERS = PollerBehaviorAutoscaling()
"""Workflow and activity pollers follow the server's feedback (1 to 100 open polls, 5 at
first) instead of the SDK's fixed 5: Temporal's recommended setting (the default of later
SDKs; it needs Temporal Server 1.28 or later). With 30 demo runs in flight on one worker,
5 open polls leave tasks waiting at the server, which queues them (a task no poller is
waiting for is stored, then read back); measured: runs/s +7 to +18 % over the default, with
slightly less server CPU per run."""

GRACEFUL_SHUTDOWN = timedelta(seconds=5)
"""How long a stopping worker lets running activities finish before it cancels them."""


def _activities(pool: Any, settings: Settings, ledger_pool: Any = None) -> list[Any]:
    agent = AgentActivities(pool, settings)
    budget = BudgetActivities(pool, lease_holds=settings.ledger_holds == "lease", ledger_pool=ledger_pool)
    keys = load_keyring(settings)
    control, tools = ControlActivities(pool, keys), ToolActivities(pool, keys, mcp_servers)
    return [
        agent.prepare_run,
        agent.plan,
        begin_activity(agent.prepare_run, agent.plan),
        local_begin_activity(agent.prepare_run, agent.plan, agent.plans_in_process),
        agent.evaluate,
        agent.finish_run,
        agent.settle_model_calls,
        control.authorize_step,
        control.settle_step,
        tools.run_tool,
        budget.reserve,
        budget.admit,
        budget.commit,
        budget.release,
    ]


def mcp_servers() -> dict[str, McpServer]:
    """The MCP servers this worker's agent definitions name, by name (the first definition
    naming one wins): what ``run_tool`` may call as ``<server>.<tool>``."""
    servers: dict[str, McpServer] = {}
    for agent, _ in agent_definitions().values():
        for server in agent.mcp:
            servers.setdefault(server.name, server)
    return servers


def _merge(base: Sequence[Any], extra: Sequence[Any]) -> list[Any]:
    """``extra`` activities replace same-named ones (tests replace an activity this way)."""

    def name(fn: Any) -> str:
        defn = _Definition.from_callable(fn)
        return defn.name if defn and defn.name else ""

    replaced = {name(fn) for fn in extra}
    return [fn for fn in base if name(fn) not in replaced] + list(extra)


class KeelActivityInterceptor(Interceptor):
    """Gives every activity this worker runs its breaker store and common span attributes,
    and guards the workflow's one argument (``keel.workflows.arity``).

    Model calls run inside ``plan``/``evaluate``/``finish_run`` as plain functions
    (``keel.activities.llm``), so the pool travels in a context variable scoped to the
    activity rather than in an argument.
    (Client interceptors, like tracing, wrap this one: the span already exists here.)
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityContext(next, self._pool)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[OneRequest]:
        """Refuse a start with more than one argument (see ``keel.workflows.arity``)."""
        return OneRequest


class _ActivityContext(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, pool: Any) -> None:
        super().__init__(next)
        self._pool = pool

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        annotate(workflow_id=info.workflow_id, tenant=tenant_of(info.workflow_id or ""), attempt=info.attempt)
        token = BREAKER_POOL.set(self._pool)
        try:
            return await super().execute_activity(input)
        finally:
            BREAKER_POOL.reset(token)


def main_worker(
    client: Client,
    pool: Any,
    *,
    task_queue: str,
    activities: Sequence[Any],
    max_cached_workflows: int = 1000,
    interceptors: Sequence[Interceptor] = (),
) -> Worker:
    """The worker that runs ``AgentWorkflow`` and ``activities``: the one definition of its
    options. ``build_workers`` serves with it and ``bench.common.keel_worker`` benchmarks
    with it (only the activities differ there), so the benchmarks measure what users run.

    The workflow runner is the SDK's sandbox answering the converter's context questions
    directly (``keel.runner``). Pollers autoscale (``POLLERS``); everything else not named here
    keeps the SDK's default, measured under 30 demo runs in flight: a 2-thread workflow task
    executor (the SDK's grows to 500) changed neither runs/s nor CPU per run, and the slot
    limits (100 workflow tasks, activities and local activities) are not reached with 30 or 60
    runs in flight.
    """
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[AgentWorkflow],
        workflow_runner=KeelWorkflowRunner(),
        activities=list(activities),
        max_cached_workflows=max_cached_workflows,
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        interceptors=[*interceptors, KeelActivityInterceptor(pool)],
        workflow_task_poller_behavior=POLLERS,
        activity_task_poller_behavior=POLLERS,
    )


def build_workers(
    client: Client,
    pool: Any,
    settings: Settings,
    *,
    task_queue: str | None = None,
    max_cached_workflows: int = 1000,
    extra_activities: Sequence[Any] = (),
    interceptors: Sequence[Interceptor] = (),
    ledger_pool: Any = None,
) -> list[Worker]:
    """The main worker plus one per rate-limited tool (Temporal enforces the queue's rate).

    Tracing comes from the client's interceptors (see ``keel.telemetry.with_tracing``);
    ``interceptors`` adds worker-only ones.
    """

    check_model_config(os.environ)  # an unpriced model fails here, once, in one line

    queue = task_queue or settings.task_queue
    chain = [*interceptors, KeelActivityInterceptor(pool)]
    workers = [
        main_worker(
            client,
            pool,
            task_queue=queue,
            activities=_merge(_activities(pool, settings, ledger_pool), extra_activities),
            max_cached_workflows=max_cached_workflows,
            interceptors=interceptors,
        )
    ]

    limited = [(f"tool-{t.name}", t.rate_limit_per_second) for t in catalog(include_hidden=True)]
    servers = {s.name: s for agent, _ in agent_definitions().values() for s in agent.mcp}
    limited += [(f"mcp-{s.name}", s.rate_limit_per_second) for s in servers.values()]
    for suffix, rate in limited:
        if rate:
            # Temporal enforces this rate on the queue as a whole, across every worker.
            workers.append(
                Worker(
                    client,
                    task_queue=f"{queue}-{suffix}",
                    activities=[ToolActivities(pool, load_keyring(settings), mcp_servers).run_tool],
                    max_task_queue_activities_per_second=rate,
                    max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                    interceptors=chain,
                )
            )
    return workers


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or forever): connect, migrate, serve, sweep."""

    catalog(include_hidden=True)  # a tool module or agent definition that cannot load
    agent_definitions()  # stops the worker before it connects to anything
    check_model_config(os.environ)  # so does a model without a price: one line, before any service
    # Migrations as the schema owner; the pool (everything that serves runs) as the app role.
    await asyncio.to_thread(apply_migrations, settings.owner_url)
    tracer_provider, meter_provider = setup_telemetry("keel-worker")
    pool = await open_pool(settings.database_url, max_size=20)
    ledger_pool = await open_ledger_pool(settings.database_url)
    client = await connect(settings)
    if tracer_provider is not None:
        client = with_tracing(client, tracer_provider)
    stop = stop or asyncio.Event()
    workers = build_workers(client, pool, settings, ledger_pool=ledger_pool)
    # Everything imported and built so far lives as long as the process: frozen, the
    # collector's full passes stop re-scanning it (measured under 30 demo runs in flight:
    # full passes ~108 -> ~65 ms, collector time per run 2.9 -> 2.4 ms).
    gc.collect()
    gc.freeze()
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
        await ledger_pool.close()
        await pool.close()
        await close_clients()  # the provider SDKs' HTTP pools, cached per key and base URL
        shutdown_telemetry(tracer_provider, meter_provider)
