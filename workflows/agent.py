"""AgentWorkflow: one durable run of the agent loop per request.

Deterministic by construction: all I/O happens in activities referenced by name; time comes
from ``workflow.now()``; decisions come from the pure modules ``keel.decisions`` and
``keel.gate``. The run works from a snapshot (policy, tool catalogue, model tiers) taken
by its first activity, so a redeploy mid-run cannot change what it decides on replay.

Flow: prepare (authorize + guardrails + memory; since ``BEGIN_PATCH`` one ``begin_run``
activity that also makes the first plan) → loop { plan (``planning``); for each step
(``steps``): gate (audited) → approval? → tool (holds and commits its own cost) → rules } →
evaluate → cascade/replan/finish. On abort or cancellation the saga (``saga``) undoes
recorded effects newest first and every open hold (``holds``) is released. Stops are
requested and honoured at safe points (``stop``).
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import RawValue, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

# The run's helper modules hold no module state, so they are passed through the sandbox
# like the pure core: imported once per worker, not once per workflow run; and all of them
# through one module (``deps``: one pass-through check per run instead of fourteen).
with workflow.unsafe.imports_passed_through():
    import email_validator  # noqa: F401  (the gate's address parser imports its package lazily)

    # ``d`` is ``keel.decisions``: ``from keel import decisions`` would make the sandbox
    # import ``keel`` (re-imported for every run as the workflow module's parent) and load
    # the submodule past its pass-through check, re-executing it for every run.
    from keel.workflows.deps import (
        ACTIVITY_FAILURES,
        CONTROL_RETRY,
        FINISH_LOCAL_TIMEOUT,
        FINISH_RETRY,
        FLAGS,
        HOLDS_PATCH,
        INTERNAL_ERROR,
        INVALID_REQUEST,
        LOCAL_BEGIN_RETRY,
        MODEL_HEARTBEAT,
        MODEL_RETRY,
        MODEL_TIMEOUT,
        OUTCOME,
        PREPARE_STAGE,
        PREPARE_TIMEOUT,
        SPEND,
        TENANT,
        TIER_ORDER,
        USER,
        Abort,
        AgentRequest,
        AgentResponse,
        Approval,
        BeginInput,
        BeginOutput,
        FinishInput,
        FinishOutput,
        Holds,
        Planner,
        PlanOutput,
        PlanStep,
        PrepareInput,
        RunContext,
        RunState,
        RunStatus,
        Saga,
        StepRunner,
        StepState,
        Stopper,
        as_activity_error,
        cause,
        clamp_tier,
        d,
        next_tier,
        unaddressed,
    )
    from keel.workflows.deps import TOOL_HEARTBEAT as TOOL_HEARTBEAT

__all__ = ["AgentWorkflow", "TENANT", "USER", "OUTCOME", "SPEND"]

_NO_REQUEST = RawValue(Payload())
"""What ``run`` sees when a client started it without an argument: refused as invalid."""

FLAGS_PATCH = "keel-flags-search-attribute"


@workflow.defn(name="AgentWorkflow")
class AgentWorkflow:
    def __init__(self) -> None:
        self._state = RunState()
        self._stopper = Stopper()
        self._holds = Holds(self._state, self._stopper)
        self._saga = Saga(self._state, self._stopper, self._holds)
        self._planner = Planner(self._state, self._stopper, self._holds)
        self._steps = StepRunner(self._state, self._stopper, self._holds, self._saga)

    # ------------------------------------------------------------------ queries / updates
    @workflow.query(name="status")
    def status(self) -> RunStatus:
        st = self._state
        return RunStatus(
            workflow_id=st.wid,
            phase=st.phase,
            steps=st.records(),
            spend=st.spend(),
            waiting_for=st.waiting_for,
            iterations=st.iterations,
            model_label=st.model_label,
            outcome=st.outcome,
            details=st.details,
            waiting_since=st.waiting_since,
            waiting_step=st.waiting_step() if st.waiting_for else "",
        )

    @workflow.update(name="approve")
    async def approve(self, decision: Approval) -> str:
        self._state.approvals[decision.step_id or self._state.waiting_step()] = decision
        return "approved" if decision.approve else "rejected"

    @approve.validator
    def _validate_approve(self, decision: Approval) -> None:
        st = self._state
        step = decision.step_id or st.waiting_step()
        if not step or st.steps.get(step) is None or st.steps[step].state != StepState.WAITING_APPROVAL:
            raise ValueError(
                "no step of this run is waiting for approval"
                + (f" (asked for {decision.step_id})" if decision.step_id else "")
            )

    @workflow.update(name="cancel")
    async def cancel(self, reason: str) -> str:
        self._stopper.request(Abort("cancelled", reason or "cancelled by operator", "cancelled"))
        return "cancelling"

    @cancel.validator
    def _validate_cancel(self, reason: str) -> None:
        if self._state.outcome:
            raise ValueError(f"run already finished ({self._state.outcome})")

    # ------------------------------------------------------------------ main
    @workflow.run
    async def run(self, raw: RawValue = _NO_REQUEST) -> AgentResponse:
        """One exit: however the run ends — success, denial, budget, escape hatch, cancel,
        rejection, an activity out of retries, a ledger refusal, a bug in workflow code — it
        goes through ``_end``: compensations newest first, open holds released, the finish
        audit row, memory and the run slot. Only then does the workflow complete, or fail
        with one line for an internal error.

        The input arrives raw and is validated here: a client that bypasses the CLI with a
        request the model refuses fails the run at once instead of failing its task forever.
        A start without an argument gets ``_NO_REQUEST`` (the SDK would otherwise raise a
        TypeError at the call, a task failure), and a ``null`` payload, which the converter
        decodes to ``None`` without complaint, is refused here too.
        """
        st = self._state
        st.wid = workflow.info().workflow_id
        try:
            req = workflow.payload_converter().from_payload(raw.payload, AgentRequest)
            if not isinstance(req, AgentRequest):
                raise TypeError(f"expected a request object, got {type(req).__name__}")
        except Exception as e:
            raise ApplicationError(
                f"invalid request: {_one_line(e)}", type=INVALID_REQUEST, non_retryable=True
            ) from None
        lean = st.versions.lean()  # first: fixes the run's code version (keel.workflows.versions)
        st.phase = "authorizing"
        ctx = RunContext(authorized=False)
        first: PlanOutput | None = None
        outcome, reason, answer = "completed", "", ""
        internal: BaseException | None = None
        deadline: asyncio.Task[None] | None = None
        started = workflow.now()
        try:
            if st.versions.begin():
                ctx, first = await self._begin(req, started)
            else:
                ctx = await self._prepare(req, lean)
            st.model_label = ctx.model_label
            st.flags += list(ctx.notes)  # e.g. an MCP server that could not be listed
            if not ctx.authorized:
                outcome, reason = "denied", ctx.reason
            elif not ctx.input_ok:
                outcome, reason = "denied", ctx.input_reason
            else:
                # The deadline is a timer beside the loop, not asyncio.wait_for: Temporal turns
                # the cancellation of an awaited activity into an ActivityError the loop would
                # swallow. A run that began with ``begin_run`` learns its deadline with its
                # first plan: the time that took already counts.
                spent = (workflow.now() - started).total_seconds() if st.versions.begin() else 0.0
                deadline = asyncio.create_task(self._deadline(ctx.limits.deadline_seconds, spent))
                outcome, reason, answer = await self._loop(req, ctx, first)
        except Abort as a:
            outcome, reason = a.outcome, a.reason
            st.flags.append(a.flag or a.outcome)
        except asyncio.CancelledError:
            # Temporal cancellation outside any activity (e.g. a timer): undo, then report.
            outcome, reason = "cancelled", workflow.cancellation_reason() or "workflow cancelled"
            st.flags.append("cancelled")
        except (
            *ACTIVITY_FAILURES,
            LocalActivityFailed,
        ) as e:  # a control call out of retries, a ledger refusal
            outcome, reason = "failed", f"{_activity_name(e)} failed: {cause(e)}"
            st.flags.append("activity_failed")
        except Exception as e:  # a bug in workflow code: end cleanly, then fail the run
            internal = e
            outcome, reason = "failed", f"internal error: {_one_line(e)}"
            st.flags.append("internal_error")
        finally:
            if deadline is not None:
                deadline.cancel()
        resp = await self._end(req, ctx, outcome, reason, answer, internal)
        if (
            outcome == "cancelled"
            and workflow.cancellation_reason() is not None
            and st.versions.patched("keel-cancel-ends-canceled")
        ):
            # A Temporal cancel ends Canceled, as the Web UI and `list --status cancelled`
            # expect, once compensation, releases and the finish row are done. (The
            # `cancel` update alone cannot: only a cancel request lets a workflow end so.)
            raise asyncio.CancelledError(reason)
        return resp

    async def _prepare(self, req: AgentRequest, lean: bool) -> RunContext:
        """Authorize, guardrails, memory, budget scopes: the run's snapshot, one call.

        A lean run (``LEAN_PATCH``) prepares in a local activity: its result is a marker in the
        run's first workflow task, which then schedules the first plan, instead of an activity
        (three events) and a second workflow task (three more) and their round trips through
        the server. The work, its retries and its idempotence (a retry, reset or replay may
        prepare again) are the activity's own; so is the failure a run reports.
        """
        st = self._state
        inp = PrepareInput(request=req, workflow_id=st.wid, chain_id=workflow.info().first_execution_run_id)
        if not lean:
            ctx: RunContext = await self._stopper.shielded(
                workflow.start_activity(
                    "prepare_run",
                    inp,
                    result_type=RunContext,
                    start_to_close_timeout=PREPARE_TIMEOUT,
                    retry_policy=CONTROL_RETRY,
                    summary="authorize, guardrails, memory",
                )
            )
            return ctx
        try:
            ctx = await self._stopper.shielded(
                workflow.start_local_activity(
                    "prepare_run",
                    inp,
                    result_type=RunContext,
                    start_to_close_timeout=PREPARE_TIMEOUT,
                    retry_policy=CONTROL_RETRY,
                    summary="authorize, guardrails, memory",
                )
            )
        except ApplicationError as e:  # a local activity's failure arrives unwrapped: name it
            raise LocalActivityFailed("prepare_run", e) from e
        return ctx

    async def _begin(self, req: AgentRequest, started: datetime) -> tuple[RunContext, PlanOutput | None]:
        """Prepare and make the first plan in one activity (``BEGIN_PATCH``).

        One activity round trip instead of the preparation's local activity in the first
        workflow task and a ``plan`` activity whose input carried the snapshot back out: the
        first plan is made from the snapshot the preparation just took (``begin_run``). No
        model call before the authorization: a refused run gets its context and no plan.

        The activity retries as a model step does (the preparation is idempotent, see
        ``keel.activities.begin``). A stop cancels it like a plan, but the workflow waits for
        the activity to acknowledge (``WAIT_CANCELLATION_COMPLETED``): its preparation is
        shielded, so the run's ending never overtakes a slot still being taken. When it
        fails, the run ends through ``_end`` with the empty context (no scopes, no judge),
        as a failed ``prepare_run`` did: ``finish_run`` releases the slot by workflow id, and
        the plan's spend is booked from the error's report (or settled from the ledger).

        The deadline is only known from the snapshot, so the workflow's timer cannot bound the
        first plan: the activity does (``BeginInput.started_at`` plus the snapshot's deadline;
        a plan still running then stops, its calls charged as any interrupted call, and the
        run ends ``escape_hatch``/``deadline``). The run's timer then starts with the time
        already spent subtracted, so a first plan that finished just past the deadline stops
        the run before any step.
        """
        st = self._state
        tier = clamp_tier(req.model_policy.min_tier, req.model_policy.max_tier)
        inp = BeginInput(
            prepare=PrepareInput(
                request=req, workflow_id=st.wid, chain_id=workflow.info().first_execution_run_id
            ),
            tier=tier,
            started_at=started,
        )
        if st.versions.local_begin():
            local = await self._begin_local(inp, tier)
            if not local.remote:
                # Its first plan was made (and charged) in this workflow task: a worker lost
                # before the task completes makes the next one begin again, with a new charge
                # the ledger may refuse. So the first tool runs as an activity, which ends the
                # task: no effect ever shares a task with the beginning (see StepRunner).
                st.begun_in_task = True
                return local.context, local.plan
        try:
            out: BeginOutput = await self._stopper.interruptible(
                workflow.start_activity(
                    "begin_run",
                    inp,
                    result_type=BeginOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"authorize, guardrails, memory; plan #1 ({tier})",
                )
            )
        except ActivityError as e:
            await self._planner.failed(e, 1, planned=not _prepare_failed(e))
        return out.context, out.plan

    async def _begin_local(self, inp: BeginInput, tier: str) -> BeginOutput:
        """``begin_run``'s work as a local activity in this workflow task (``LOCAL_BEGIN_PATCH``)
        when the run's models are all the built-in offline one; otherwise ``remote`` comes back
        at once and ``_begin`` schedules ``begin_run``. Cancelled as ``begin_run`` is (the
        workflow waits for the local activity to acknowledge, so the ending never overtakes a
        slot being taken); its failure is handled as ``begin_run``'s."""
        try:
            out: BeginOutput = await self._stopper.interruptible(
                workflow.start_local_activity(
                    "begin_local",
                    inp,
                    result_type=BeginOutput,
                    start_to_close_timeout=PREPARE_TIMEOUT,
                    retry_policy=LOCAL_BEGIN_RETRY,
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"authorize, guardrails, memory; plan #1 ({tier}) here if offline",
                )
            )
        except ActivityError as e:
            await self._planner.failed(e, 1, planned=not _prepare_failed(e))
        except FailureError as e:  # a local activity's own error arrives unwrapped: wrap it
            wrapped = as_activity_error(e, "begin_local")
            await self._planner.failed(wrapped, 1, planned=not _prepare_failed(wrapped))
        return out

    async def _end(
        self,
        req: AgentRequest,
        ctx: RunContext,
        outcome: str,
        reason: str,
        answer: str,
        internal: BaseException | None,
    ) -> AgentResponse:
        """The one ending. From here on nothing is cancellable: undo, release, answer."""
        try:
            if outcome not in ("completed", "partial", "needs_human"):
                await self._saga.rollback(req)
            await self._holds.release_open()
        except ACTIVITY_FAILURES as e:  # a settle or release out of retries: still answer
            self._state.flags.append("cleanup_failed")
            reason = f"{reason}; cleanup incomplete: {cause(e)}"
        resp = await self._finish(req, ctx, outcome, reason, answer)
        if internal is not None:
            raise ApplicationError(
                f"run failed: {reason}", resp, type=INTERNAL_ERROR, non_retryable=True
            ) from None
        return resp

    async def _deadline(self, seconds: int, spent: float = 0.0) -> None:
        if not self._state.versions.patched("keel-deadline-pauses-for-people"):
            await workflow.sleep(seconds, summary="run deadline")
            self._stopper.request(
                Abort(
                    "escape_hatch", f"deadline: the run exceeded its {seconds} s wall-clock limit", "deadline"
                )
            )
            return
        await self._compute_deadline(seconds - spent)
        self._stopper.request(
            Abort(
                "escape_hatch",
                f"deadline: the run used its {seconds} s limit (time waiting for a person not counted)",
                "deadline",
            )
        )

    async def _compute_deadline(self, seconds: float) -> None:
        """The deadline counts the run's own time: a wait for a person pauses it. That wait
        has its own timeout and safe default, which must be able to fire: a one-hour approval
        timeout inside a five-minute deadline otherwise never does."""
        st = self._state
        left = float(seconds)
        while left > 0:
            started = workflow.now()
            try:
                await workflow.wait_condition(
                    lambda: st.phase == "waiting_approval",
                    timeout=timedelta(seconds=left),
                    timeout_summary=f"run deadline: {round(left)} s left (paused while a person decides)",
                )
            except TimeoutError:
                return
            left -= (workflow.now() - started).total_seconds()
            await workflow.wait_condition(lambda: st.phase != "waiting_approval")

    async def _loop(
        self, req: AgentRequest, ctx: RunContext, begun: PlanOutput | None = None
    ) -> tuple[str, str, str]:
        st, limits = self._state, ctx.limits
        tier = clamp_tier(req.model_policy.min_tier, req.model_policy.max_tier)
        st.start_tier = tier
        escalations = 0
        tool_calls = 0
        consecutive_failures = 0
        signatures: list[str] = []
        answer = ""
        for iteration in range(1, limits.max_iterations + 1):
            st.iterations = iteration
            accepted = None
            if iteration == 1 and begun is not None:  # made by ``begin_local`` / ``begin_run``
                # Booked before the safe point: a stop that arrived while the beginning ran
                # (and that it finished anyway) must not leave the plan's charged calls out of
                # the run's report. Booking is run state only, no command: replays agree.
                accepted = self._planner.accept(begun, tier, iteration)
            self._stopper.check()
            # The planner shows memory from the second plan on, and every recorded step's
            # result or error: either is untrusted data steering the plan (provenance).
            st.plan_saw_untrusted = bool(st.order) or (iteration > 1 and bool(ctx.memory))
            if accepted is not None:
                st.phase = "planning"
                plan, tier = accepted
            else:
                plan, tier = await self._planner.plan(req, ctx, tier, iteration)
            st.plan_sizes.append(len(plan.plan.steps))
            checked = st.versions.patched(HOLDS_PATCH)  # same answer as inside plan()
            if checked:
                # "Completed" must mean done: no steps for a request that names an order and
                # asks for an action is not an answer; and a plan's side effects run only
                # after it passed the rules (and the judge, when the run has one).
                if plan.plan.steps:
                    problem = await self._planner.check_plan(req, ctx, plan.plan, tier, iteration)
                else:
                    problem = unaddressed(req.message, [r.model_dump(mode="json") for r in st.records()])
                if problem:
                    higher = (
                        next_tier(tier, req.model_policy.max_tier)
                        if escalations < req.model_policy.max_escalations
                        else None
                    )
                    st.flags.append("plan_refused")
                    if higher is not None and iteration < limits.max_iterations:
                        escalations += 1
                        tier = higher
                        st.flags.append(f"escalated_to_{higher}")
                        continue
                    return "needs_human", f"plan refused before it ran: {problem}", answer
            answer = plan.plan.answer or answer
            if not plan.plan.steps:
                if any(r.state == StepState.FAILED for r in st.steps.values()):
                    return "partial", "some steps failed; see the step list", answer
                return "completed", "", answer
            steps = _unique_ids(plan.plan.steps, set(st.steps), iteration)
            if st.versions.patched("plan-admission"):
                await self._steps.admit(ctx, steps)
            first = len(st.order)
            st.phase = "executing"
            for step in steps:
                self._stopper.check()
                hatch = d.escape_hatch(
                    limits,
                    tool_calls=tool_calls,
                    consecutive_failures=consecutive_failures,
                    signatures=signatures,
                    next_signature=d.call_signature(step.tool, step.args),
                )
                if hatch:
                    raise Abort("escape_hatch", hatch, hatch.split(":", 1)[0])
                state = await self._steps.run(req, ctx, step)
                if state == StepState.SUCCEEDED:
                    consecutive_failures = 0
                    tool_calls += 1
                    signatures.append(d.call_signature(step.tool, step.args))
                elif state == StepState.FAILED:
                    consecutive_failures += 1
                    tool_calls += 1
                    signatures.append(d.call_signature(step.tool, step.args))
            self._stopper.check()
            if checked:
                current = tuple(st.steps[i] for i in st.order[first:] if i not in st.recovered)
                evaluation = await self._planner.evaluate_iteration(req, ctx, current)
            else:
                evaluation = await self._planner.evaluate(req, ctx)
            failed = any(r.state == StepState.FAILED and r.id not in st.recovered for r in st.steps.values())
            if evaluation.score < limits.escalate_below and escalations < req.model_policy.max_escalations:
                higher = next_tier(tier, req.model_policy.max_tier)
                if higher is not None:
                    escalations += 1
                    tier = higher
                    st.flags.append(f"escalated_to_{higher}")
                    continue
            if evaluation.confidence < limits.min_confidence:
                st.flags.append("low_confidence")
                return (
                    "needs_human",
                    f"confidence {evaluation.confidence:.2f} below {limits.min_confidence:.2f}: "
                    "handing off to a human",
                    answer,
                )
            if not failed and not plan.plan.replan:
                return "completed", "", answer
            if failed and iteration == limits.max_iterations:
                return "partial", "some steps failed; see the step list", answer
        st.flags.append("iteration_cap")
        return (
            "escape_hatch",
            f"iteration_cap: stopped after {limits.max_iterations} plan/act iterations",
            answer,
        )

    async def _finish(
        self, req: AgentRequest, ctx: RunContext, outcome: str, reason: str, answer: str
    ) -> AgentResponse:
        st = self._state
        st.phase = "finishing"
        st.outcome = outcome
        spend = st.spend()
        inp = FinishInput(
            workflow_id=st.wid,
            request=req,
            executed=st.records(),
            outcome=outcome,
            reason=reason,
            answer=answer,
            iterations=st.iterations,
            model=ctx.tiers.get(TIER_ORDER[0], "offline"),
            spend_micros=spend.total_micros,
            plan_sizes=tuple(st.plan_sizes),
            flags=tuple(st.flags),
            thrash_repeats=ctx.limits.thrash_repeats,
            scopes=ctx.scopes,
            start_tier=st.start_tier,
            max_calls=self._planner.calls_left(ctx),
        )
        if st.versions.lean() and not ctx.judge:
            # No live model in the run's tiers: the finish writes rows and calls no model, so
            # it runs as a local activity in the workflow task that decided the outcome (one
            # marker event instead of an activity's three and the next workflow task's three).
            # Same retries: it waits out a database outage, for as long as it takes.
            out: FinishOutput = await self._stopper.shielded(
                workflow.start_local_activity(
                    "finish_run",
                    inp,
                    result_type=FinishOutput,
                    start_to_close_timeout=FINISH_LOCAL_TIMEOUT,
                    retry_policy=FINISH_RETRY,
                    summary=f"respond ({outcome})",
                )
            )
        else:
            out = await self._stopper.shielded(
                workflow.start_activity(
                    "finish_run",
                    inp,
                    result_type=FinishOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=FINISH_RETRY,
                    summary=f"respond ({outcome})",
                )
            )
        self._planner.book(out.calls, "answer")
        if out.flag:  # the model's answer claimed an effect no step produced
            outcome, reason = "needs_human", out.flag
            st.outcome = outcome
            st.flags.append("answer_flagged")
        spend = st.spend()  # the answer's calls included
        st.flags.extend(out.flags)
        attrs: list[SearchAttributeUpdate[Any]] = [
            OUTCOME.value_set(outcome),
            SPEND.value_set(spend.total_micros),
        ]
        if st.versions.patched(FLAGS_PATCH):  # runs recorded before KeelFlags existed replay without it
            attrs.append(FLAGS.value_set(list(dict.fromkeys(st.flags))))
        workflow.upsert_search_attributes(attrs)
        st.phase = "done"
        return AgentResponse(
            workflow_id=st.wid,
            message=out.message,
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            steps=st.records(),
            spend=spend,
            model_label=st.model_label or ctx.model_label,
            compensated=tuple(self._saga.compensated),
            iterations=st.iterations,
            policy_version=ctx.policy_version,
            flags=tuple(dict.fromkeys(st.flags)),
            calls=tuple(st.calls),
        )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class LocalActivityFailed(Exception):
    """A local activity of the run gave up: its own error (a local activity's failure is not
    wrapped in an ``ActivityError``), with the activity's name for the run's reason."""

    def __init__(self, activity_type: str, error: BaseException) -> None:
        super().__init__(f"{activity_type} failed: {error}")
        self.activity_type = activity_type


def _prepare_failed(e: ActivityError) -> bool:
    """Whether ``begin_run`` failed in its preparation (before any model call)."""
    details: tuple[Any, ...] = tuple(getattr(e.cause, "details", None) or ())
    return bool(details) and details[0] == PREPARE_STAGE


def _activity_name(e: BaseException) -> str:
    return getattr(e, "activity_type", None) or "an activity"


_SAFE_STEP_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""Step ids become parts of idempotency, ledger and audit keys (``<workflow id>/<step id>``):
a planner's id with a NUL (PostgreSQL refuses it), a ``/`` (``rsplit("/")`` would cut it and
two steps could share an audit key) or no characters at all is replaced."""


def _unique_ids(steps: tuple[PlanStep, ...], taken: set[str], iteration: int) -> tuple[PlanStep, ...]:
    """A step id already used in this run gets the iteration as a suffix (keys stay unique);
    an id that is not safe in a key is replaced by its position (``s<n>.<iteration>``)."""
    out = []
    seen = set(taken)
    for n, step in enumerate(steps, start=1):
        if not _SAFE_STEP_ID.fullmatch(step.id):
            step = step.model_copy(update={"id": f"s{n}.{iteration}"})
        while step.id in seen:
            step = step.model_copy(update={"id": f"{step.id}.{iteration}"})
        seen.add(step.id)
        out.append(step)
    return tuple(out)
