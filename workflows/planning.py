"""Model calls of the loop: the plan of each iteration, its check, and its evaluation.

Holds have one owner, the activity that spends (``keel.activities.metered``): each model call a
plan, check or evaluate activity makes is held and committed by that activity, which reports
every call's cost — on success in its output, on failure in its error's first detail. This
module books those reports, so the run's spend equals the ledger's; a ``BudgetDenied`` from
the activity ends the run ``budget_exhausted``.

Runs recorded before that change (no ``HOLDS_PATCH`` marker) replay the old path, where the
workflow held one reservation per step itself (``_plan_v1`` / ``_evaluate_v1``).
"""

from __future__ import annotations

import json
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.opentelemetry import TracingWorkflowInboundInterceptor
    from temporalio.contrib.opentelemetry import workflow as traced

    from keel.agent_io import (
        JUDGE_TOKENS,
        MAX_EXECUTED_IN_PROMPT,
        PLAN_TOKENS,
        EvalInput,
        EvalOutput,
        ModelCallsInput,
        ModelCallsOutput,
        PlanInput,
        PlanOutput,
        RunContext,
    )
    from keel.errors import BUDGET_DENIED, RUN_DEADLINE
    from keel.gate import check_tool_call
    from keel.intent import plan_problems, results_verdict
    from keel.models import AgentRequest, ModelCallRecord, Plan, PlanStep, StepRecord
    from keel.tiers import TIER_ORDER, clamp_tier

from keel.workflows.holds import Holds
from keel.workflows.options import CONTROL_RETRY, CONTROL_TIMEOUT, MODEL_HEARTBEAT, MODEL_RETRY, MODEL_TIMEOUT
from keel.workflows.state import RunState
from keel.workflows.stop import Abort, Stopper, cause

__all__ = ["HOLDS_PATCH", "Planner"]

HOLDS_PATCH = "model-holds-in-activity"
"""Patch marker: model holds are placed by the activities, plans are checked before their
side effects run, and evaluation scores the current iteration's steps."""

MIN_OUTPUT_TOKENS = 128  # a grant smaller than the prompt plus this much output is useless
PROMPT_OVERHEAD_TOKENS = 700  # system prompt and message framing, generously rounded up


class Planner:
    def __init__(self, state: RunState, stopper: Stopper, holds: Holds) -> None:
        self._state, self._stopper, self._holds = state, stopper, holds

    def plan_input_tokens(self, req: AgentRequest, ctx: RunContext) -> int:
        """An upper bound on a plan prompt's tokens: every part the prompt is built from, at
        3 characters a token (tokenizers average ~4 on prose), plus the fixed instructions."""
        tools = sum(len(t.name) + len(t.description) + len(json.dumps(t.args_schema)) for t in ctx.tools)
        steps = sum(len(r.model_dump_json()) + 240 for r in self._state.records()[-MAX_EXECUTED_IN_PROMPT:])
        # The agent's instructions are the prompt's first part (empty in older snapshots).
        chars = len(req.message) + len(ctx.memory) + len(ctx.instructions) + tools + steps
        return PROMPT_OVERHEAD_TOKENS + chars // 3

    async def plan(
        self, req: AgentRequest, ctx: RunContext, tier: str, iteration: int
    ) -> tuple[PlanOutput, str]:
        if not self._state.versions.patched(HOLDS_PATCH):
            return await self._plan_v1(req, ctx, tier, iteration)
        st = self._state
        st.phase = "planning"
        model = ctx.tiers.get(tier, "offline")
        try:
            out: PlanOutput = await self._stopper.interruptible(
                workflow.start_activity(
                    "plan",
                    PlanInput(
                        workflow_id=st.wid,
                        message=req.message,
                        memory=ctx.memory,
                        tools=ctx.tools,
                        model=model,
                        executed=st.records()[-MAX_EXECUTED_IN_PROMPT:],
                        tier=tier,
                        max_tokens=PLAN_TOKENS,
                        iteration=iteration,
                        scopes=ctx.scopes,
                        start_tier=st.start_tier,
                        tiers=ctx.tiers,
                        max_calls=self.calls_left(ctx),
                        instructions=ctx.instructions,
                    ),
                    result_type=PlanOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"plan #{iteration} ({model}, {tier})",
                )
            )
        except ActivityError as e:
            await self.failed(e, iteration)
        return self.accept(out, tier, iteration)

    async def failed(self, e: ActivityError, iteration: int, *, planned: bool = True) -> NoReturn:
        """End the run for a plan activity (or ``begin_run``) that gave up: book what it
        spent, then stop (a cancel, a budget denial, or a failed plan). ``planned=False``:
        the failure came before any model call (``begin_run``'s preparation) and is the run's
        activity failure, as a failed ``prepare_run`` was."""
        self._stopper.note_cancel(e)
        await self._book_failure(e, f"plan{iteration}")
        self._stopper.check()
        if not planned:
            raise e
        if error_type(e) == RUN_DEADLINE:
            raise Abort("escape_hatch", cause(e), "deadline") from e
        if error_type(e) == BUDGET_DENIED:
            raise Abort("budget_exhausted", f"planning stopped: {cause(e)}", "budget_denied") from e
        raise Abort("failed", f"planning failed: {cause(e)}", "plan_failed") from e

    def accept(self, out: PlanOutput, tier: str, iteration: int) -> tuple[PlanOutput, str]:
        """Book a plan's calls and take the tier that served it (the ledger may cap it)."""
        self.book(out.calls, f"plan{iteration}")
        served = next((c.tier for c in reversed(out.calls) if c.outcome == "ok" and c.tier), tier)
        if served != tier and served in TIER_ORDER and TIER_ORDER.index(served) < TIER_ORDER.index(tier):
            self._state.flags.append(f"capped_to_{served}")  # the ledger capped the tier (low headroom)
            tier = served
        return out, tier

    def calls_left(self, ctx: RunContext) -> int:
        """Model calls the run may still send (``RunLimits.max_model_calls``)."""
        return max(0, ctx.limits.max_model_calls - self._state.spend().model_calls)

    async def _book_failure(self, e: ActivityError, step: str) -> None:
        """Book what a failed model step spent: from its error's details, or — when it died
        without any (a timeout) — from the ledger, committing the holds it left open."""
        if isinstance(e.cause, ApplicationError):
            self.book(failed_calls(e), step)
            return
        out: ModelCallsOutput = await self._stopper.shielded(
            workflow.start_local_activity(
                "settle_model_calls",
                ModelCallsInput(prefix=f"{self._state.wid}/{step}"),
                result_type=ModelCallsOutput,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"settle model calls of {step}",
            )
        )
        self.book(out.calls, step)

    def book(self, calls: tuple[ModelCallRecord, ...] | list[ModelCallRecord], step: str) -> None:
        """Charge each call an activity reports, as the ledger committed it, and show a
        failover (a call its provider's breaker moved) in the flags and the model label."""
        st = self._state
        for c in calls:
            st.calls.append(c)
            if c.outcome == "budget_denied" or c.outcome.startswith("capped_to_"):
                continue  # never sent: held nothing, or gave its hold back
            st.charge(c.cost_micros, tier=c.tier, model=c.model, step=step, cheapest=c.tier == TIER_ORDER[0])
            if c.fallback_from:
                st.flags.append(f"failover:{c.fallback_from}->{c.model}")
                if c.model not in st.model_label:
                    st.model_label = f"{st.model_label}, {c.model} (failover from {c.fallback_from})"

    async def check_plan(
        self, req: AgentRequest, ctx: RunContext, plan: Plan, tier: str, iteration: int
    ) -> str:
        """Why ``plan`` must not run as it stands (``""``: let it run), decided before any of
        its side-effecting steps: the rules always, the judge too when the run has one."""
        writes = {t.name for t in ctx.all_tools if t.side_effects}
        if not any(s.tool in writes for s in plan.steps):
            return ""
        # A step the gate will deny is left to the gate: it stops the run ``denied`` when it is
        # reached, with the denial in the audit log (a stronger answer than a refused plan).
        # The steps before it still run, so they are checked.
        denied = next((i for i, s in enumerate(plan.steps) if self._gate_denies(req, ctx, s)), None)
        steps = [s.model_dump(mode="json") for s in plan.steps[:denied]]
        problem = plan_problems(req.message, steps, writes, whole=denied is None)
        if problem or not ctx.judge or denied is not None:
            return problem
        out = await self._judge(
            req,
            ctx,
            EvalInput(
                workflow_id=self._state.wid,
                message=req.message,
                plan=plan,
                model=ctx.tiers.get(TIER_ORDER[0], "offline"),
                iteration=iteration,
                scopes=ctx.scopes,
                tier=TIER_ORDER[0],
                start_tier=self._state.start_tier,
                side_effect_tools=tuple(sorted(writes)),
                max_tokens=JUDGE_TOKENS,
                max_calls=self.calls_left(ctx),
            ),
            f"check{iteration}",
        )
        if out.score < ctx.limits.escalate_below or out.confidence < ctx.limits.min_confidence:
            return (
                f"the judge scored the plan {out.score:.2f} (confidence {out.confidence:.2f}): {out.reason}"
            )
        return ""

    def _gate_denies(self, req: AgentRequest, ctx: RunContext, step: PlanStep) -> bool:
        """The gate's verdict on a step whose arguments are already literal (no references)."""
        if "${" in json.dumps(step.args, default=str):
            return False
        tool = next((t for t in ctx.tools if t.name == step.tool), None)
        st = self._state
        try:
            # The same data-flow facts the step runner gives the gate (labels, provenance,
            # earlier sums): without them the gate fails closed on every flow rule, and a
            # predicted denial would skip the plan's rules for the steps it hides.
            flow = st.flow(req, ctx, tool, step.tool, step.args, step.args)
            gate = check_tool_call(
                st.policy(ctx),
                req.tenant,
                req.user,
                ctx.permissions,
                tool,
                step.args,
                st.gate_context(ctx),
                flow,
            )
        except Exception:  # arguments the pure gate cannot judge: the step runner denies them
            return True
        return not gate.allowed

    async def evaluate_iteration(
        self, req: AgentRequest, ctx: RunContext, current: tuple[StepRecord, ...]
    ) -> EvalOutput:
        """Score this iteration's steps (after an escalation, the failed plan's steps are not
        the current plan's); the intent rule still sees every step of the run."""
        st = self._state
        st.phase = "evaluating"
        judge = ctx.tiers.get(TIER_ORDER[0], "offline") if ctx.judge else None
        earlier = tuple(r for r in st.evaluated() if r not in current)
        if judge is None and st.versions.lean():
            # No judge: the evaluation is the rules alone, pure and computed from the run's
            # own records, so the workflow applies them (the function the ``evaluate``
            # activity applies) instead of a round trip to an activity that calls nothing.
            score, confidence, reason, _ = results_verdict(req.message, current, earlier)
            _span(
                "Evaluate:rules",
                {"keel.score": score, "keel.confidence": confidence, "keel.iteration": st.iterations},
            )
            return EvalOutput(score=score, confidence=confidence, reason=reason)
        return await self._judge(
            req,
            ctx,
            EvalInput(
                workflow_id=st.wid,
                message=req.message,
                executed=current,
                history=earlier,
                model=judge,
                iteration=st.iterations,
                scopes=ctx.scopes,
                tier=TIER_ORDER[0],
                start_tier=st.start_tier,
                max_tokens=JUDGE_TOKENS,
                max_calls=self.calls_left(ctx),
            ),
            f"eval{st.iterations}",
        )

    async def _judge(self, req: AgentRequest, ctx: RunContext, inp: EvalInput, step: str) -> EvalOutput:
        what = "check" if inp.plan is not None else "evaluate"
        try:
            out: EvalOutput = await self._stopper.interruptible(
                workflow.start_activity(
                    "evaluate",
                    inp,
                    result_type=EvalOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"{what} #{inp.iteration}"
                    + (f" (judge {inp.model})" if inp.model else " (rules)"),
                )
            )
        except ActivityError as e:
            self._stopper.note_cancel(e)
            await self._book_failure(e, step)
            self._stopper.check()
            if error_type(e) == BUDGET_DENIED:
                raise Abort("budget_exhausted", f"evaluation stopped: {cause(e)}", "budget_denied") from e
            raise Abort("failed", f"evaluation failed: {cause(e)}", "eval_failed") from e
        self.book(out.calls, step)
        return out

    async def _plan_v1(
        self, req: AgentRequest, ctx: RunContext, tier: str, iteration: int
    ) -> tuple[PlanOutput, str]:
        st = self._state
        st.phase = "planning"
        model = ctx.tiers.get(tier, "offline")
        key = f"{st.wid}/plan{iteration}.{tier}"
        in_tokens = self.plan_input_tokens(req, ctx)
        reserve = await self._holds.reserve(
            req,
            ctx,
            key,
            kind="model",
            subject=model,
            tier=tier,
            amount=estimate(ctx, model, in_tokens, PLAN_TOKENS),
            min_amount=estimate(ctx, model, in_tokens, MIN_OUTPUT_TOKENS),
            max_tokens=PLAN_TOKENS,
        )
        self._stopper.check()  # a Temporal cancel noted during the reservation: do not plan
        # Output the grant can pay for once the (fixed) prompt is paid: a smaller grant must
        # shrink max_tokens by more than its proportion, or the call could overrun it.
        affordable = _affordable_output(ctx, model, in_tokens, reserve.granted_micros)
        max_tokens = max(1, min(reserve.caps.max_tokens or PLAN_TOKENS, affordable, PLAN_TOKENS))
        if reserve.caps.max_tier:
            capped = clamp_tier(tier, reserve.caps.max_tier)
            if capped != tier:
                st.flags.append(f"capped_to_{capped}")
                tier, model = capped, ctx.tiers.get(capped, "offline")
        try:
            out: PlanOutput = await self._stopper.interruptible(
                workflow.start_activity(
                    "plan",
                    PlanInput(
                        workflow_id=st.wid,
                        message=req.message,
                        memory=ctx.memory,
                        tools=ctx.tools,
                        model=model,
                        executed=st.records()[-MAX_EXECUTED_IN_PROMPT:],
                        tier=tier,
                        max_tokens=max_tokens,
                        iteration=iteration,
                        budget_micros=reserve.granted_micros,
                        instructions=ctx.instructions,
                    ),
                    result_type=PlanOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"plan #{iteration} ({model}, {tier})",
                )
            )
        except ActivityError as e:
            self._stopper.note_cancel(e)
            await self._holds.release(key)
            self._stopper.check()
            raise Abort("failed", f"planning failed: {cause(e)}", "plan_failed") from e
        await self._holds.commit(key, out.cost_micros)
        st.charge(
            out.cost_micros,
            tier=tier,
            model=out.model or model,
            step=f"plan{iteration}",
            cheapest=tier == TIER_ORDER[0],
        )
        st.calls.append(
            ModelCallRecord(
                role="plan",
                tier=tier,
                model=out.model or model,
                input_tokens=out.usage.input_tokens,
                cached_input_tokens=out.usage.cached_input_tokens,
                output_tokens=out.usage.output_tokens,
                cost_micros=out.cost_micros,
                latency_ms=out.latency_ms,
                escalated=TIER_ORDER.index(tier) > TIER_ORDER.index(st.start_tier or tier),
            )
        )
        return out, tier

    async def evaluate(self, req: AgentRequest, ctx: RunContext) -> EvalOutput:
        """The pre-``HOLDS_PATCH`` evaluation (runs recorded before it replay this)."""
        st = self._state
        st.phase = "evaluating"
        judge = ctx.tiers.get(TIER_ORDER[0], "offline") if ctx.judge else None
        key = f"{st.wid}/eval{st.iterations}"
        if judge:
            judge_amount = estimate(ctx, judge, self.plan_input_tokens(req, ctx), JUDGE_TOKENS)
            await self._holds.reserve(
                req,
                ctx,
                key,
                kind="model",
                subject=judge,
                tier=TIER_ORDER[0],
                min_amount=judge_amount,
                amount=judge_amount,
                max_tokens=JUDGE_TOKENS,
            )
        try:
            out: EvalOutput = await self._stopper.interruptible(
                workflow.start_activity(
                    "evaluate",
                    EvalInput(workflow_id=st.wid, message=req.message, executed=st.evaluated(), model=judge),
                    result_type=EvalOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"evaluate #{st.iterations}" + (f" (judge {judge})" if judge else " (rules)"),
                )
            )
        except ActivityError as e:
            self._stopper.note_cancel(e)
            if judge:
                await self._holds.release(key)
            self._stopper.check()
            raise Abort("failed", f"evaluation failed: {cause(e)}", "eval_failed") from e
        if judge:
            await self._holds.commit(key, out.cost_micros)
            st.charge(
                out.cost_micros, tier=TIER_ORDER[0], model=judge, step=key.rsplit("/", 1)[1], cheapest=True
            )
        return out


def _span(name: str, attributes: dict[str, str | int | float]) -> None:
    """A finished span in the run's trace, as the ``evaluate`` activity's span was: only when
    the worker traces (Temporal's interceptor), and never again on replay (the SDK's own
    workflow-side span, which skips replaying tasks)."""
    if TracingWorkflowInboundInterceptor._from_context() is not None:
        traced.completed_span(name, attributes={"keel.judge": "rules", **attributes})


def failed_calls(e: ActivityError) -> tuple[ModelCallRecord, ...]:
    """The calls a failed model activity reports in its error's first detail (none when it
    died without one, e.g. a timeout: its open holds expire and the next attempt, if any,
    commits them in full)."""
    app = e.cause
    details = getattr(app, "details", None) or ()
    first = details[0] if details else None
    if not isinstance(first, dict):
        return ()
    out: list[ModelCallRecord] = []
    for raw in first.get("calls") or ():
        try:
            out.append(ModelCallRecord.model_validate(raw))
        except ValueError:
            continue
    return tuple(out)


def error_type(e: ActivityError) -> str:
    """The ``ApplicationError`` type a failed activity raised (``""`` for timeouts)."""
    return str(getattr(e.cause, "type", "") or "")


def estimate(ctx: RunContext, model: str, input_tokens: int, max_tokens: int) -> int:
    """Worst-case micro-USD of a call, from the run's price snapshot (rounded up)."""
    p_in, p_out = ctx.token_prices.get(model, (0, 0))
    return -(-(input_tokens * p_in + max_tokens * p_out) // 1_000_000)


def _affordable_output(ctx: RunContext, model: str, input_tokens: int, granted: int) -> int:
    """Output tokens ``granted`` micro-USD still pays for after the prompt (rounded down)."""
    p_in, p_out = ctx.token_prices.get(model, (0, 0))
    if p_out <= 0:
        return PLAN_TOKENS
    return max(0, (granted * 1_000_000 - input_tokens * p_in) // p_out)
