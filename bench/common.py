"""What every benchmark shares: its own services, a Keel worker with a scripted planner,
history accounting, CPU accounting and percentiles.

Benchmarks never touch a developer's services: ``own_services`` starts a dev server and a
PostgreSQL in a temporary state folder on free ports and stops both when done. The step and
history benchmarks run the REAL ``AgentWorkflow`` and the real activities, with two bench
substitutions registered under the real names:

* ``plan`` returns a scripted plan of ``noop`` steps when the message says
  ``noop-bench N=<n>`` (so the model is not what we measure), and defers to the real planner
  for any other message;
* ``prepare_run`` runs the real activity, then adds the hidden ``noop`` tool to the run's
  visible tools. The workflow's gate still checks ``debug:noop`` against the policy and
  audits the decision, exactly as for any other tool. ``noop`` is a quick in-process tool
  (``local=True``: its steps are local activities); a message ending ``activity`` declares it
  ``local=False`` in the run's snapshot, so the same steps take the activity path.

A run begins with ``begin_local`` (a local activity; ``begin_run`` when a model could be
live, ``keel.activities.begin``), which the bench composes from these two exactly as the
worker composes it from the real ones: the real preparation (all its database work), then
the scripted plan. The bench's tiers are the offline model's, so its runs begin in process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client

from keel.agent_io import (
    PlanInput,
    PlanOutput,
    PrepareInput,
    RunContext,
    StepGateInput,
    StepGateResult,
)
from keel.models import ToolCall, ToolResult
from keel.settings import PROJECT_ROOT, Settings, load_settings, offline_env

__all__ = [
    "BENCH_POLICY",
    "DEMO_TASK",
    "ProcCpu",
    "demo_request",
    "fresh_order",
    "history_breakdown",
    "history_size",
    "keel_worker",
    "noop_request",
    "own_services",
    "run_keel",
    "spread",
]

BENCH_POLICY = PROJECT_ROOT / "bench" / "policy.yaml"
"""Grants ``debug:noop`` to tenant ``bench`` and lifts the tool-call cap for 200-step runs."""

_NOOP_RE = re.compile(r"^noop-bench N=(\d+)( activity)?")


# ---------------------------------------------------------------------------- statistics
def _pct(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def spread(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """p50/p90/p99/min/max/n of ``values`` (empty input gives n=0 only)."""
    if not values:
        return {"n": 0}
    s = sorted(values)
    out = {"p50": statistics.median(s), "p90": _pct(s, 0.9), "p99": _pct(s, 0.99), "min": s[0], "max": s[-1]}
    return {**{k: round(v, digits) for k, v in out.items()}, "n": len(s)}


# ---------------------------------------------------------------------------- services
@contextlib.contextmanager
def own_services(policy_file: Path = BENCH_POLICY) -> Iterator[Settings]:
    """A dev server and a PostgreSQL of our own (temp state dir, free ports), stopped after."""
    from keel.devservices import DevServices, free_port

    state = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    env = {
        **os.environ,
        "KEEL_STATE_DIR": str(state),
        "KEEL_PG_PORT": str(free_port()),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KEEL_UI_PORT": str(free_port()),
        "KEEL_CODEC_PORT": str(free_port()),
        "KEEL_TASK_QUEUE": "keel-bench",
        "KEEL_POLICY_FILE": str(policy_file),
    }
    settings = load_settings(env)
    services = DevServices(settings)
    try:
        services.up()
        yield settings
    finally:
        services.down()
        shutil.rmtree(state, ignore_errors=True)


def worker_env(settings: Settings, task_queue: str, policy_file: Path | None = None) -> dict[str, str]:
    """Environment for ``worker.py`` subprocesses pointed at ``settings`` (offline model)."""
    return offline_env(
        settings, KEEL_TASK_QUEUE=task_queue, KEEL_POLICY_FILE=str(policy_file or settings.policy_file)
    )


# ---------------------------------------------------------------------------- Keel worker
class _BenchAgentActivities:
    """``plan`` and ``prepare_run`` substitutes (see the module docstring)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    @activity.defn(name="prepare_run")
    async def prepare_run(self, inp: PrepareInput) -> RunContext:
        from keel.activities.tools.loader import catalog

        ctx: RunContext = await self._real.prepare_run(inp)
        m = _NOOP_RE.match(inp.request.message)
        if not ctx.authorized or m is None:
            return ctx
        noop = next(t for t in catalog(include_hidden=True) if t.name == "noop")
        if m.group(2):  # "... activity": the same tool on the activity path (local=False)
            noop = noop.model_copy(update={"local": False})
            everything = tuple(noop if t.name == "noop" else t for t in ctx.all_tools)
            return ctx.model_copy(update={"tools": (*ctx.tools, noop), "all_tools": everything})
        return ctx.model_copy(update={"tools": (*ctx.tools, noop)})

    def plans_in_process(self, req: Any) -> bool:
        return bool(self._real.plans_in_process(req))

    @activity.defn(name="plan")
    async def plan(self, inp: PlanInput) -> PlanOutput:
        from keel.models import Plan, PlanStep

        m = _NOOP_RE.match(inp.message)
        if m is None:
            out: PlanOutput = await self._real.plan(inp)
            return out
        if inp.iteration > 1:
            return PlanOutput(plan=Plan(answer="done"), model="scripted")
        steps = tuple(
            PlanStep(id=f"n{i}", tool="noop", args={"note": str(i)}) for i in range(1, int(m.group(1)) + 1)
        )
        return PlanOutput(plan=Plan(steps=steps, answer="done"), model="scripted")


class _Timed:
    """The real ``authorize_step`` and ``run_tool``, timed in-process (body only, in ms)."""

    def __init__(self, real: dict[str, Any], timings: dict[str, list[float]]) -> None:
        self._real, self._t = real, timings

    async def _time(self, name: str, inp: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await self._real[name](inp)
        finally:
            self._t.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    @activity.defn(name="authorize_step")
    async def authorize_step(self, inp: StepGateInput) -> StepGateResult:
        out: StepGateResult = await self._time("authorize_step", inp)
        return out

    @activity.defn(name="run_tool")
    async def run_tool(self, call: ToolCall) -> ToolResult:
        out: ToolResult = await self._time("run_tool", call)
        return out


@contextlib.asynccontextmanager
async def keel_worker(
    client: Client,
    pool: Any,
    settings: Settings,
    task_queue: str,
    *,
    max_cached_workflows: int = 1000,
    timings: dict[str, list[float]] | None = None,
) -> AsyncIterator[None]:
    """The real AgentWorkflow and activities on ``task_queue``, with the bench substitutes.

    With ``timings``, ``authorize_step`` and ``run_tool`` also record their own durations.
    """
    from keel.activities.agent import AgentActivities
    from keel.activities.begin import begin_activity, local_begin_activity
    from keel.worker import _activities, main_worker

    s = dataclasses.replace(settings, task_queue=task_queue)
    sub = _BenchAgentActivities(AgentActivities(pool, s))
    replaced: dict[str, Any] = {
        "prepare_run": sub.prepare_run,
        "plan": sub.plan,
        "begin_run": begin_activity(sub.prepare_run, sub.plan),
        "begin_local": local_begin_activity(sub.prepare_run, sub.plan, sub.plans_in_process),
    }
    if timings is not None:
        real = {_activity_name(a): a for a in _activities(pool, s)}
        timed = _Timed(real, timings)
        replaced.update({"authorize_step": timed.authorize_step, "run_tool": timed.run_tool})
    # keel.worker's own list, so an activity added there is benchmarked here too.
    acts = [a for a in _activities(pool, s) if _activity_name(a) not in replaced]
    worker = main_worker(
        client,
        pool,
        task_queue=task_queue,
        activities=[*acts, *replaced.values()],
        max_cached_workflows=max_cached_workflows,
    )
    async with worker:
        yield


def _activity_name(fn: Any) -> str:
    return activity._Definition.must_from_callable(fn).name


def noop_request(steps: int, *, tenant: str = "bench", user: str = "bench", activity: bool = False) -> Any:
    """A request whose scripted plan is ``steps`` distinct ``noop`` calls; ``activity``: with
    ``noop`` declared ``local=False`` in the run's snapshot, so its steps take the activity
    path (as MCP, sandboxed and rate-limited tools do) instead of the local activity."""
    from keel.models import AgentRequest

    return AgentRequest(
        tenant=tenant,
        user=user,
        message=f"noop-bench N={steps}" + (" activity" if activity else ""),
        request_id=f"b-{uuid.uuid4().hex[:12]}",
        max_budget_usd=5.0,
    )


DEMO_TASK = "Check if order {order} is shipped, refund it if so, and e-mail the customer"
"""The 3-tool task (lookup_order → issue_refund → send_email) used for throughput and the peer."""


async def fresh_order(
    pool: Any, *, tenant: str = "bench", total_usd: float = 12.5, email: str = "alice@example.com"
) -> str:
    """A new shipped order (refunds of it need no approval: far below the $100 rule)."""
    import random

    order_id = f"ORD-{random.randint(10**9, 10**12 - 1)}"
    async with pool.connection() as conn:
        await conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s,%s,%s,'shipped','SKU-KEEL-1',%s)",
            (order_id, tenant, email, round(total_usd * 1_000_000)),
        )
    return order_id


async def demo_request(pool: Any, *, tenant: str = "bench", user: str = "bench") -> Any:
    """The 3-tool demo task on a fresh order of ``tenant``."""
    from keel.models import AgentRequest

    order = await fresh_order(pool, tenant=tenant)
    return AgentRequest(
        tenant=tenant,
        user=user,
        request_id=f"b-{uuid.uuid4().hex[:12]}",
        message=DEMO_TASK.format(order=order),
        max_budget_usd=1.0,
    )


async def run_keel(client: Client, task_queue: str, req: Any) -> tuple[Any, float, str]:
    """Run one AgentWorkflow to its end; returns (response, wall seconds, workflow id)."""
    from temporalio.common import SearchAttributePair, TypedSearchAttributes

    from keel.models import AgentResponse
    from keel.workflows.agent import TENANT, USER

    wid = f"agent/{req.tenant}/{req.request_id}"
    t0 = time.perf_counter()
    resp = await client.execute_workflow(
        "AgentWorkflow",
        req,
        id=wid,
        task_queue=task_queue,
        result_type=AgentResponse,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(TENANT, req.tenant), SearchAttributePair(USER, req.user)]
        ),
    )
    return resp, time.perf_counter() - t0, wid


# ---------------------------------------------------------------------------- history
async def history_size(client: Client, workflow_id: str) -> tuple[int, int]:
    """(events, bytes) of a closed run as the server accounts them (what its limits use)."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    info = desc.raw_description.workflow_execution_info
    return int(info.history_length), int(info.history_size_bytes)


def _ms(a: Any, b: Any) -> float:
    return (b.ToNanoseconds() - a.ToNanoseconds()) / 1e6


async def history_breakdown(client: Client, workflow_id: str, activity_name: str) -> dict[str, list[float]]:
    """Per-step intervals (ms) from event timestamps, for each ``activity_name`` activity.

    ``interval``: schedule of step k to schedule of step k+1 (one whole step).
    ``queue``: activity scheduled → started (server dispatch to a poller).
    ``execute``: activity started → completed (the activity's own work, incl. its DB work).
    ``wft_wait``: activity completed → next workflow task started (server dispatch).
    ``wft``: workflow task started → completed (workflow code + local activities inside it).
    """
    from temporalio.api.enums.v1 import EventType as E

    hist = await client.get_workflow_handle(workflow_id).fetch_history()
    events = list(hist.events)
    by_id = {e.event_id: e for e in events}
    out: dict[str, list[float]] = {k: [] for k in ("interval", "queue", "execute", "wft_wait", "wft")}
    scheduled = [
        e
        for e in events
        if e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity_name
    ]
    ids = {e.event_id for e in scheduled}
    out["interval"] = [_ms(a.event_time, b.event_time) for a, b in itertools.pairwise(scheduled)]
    for i, e in enumerate(events):
        if e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            if e.activity_task_started_event_attributes.scheduled_event_id in ids:
                sched = by_id[e.activity_task_started_event_attributes.scheduled_event_id]
                out["queue"].append(_ms(sched.event_time, e.event_time))
        elif e.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = e.activity_task_completed_event_attributes
            if attrs.scheduled_event_id not in ids:
                continue
            out["execute"].append(_ms(by_id[attrs.started_event_id].event_time, e.event_time))
            nxt = next(
                (x for x in events[i + 1 :] if x.event_type == E.EVENT_TYPE_WORKFLOW_TASK_STARTED), None
            )
            done = next(
                (x for x in events[i + 1 :] if x.event_type == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED), None
            )
            if nxt is not None:
                out["wft_wait"].append(_ms(e.event_time, nxt.event_time))
            if nxt is not None and done is not None:
                out["wft"].append(_ms(nxt.event_time, done.event_time))
    return out


async def event_counts(client: Client, workflow_id: str) -> dict[str, int]:
    """How many events of each type a run wrote (``MARKER_RECORDED`` = local activities)."""
    from temporalio.api.enums.v1 import EventType

    hist = await client.get_workflow_handle(workflow_id).fetch_history()
    counts: dict[str, int] = {}
    for e in hist.events:
        name = EventType.Name(e.event_type).removeprefix("EVENT_TYPE_")
        counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------------------- CPU
class ProcCpu:
    """CPU seconds (user+system, incl. reaped children) of named process groups, as deltas."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        import psutil

        self._procs: dict[str, list[Any]] = {}
        for name, pids in groups.items():
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    procs.append(p)
                    with contextlib.suppress(psutil.Error):
                        procs.extend(p.children(recursive=True))
            self._procs[name] = procs
        self._start = self._sample()

    def _sample(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, procs in self._procs.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def delta(self) -> dict[str, float]:
        now = self._sample()
        return {k: round(now[k] - self._start[k], 3) for k in now}


def postgres_pids(settings: Settings) -> list[int]:
    """The postmaster of our PostgreSQL (its backends are its children)."""
    pidfile = settings.state_dir / "postgres" / "data" / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        return [int(pidfile.read_text().split()[0])]
    return []


def temporal_pids(settings: Settings) -> list[int]:
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        return [int((settings.state_dir / "temporal.pid").read_text().split()[0])]
    return []
