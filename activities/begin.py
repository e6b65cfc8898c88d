"""``begin_run``: a run's preparation and its first plan in one activity (issue 23).

A run used to begin with the ``prepare_run`` local activity inside its first workflow task,
then a ``plan`` activity carrying the whole snapshot back out as its input. ``begin_run``
does both in one attempt: the preparation (authorization and its audit row, the run slot,
input guardrails, memory, the snapshot), then — only if the run is authorized and its input
passed the guardrails — the first plan, built from the snapshot it just took. A refused or
blocked request makes no model call and holds nothing.

It is composed of the worker's own ``prepare_run`` and ``plan`` (``begin_activity``), so it
runs the same code they do, and a worker that substitutes either (a benchmark's scripted
model, a test's planner) begins its runs with the substitute too.

Retries: the activity retries as a model step does (``MODEL_RETRY``); every retry prepares
again, which is idempotent as the local activity's retries were: the authorization row and
the input guardrail row are keyed ``<workflow_id>/authorize`` and ``/guardrail-input`` (a
retry finds its own chain's row and is not taken for a reused request id), the slot is
keyed by the workflow id (re-acquiring renews it), the ledger's run scope opens once and
memory is only read. The plan's holds continue their ledger numbering across attempts
(``keel.activities.metered``).

Cancellation: the preparation is shielded. A cancel that arrives meanwhile is honoured once
its transaction has committed (the workflow waits for the activity to acknowledge, so the
run's ending, which releases the slot by workflow id, always comes after the slot was
taken); the plan is cancellable like any plan.

In process (``begin_local``, patch ``keel-23-begin-local``): when every model the run may
call is the built-in offline model (``AgentActivities.plans_in_process``), the same work runs
as a LOCAL activity inside the run's first workflow task: no activity round trip through the
server and no second workflow task before the first step (five history events fewer: six
for the activity and its workflow task, less the local activity's marker). The
offline plan has no network call to wait for, heartbeat through or cancel half-way, which is
what makes a local activity the right tool for it. Any other run gets ``remote=True`` back
from it at once, having done nothing, and begins with ``begin_run`` as before.

Failure: an error of the preparation carries ``{"stage": "prepare"}`` as its first detail,
so the run reports it as the preparation's failure; an error of the plan carries the plan's
spend report (``with_report``), which the workflow books before the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.heartbeat import heartbeating
from keel.activities.llm import HEARTBEAT_EVERY_S
from keel.activities.metered import detail_first
from keel.agent_io import (
    BeginInput,
    BeginOutput,
    PlanInput,
    PlanOutput,
    PrepareInput,
    RunContext,
    first_plan_input,
)
from keel.errors import PREPARE_STAGE
from keel.models import AgentRequest

__all__ = ["begin_activity", "local_begin_activity"]

Prepare = Callable[[PrepareInput], Awaitable[RunContext]]
Planner = Callable[[PlanInput], Awaitable[PlanOutput]]
InProcess = Callable[[AgentRequest], bool]


def begin_activity(prepare: Prepare, plan: Planner) -> Callable[[BeginInput], Awaitable[BeginOutput]]:
    """The ``begin_run`` activity made of ``prepare`` and ``plan`` (the worker's own)."""

    @activity.defn(name="begin_run")
    async def begin_run(inp: BeginInput) -> BeginOutput:
        ctx = await _prepared(prepare, inp.prepare)
        if not (ctx.authorized and ctx.input_ok):
            return BeginOutput(context=ctx)  # refused: no model call, nothing held
        out = await plan(first_plan_input(inp, ctx))
        return BeginOutput(context=ctx, plan=out)

    return begin_run


def local_begin_activity(
    prepare: Prepare, plan: Planner, in_process: InProcess
) -> Callable[[BeginInput], Awaitable[BeginOutput]]:
    """The ``begin_local`` local activity: ``begin_run``'s work when ``in_process`` says the
    run's models are all the built-in offline one; otherwise nothing (``remote=True``)."""
    begin_run = begin_activity(prepare, plan)

    @activity.defn(name="begin_local")
    async def begin_local(inp: BeginInput) -> BeginOutput:
        if not in_process(inp.prepare.request):
            return BeginOutput(context=RunContext(authorized=False), remote=True)
        return await begin_run(inp)

    return begin_local


async def _prepared(prepare: Prepare, inp: PrepareInput) -> RunContext:
    """Run ``prepare`` to its end even if the activity is cancelled meanwhile (then re-raise
    the cancellation), heartbeating while it waits (a run slot's lock may take a while)."""
    task = asyncio.ensure_future(_tagged(prepare, inp))
    async with heartbeating(HEARTBEAT_EVERY_S):
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await task  # let its transaction commit or roll back before reporting
            raise


async def _tagged(prepare: Prepare, inp: PrepareInput) -> RunContext:
    try:
        return await prepare(inp)
    except ApplicationError as e:
        raise detail_first(e, PREPARE_STAGE) from e
    except Exception as e:  # the database, a tool module: retryable, as before
        raise ApplicationError(_text(e), PREPARE_STAGE, type=type(e).__name__) from e


def _text(e: Any) -> str:
    return str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
