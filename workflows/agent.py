"""AgentWorkflow: one durable run of the agent loop per request.

Deterministic by construction: all I/O happens in activities referenced by name; time comes
from ``workflow.now()``; decisions come from the pure modules ``workflows.decisions`` and
``workflows.gate``. The run works from a snapshot (policy, tool catalogue, model tiers) taken
by its first activity, so a redeploy mid-run cannot change what it decides on replay.

Flow: prepare (authorize + guardrails + memory) → loop { reserve → plan → commit;
for each step: gate (audited) → approval? → reserve → tool (commits its own cost) →
rules } → evaluate → cascade/replan/finish. On abort or cancellation, compensations run in
reverse order and open reservations are released.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from keel.agent_io import (
        EvalInput,
        EvalOutput,
        FinishInput,
        FinishOutput,
        PlanInput,
        PlanOutput,
        PrepareInput,
        RunContext,
        SettleInput,
        SettleResult,
        StepGateInput,
        StepGateResult,
    )
    from keel.budget import (
        CommitRequest,
        CommitResult,
        ReleaseRequest,
        ReserveRequest,
        ReserveResult,
    )
    from keel.models import (
        AgentRequest,
        AgentResponse,
        Approval,
        Decision,
        ModelCallRecord,
        PlanStep,
        RunStatus,
        Spend,
        StepGate,
        StepRecord,
        StepState,
        ToolCall,
        ToolInfo,
        ToolResult,
    )
    from keel.policy import Policy
    from keel.tiers import TIER_ORDER, clamp_tier, next_tier
    from workflows import decisions as d
    from workflows.gate import check_tool_call

__all__ = ["AgentWorkflow", "TENANT", "USER", "OUTCOME", "SPEND"]

TENANT = SearchAttributeKey.for_keyword("KeelTenant")
USER = SearchAttributeKey.for_keyword("KeelUser")
OUTCOME = SearchAttributeKey.for_keyword("KeelOutcome")
SPEND = SearchAttributeKey.for_int("KeelSpendMicros")

# Timeouts and retries, each with its reason.
PREPARE_TIMEOUT = timedelta(seconds=30)  # reads a file and a few rows; slow means broken
MODEL_TIMEOUT = timedelta(minutes=3)  # long completions; the activity heartbeats
MODEL_HEARTBEAT = timedelta(seconds=30)  # a dead worker is noticed within half a minute
CONTROL_TIMEOUT = timedelta(seconds=10)  # ledger/audit calls are single round trips
MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=["ProviderAuthError", "ProviderBadRequest", "InvalidPlan"],
)
CONTROL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    maximum_attempts=10,
    maximum_interval=timedelta(seconds=2),
    non_retryable_error_types=["IdempotencyConflict"],
)
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_attempts=0, maximum_interval=timedelta(seconds=30)
)  # must eventually undo
TOOL_HEARTBEAT = timedelta(seconds=4)  # tools beat every second; a killed worker is seen in 4 s
COMPENSATION_TIMEOUT = timedelta(seconds=30)  # one undo is one short transaction
PLAN_TOKENS = 1024  # output cap of a plan call; reservations price it in full
JUDGE_TOKENS = 256
MIN_OUTPUT_TOKENS = 128  # a grant smaller than the prompt plus this much output is useless
PROMPT_OVERHEAD_TOKENS = 700  # system prompt and message framing, generously rounded up
MAX_EXECUTED_IN_PROMPT = 20  # must match activities.agent: prompts show the latest 20 steps


class _Abort(Exception):
    """Internal: stop the loop with an outcome and a reason (never leaves the workflow)."""

    def __init__(self, outcome: str, reason: str, flag: str = "") -> None:
        super().__init__(reason)
        self.outcome, self.reason, self.flag = outcome, reason, flag


@workflow.defn(name="AgentWorkflow")
class AgentWorkflow:
    def __init__(self) -> None:
        self._policy_model: Policy | None = None
        self._phase = "starting"
        self._steps: dict[str, StepRecord] = {}
        self._order: list[str] = []
        self._results: dict[str, dict[str, Any]] = {}
        self._compensations: list[tuple[str, str, dict[str, Any]]] = []
        self._compensated: list[str] = []
        self._open_reservations: dict[str, tuple[tuple[str, ...], str]] = {}
        """Each open hold's key, with the scopes and kind a model hold's commit sends (see
        CommitRequest); tool holds are committed by the tool activity."""
        self._spend: dict[str, Any] = {
            "total": 0,
            "by_tier": {},
            "by_model": {},
            "by_tool": {},
            "by_step": {},
            "model_calls": 0,
            "cheapest": 0,
        }
        self._waiting_for = ""
        self._approvals: dict[str, Approval] = {}
        self._stop: _Abort | None = None
        """Why the run must stop: ``cancel`` update, deadline or Temporal cancel."""
        self._inflight: asyncio.Task[Any] | None = None
        """The long activity (plan, evaluate, tool) a stop request cancels."""
        self._recovered: set[str] = set()
        """Failed steps whose fallback tool succeeded (graceful degradation, not a failure)."""
        self._iterations = 0
        self._model_label = ""
        self._outcome = ""
        self._flags: list[str] = []
        self._wid = ""
        self._cleanup = False
        self._calls: list[ModelCallRecord] = []
        self._start_tier = ""

    # ------------------------------------------------------------------ queries / updates
    @workflow.query(name="status")
    def status(self) -> RunStatus:
        return RunStatus(
            workflow_id=self._wid,
            phase=self._phase,
            steps=self._records(),
            spend=self._spend_model(),
            waiting_for=self._waiting_for,
            iterations=self._iterations,
            model_label=self._model_label,
            outcome=self._outcome,
        )

    @workflow.update(name="approve")
    async def approve(self, decision: Approval) -> str:
        self._approvals[decision.step_id or self._waiting_step()] = decision
        return "approved" if decision.approve else "rejected"

    @approve.validator
    def _validate_approve(self, decision: Approval) -> None:
        step = decision.step_id or self._waiting_step()
        if (
            not step
            or self._steps.get(step, None) is None
            or (self._steps[step].state != StepState.WAITING_APPROVAL)
        ):
            raise ValueError(
                "no step of this run is waiting for approval"
                + (f" (asked for {decision.step_id})" if decision.step_id else "")
            )

    @workflow.update(name="cancel")
    async def cancel(self, reason: str) -> str:
        self._request_stop(_Abort("cancelled", reason or "cancelled by operator", "cancelled"))
        return "cancelling"

    @cancel.validator
    def _validate_cancel(self, reason: str) -> None:
        if self._outcome:
            raise ValueError(f"run already finished ({self._outcome})")

    def _waiting_step(self) -> str:
        return next((s for s, r in self._steps.items() if r.state == StepState.WAITING_APPROVAL), "")

    # ------------------------------------------------------------------ main
    @workflow.run
    async def run(self, req: AgentRequest) -> AgentResponse:
        self._wid = workflow.info().workflow_id
        self._phase = "authorizing"
        ctx: RunContext = await self._shielded(
            workflow.start_activity(
                "prepare_run",
                PrepareInput(request=req, workflow_id=self._wid),
                result_type=RunContext,
                start_to_close_timeout=PREPARE_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary="authorize, guardrails, memory",
            )
        )
        self._model_label = ctx.model_label
        if not ctx.authorized:
            return await self._finish(req, ctx, "denied", ctx.reason, "")
        if not ctx.input_ok:
            return await self._finish(req, ctx, "denied", ctx.input_reason, "")
        outcome, reason, answer = "completed", "", ""
        # The deadline is a timer beside the loop, not asyncio.wait_for: Temporal turns the
        # cancellation of an awaited activity into an ActivityError the loop would swallow.
        deadline = asyncio.create_task(self._deadline(ctx.limits.deadline_seconds))
        try:
            outcome, reason, answer = await self._loop(req, ctx)
        except _Abort as a:
            outcome, reason = a.outcome, a.reason
            self._flags.append(a.flag or a.outcome)
        except asyncio.CancelledError:
            # Temporal cancellation outside any activity (e.g. a timer): undo, then report.
            outcome, reason = "cancelled", "workflow cancelled"
            self._flags.append("cancelled")
        finally:
            deadline.cancel()
        # From here on nothing is cancellable: compensations, releases and the answer finish.
        self._cleanup = True
        if outcome not in ("completed", "partial", "needs_human"):
            await self._rollback(req)
        await self._release_open(req)
        return await self._finish(req, ctx, outcome, reason, answer)

    async def _deadline(self, seconds: int) -> None:
        await workflow.sleep(seconds, summary="run deadline")
        self._request_stop(
            _Abort(
                "escape_hatch", (f"deadline: the run exceeded its {seconds} s wall-clock limit"), "deadline"
            )
        )

    async def _loop(self, req: AgentRequest, ctx: RunContext) -> tuple[str, str, str]:
        limits = ctx.limits
        tier = clamp_tier(req.model_policy.min_tier, req.model_policy.max_tier)
        self._start_tier = tier
        escalations = 0
        tool_calls = 0
        consecutive_failures = 0
        signatures: list[str] = []
        answer = ""
        for iteration in range(1, limits.max_iterations + 1):
            self._iterations = iteration
            self._check_cancel()
            plan, tier = await self._plan(req, ctx, tier, iteration)
            answer = plan.plan.answer or answer
            if not plan.plan.steps:
                if any(r.state == StepState.FAILED for r in self._steps.values()):
                    return "partial", "some steps failed; see the step list", answer
                return "completed", "", answer
            self._phase = "executing"
            for step in plan.plan.steps:
                self._check_cancel()
                if step.id in self._steps:
                    step = step.model_copy(update={"id": f"{step.id}.{iteration}"})
                hatch = d.escape_hatch(
                    limits,
                    tool_calls=tool_calls,
                    consecutive_failures=consecutive_failures,
                    signatures=signatures,
                    next_signature=d.call_signature(step.tool, step.args),
                )
                if hatch:
                    raise _Abort("escape_hatch", hatch, hatch.split(":", 1)[0])
                state = await self._run_step(req, ctx, step)
                if state == StepState.SUCCEEDED:
                    consecutive_failures = 0
                    tool_calls += 1
                    signatures.append(d.call_signature(step.tool, step.args))
                elif state == StepState.FAILED:
                    consecutive_failures += 1
                    tool_calls += 1
                    signatures.append(d.call_signature(step.tool, step.args))
            self._check_cancel()
            evaluation = await self._evaluate(req, ctx)
            failed = any(
                r.state == StepState.FAILED and r.id not in self._recovered for r in self._steps.values()
            )
            if evaluation.score < limits.escalate_below and escalations < req.model_policy.max_escalations:
                higher = next_tier(tier, req.model_policy.max_tier)
                if higher is not None:
                    escalations += 1
                    tier = higher
                    self._flags.append(f"escalated_to_{higher}")
                    continue
            if evaluation.confidence < limits.min_confidence:
                self._flags.append("low_confidence")
                return (
                    "needs_human",
                    (
                        f"confidence {evaluation.confidence:.2f} below "
                        f"{limits.min_confidence:.2f}: handing off to a human"
                    ),
                    answer,
                )
            if not failed and not plan.plan.replan:
                return "completed", "", answer
            if failed and iteration == limits.max_iterations:
                return "partial", "some steps failed; see the step list", answer
        self._flags.append("iteration_cap")
        return (
            "escape_hatch",
            (f"iteration_cap: stopped after {limits.max_iterations} plan/act iterations"),
            answer,
        )

    def _plan_input_tokens(self, req: AgentRequest, ctx: RunContext) -> int:
        """An upper bound on a plan prompt's tokens: every part the prompt is built from, at
        3 characters a token (tokenizers average ~4 on prose), plus the fixed instructions."""
        tools = sum(len(t.name) + len(t.description) + len(json.dumps(t.args_schema)) for t in ctx.tools)
        steps = sum(len(r.model_dump_json()) + 240 for r in self._records()[-MAX_EXECUTED_IN_PROMPT:])
        chars = len(req.message) + len(ctx.memory) + tools + steps
        return PROMPT_OVERHEAD_TOKENS + chars // 3

    # ------------------------------------------------------------------ planning
    async def _plan(
        self, req: AgentRequest, ctx: RunContext, tier: str, iteration: int
    ) -> tuple[PlanOutput, str]:
        self._phase = "planning"
        model = ctx.tiers.get(tier, "offline")
        key = f"{self._wid}/plan{iteration}.{tier}"
        in_tokens = self._plan_input_tokens(req, ctx)
        reserve = await self._reserve(
            req,
            ctx,
            key,
            kind="model",
            subject=model,
            tier=tier,
            amount=_estimate(ctx, model, in_tokens, PLAN_TOKENS),
            min_amount=_estimate(ctx, model, in_tokens, MIN_OUTPUT_TOKENS),
            max_tokens=PLAN_TOKENS,
        )
        self._check_cancel()  # a Temporal cancel noted during the reservation: do not plan
        # Output the grant can pay for once the (fixed) prompt is paid: a smaller grant must
        # shrink max_tokens by more than its proportion, or the call could overrun it.
        affordable = _affordable_output(ctx, model, in_tokens, reserve.granted_micros)
        max_tokens = max(1, min(reserve.caps.max_tokens or PLAN_TOKENS, affordable, PLAN_TOKENS))
        if reserve.caps.max_tier:
            capped = clamp_tier(tier, reserve.caps.max_tier)
            if capped != tier:
                self._flags.append(f"capped_to_{capped}")
                tier, model = capped, ctx.tiers.get(capped, "offline")
        try:
            out: PlanOutput = await self._interruptible(
                workflow.start_activity(
                    "plan",
                    PlanInput(
                        workflow_id=self._wid,
                        message=req.message,
                        memory=ctx.memory,
                        tools=ctx.tools,
                        model=model,
                        executed=self._records()[-MAX_EXECUTED_IN_PROMPT:],
                        tier=tier,
                        max_tokens=max_tokens,
                        iteration=iteration,
                        budget_micros=reserve.granted_micros,
                    ),
                    result_type=PlanOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"plan #{iteration} ({model}, {tier})",
                )
            )
        except ActivityError as e:
            self._note_cancel(e)
            await self._release(req, key)
            self._check_cancel()
            raise _Abort("failed", f"planning failed: {_cause(e)}", "plan_failed") from e
        await self._commit(key, out.cost_micros)
        self._charge(
            out.cost_micros,
            tier=tier,
            model=out.model or model,
            step=f"plan{iteration}",
            cheapest=tier == TIER_ORDER[0],
        )
        self._calls.append(
            ModelCallRecord(
                role="plan",
                tier=tier,
                model=out.model or model,
                input_tokens=out.usage.input_tokens,
                cached_input_tokens=out.usage.cached_input_tokens,
                output_tokens=out.usage.output_tokens,
                cost_micros=out.cost_micros,
                latency_ms=out.latency_ms,
                escalated=TIER_ORDER.index(tier) > TIER_ORDER.index(self._start_tier or tier),
            )
        )
        return out, tier

    async def _evaluate(self, req: AgentRequest, ctx: RunContext) -> EvalOutput:
        self._phase = "evaluating"
        judge = ctx.tiers.get(TIER_ORDER[0], "offline") if ctx.judge else None
        key = f"{self._wid}/eval{self._iterations}"
        if judge:
            judge_amount = _estimate(ctx, judge, self._plan_input_tokens(req, ctx), JUDGE_TOKENS)
            await self._reserve(
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
            out: EvalOutput = await self._interruptible(
                workflow.start_activity(
                    "evaluate",
                    EvalInput(
                        workflow_id=self._wid, message=req.message, executed=self._evaluated(), model=judge
                    ),
                    result_type=EvalOutput,
                    start_to_close_timeout=MODEL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT,
                    retry_policy=MODEL_RETRY,
                    summary=f"evaluate #{self._iterations}" + (f" (judge {judge})" if judge else " (rules)"),
                )
            )
        except ActivityError as e:
            self._note_cancel(e)
            if judge:
                await self._release(req, key)
            self._check_cancel()
            raise _Abort("failed", f"evaluation failed: {_cause(e)}", "eval_failed") from e
        if judge:
            await self._commit(key, out.cost_micros)
            self._charge(
                out.cost_micros, tier=TIER_ORDER[0], model=judge, step=key.rsplit("/", 1)[1], cheapest=True
            )
        return out

    # ------------------------------------------------------------------ one step
    async def _run_step(self, req: AgentRequest, ctx: RunContext, step: PlanStep) -> StepState:
        record = StepRecord(id=step.id, tool=step.tool, args=step.args)
        self._put(record)
        if not d.condition_holds(step.when, self._results):
            self._put(
                record.model_copy(
                    update={
                        "state": StepState.SKIPPED,
                        "summary": f"condition not met: {_when_text(step.when)}",
                    }
                )
            )
            return StepState.SKIPPED
        try:
            args = d.resolve_args(step.args, self._results)
        except d.ReferenceError_ as e:
            self._put(record.model_copy(update={"state": StepState.FAILED, "error": str(e)}))
            return StepState.FAILED
        record = record.model_copy(update={"args": args})
        tool = next((t for t in ctx.all_tools if t.name == step.tool), None)
        gate = check_tool_call(
            self._policy(ctx),
            req.tenant,
            req.user,
            ctx.permissions,
            tool if tool in ctx.tools else None,
            args,
            self._gate_context(),
        )
        key = f"{self._wid}/{step.id}"
        if not gate.allowed:
            await self._gate(
                req, ctx, step.id, step.tool, args, allowed=False, rule=gate.rule, reason=gate.reason
            )
            self._put(record.model_copy(update={"state": StepState.DENIED, "error": gate.reason}))
            raise _Abort("denied", f"step {step.id} ({step.tool}) denied: {gate.reason}", "permission_denied")
        assert tool is not None
        if gate.needs_approval:
            await self._await_approval(
                req,
                ctx,
                record,
                gate.reason,
                gate.approval_timeout_seconds or ctx.limits.approval_timeout_seconds,
                gate.on_timeout == "approve",
            )
        # The allow decision is made here; the tool activity records it in the audit log and
        # holds the step's budget before the effect (one round trip per step, see bench/).
        self._open_reservations[f"{key}/reserve"] = ((), "tool")
        self._check_cancel()
        self._put(record.model_copy(update={"state": StepState.RUNNING}))
        stepgate = StepGate(
            rule=gate.rule, reason=gate.reason, scopes=ctx.scopes, amount_micros=tool.cost_micros
        )
        try:
            out = await self._interruptible(
                self._start_tool(req, tool, args, key, f"{key}/reserve", stepgate)
            )
        except ActivityError as e:
            cancelled = self._note_cancel(e)
            why = f"cancelled: {self._stop.reason}" if cancelled and self._stop else _cause(e)
            await self._settle(
                req, step.id, step.tool, f"{key}/reserve", None, "cancelled" if cancelled else "failed", why
            )
            self._put(record.model_copy(update={"state": StepState.FAILED, "error": why}))
            self._check_cancel()
            if tool.fallback and any(t.name == tool.fallback for t in ctx.tools):
                return await self._fallback(req, ctx, step, tool)
            return StepState.FAILED
        if out.refused == "budget":
            self._open_reservations.pop(f"{key}/reserve", None)  # DENY held nothing
            self._put(record.model_copy(update={"state": StepState.DENIED, "error": out.error}))
            raise _Abort("budget_exhausted", f"budget denied {step.tool}: {out.error}", "budget_denied")
        if out.refused == "optional":
            self._open_reservations.pop(f"{key}/reserve", None)  # released by the activity
            self._put(record.model_copy(update={"state": StepState.SKIPPED, "summary": out.error}))
            return StepState.SKIPPED
        self._open_reservations.pop(f"{key}/reserve", None)
        self._results[step.id] = out.data
        if tool.compensation:
            self._compensations.append((step.id, tool.compensation, out.data))
        self._charge(out.cost_micros, tool=step.tool, step=step.id)
        self._put(
            record.model_copy(
                update={
                    "state": StepState.SUCCEEDED,
                    "summary": out.summary + (" (replayed)" if out.replayed else ""),
                    "result": out.data,
                    "cost_micros": out.cost_micros,
                    "score": 1.0,
                }
            )
        )
        return StepState.SUCCEEDED

    async def _fallback(
        self, req: AgentRequest, ctx: RunContext, step: PlanStep, tool: ToolInfo
    ) -> StepState:
        """Graceful degradation: run the declared fallback with the same arguments."""
        assert tool.fallback is not None
        fb = step.model_copy(update={"id": f"{step.id}f", "tool": tool.fallback})
        state = await self._run_step(req, ctx, fb)
        if state == StepState.SUCCEEDED:
            self._recovered.add(step.id)
            self._results[step.id] = self._results[fb.id]  # later ${sN.x} references still resolve
            self._flags += ["degraded", f"fallback:{step.tool}->{tool.fallback}"]
        return state

    def _start_tool(
        self,
        req: AgentRequest,
        tool: ToolInfo,
        args: dict[str, Any],
        key: str,
        reserve_key: str,
        gate: StepGate,
    ) -> workflow.ActivityHandle[ToolResult]:
        # WAIT_CANCELLATION_COMPLETED: a cancelled tool has really stopped (its transaction
        # rolled back) or really finished before the run moves on, so no effect goes unrecorded.
        return workflow.start_activity(
            "run_tool",
            ToolCall(
                tool=tool.name,
                args=args,
                idempotency_key=key,
                tenant=req.tenant,
                user=req.user,
                workflow_id=self._wid,
                step_id=key.rsplit("/", 1)[1],
                reservation_key=reserve_key,
                gate=gate,
            ),
            result_type=ToolResult,
            start_to_close_timeout=timedelta(seconds=tool.timeout_seconds),
            heartbeat_timeout=TOOL_HEARTBEAT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=500),
                maximum_interval=timedelta(seconds=10),
                maximum_attempts=tool.max_attempts,
                non_retryable_error_types=list(tool.non_retryable_errors),
            ),
            task_queue=_tool_queue(tool),
            summary=d.step_summary(tool.name, args),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def _await_approval(
        self,
        req: AgentRequest,
        ctx: RunContext,
        record: StepRecord,
        why: str,
        timeout_seconds: int,
        approve_on_timeout: bool,
    ) -> None:
        self._put(record.model_copy(update={"state": StepState.WAITING_APPROVAL, "summary": why}))
        self._waiting_for = f"approval of {record.id} ({record.tool}): {why}"
        self._phase = "waiting_approval"
        try:
            await workflow.wait_condition(
                lambda: record.id in self._approvals or self._stop is not None,
                timeout=timedelta(seconds=timeout_seconds),
            )
        except asyncio.CancelledError:
            self._note_workflow_cancel()
        except TimeoutError:
            self._approvals[record.id] = Approval(
                approve=approve_on_timeout,
                step_id=record.id,
                reason=f"no answer within {timeout_seconds} s (policy default: "
                f"{'approve' if approve_on_timeout else 'reject'})",
            )
        self._waiting_for = ""
        self._phase = "executing"
        if self._stop is not None:
            self._put(
                record.model_copy(
                    update={
                        "state": StepState.FAILED,
                        "error": (f"stopped while waiting for approval: {self._stop.reason}"),
                    }
                )
            )
        self._check_cancel()
        decision = self._approvals[record.id]
        await self._gate(
            req,
            ctx,
            record.id,
            record.tool,
            record.args,
            allowed=decision.approve,
            rule="human_approval",
            reason=decision.reason or ("approved" if decision.approve else "rejected"),
            kind="approval",
        )
        if not decision.approve:
            self._put(
                record.model_copy(update={"state": StepState.DENIED, "error": decision.reason or "rejected"})
            )
            raise _Abort(
                "rejected",
                f"{record.tool} rejected by a human: {decision.reason or 'no reason given'}",
                "rejected",
            )

    # ------------------------------------------------------------------ rollback / finish
    async def _rollback(self, req: AgentRequest) -> None:
        """Saga: undo side effects newest first; each undo is idempotent and retried forever.

        Compensations are shielded from cancellation. One that fails permanently (a
        non-retryable error) is flagged and the rest still run: stopping half-way would leave
        more effects in place than one failed undo does.
        """
        self._phase = "compensating"
        while self._compensations:
            step_id, comp, effect = self._compensations.pop()
            key = f"{self._wid}/{step_id}/compensate"
            rec = self._steps[step_id]
            try:
                await self._shielded(
                    workflow.start_activity(
                        "run_tool",
                        ToolCall(
                            tool=comp,
                            args={"effect": effect},
                            idempotency_key=key,
                            tenant=req.tenant,
                            user=req.user,
                            workflow_id=self._wid,
                            step_id=step_id,
                        ),
                        result_type=ToolResult,
                        start_to_close_timeout=COMPENSATION_TIMEOUT,
                        retry_policy=COMPENSATION_RETRY,
                        summary=f"compensate {step_id} with {comp}",
                    )
                )
            except ActivityError as e:
                self._flags.append("compensation_failed")
                self._put(rec.model_copy(update={"error": f"compensation {comp} failed: {_cause(e)}"}))
                await self._settle(
                    req,
                    step_id,
                    comp,
                    "",
                    None,
                    "failed",
                    f"{comp} could not undo {rec.tool}: {_cause(e)}",
                    kind="compensation",
                )
                continue
            self._compensated.append(step_id)
            self._put(rec.model_copy(update={"state": StepState.COMPENSATED}))
            await self._settle(
                req, step_id, comp, "", None, "compensated", f"{comp} undid {rec.tool}", kind="compensation"
            )

    async def _release_open(self, req: AgentRequest) -> None:
        for key in sorted(self._open_reservations):
            await self._release(req, key)
        self._open_reservations.clear()

    async def _finish(
        self, req: AgentRequest, ctx: RunContext, outcome: str, reason: str, answer: str
    ) -> AgentResponse:
        self._phase = "finishing"
        self._outcome = outcome
        out: FinishOutput = await self._shielded(
            workflow.start_activity(
                "finish_run",
                FinishInput(
                    workflow_id=self._wid,
                    request=req,
                    executed=self._records(),
                    outcome=outcome,
                    reason=reason,
                    answer=answer,
                    iterations=self._iterations,
                    model=ctx.tiers.get(TIER_ORDER[0], "offline"),
                ),
                result_type=FinishOutput,
                start_to_close_timeout=MODEL_TIMEOUT,
                heartbeat_timeout=MODEL_HEARTBEAT,
                retry_policy=MODEL_RETRY,
                summary=f"respond ({outcome})",
            )
        )
        spend = self._spend_model()
        workflow.upsert_search_attributes([OUTCOME.value_set(outcome), SPEND.value_set(spend.total_micros)])
        self._phase = "done"
        return AgentResponse(
            workflow_id=self._wid,
            message=out.message,
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            steps=self._records(),
            spend=spend,
            model_label=ctx.model_label,
            compensated=tuple(self._compensated),
            iterations=self._iterations,
            policy_version=ctx.policy_version,
            flags=tuple(dict.fromkeys(self._flags)),
            calls=tuple(self._calls),
        )

    # ------------------------------------------------------------------ control-plane calls
    async def _reserve(
        self,
        req: AgentRequest,
        ctx: RunContext,
        key: str,
        *,
        kind: str,
        subject: str,
        tier: str,
        amount: int,
        min_amount: int,
        max_tokens: int,
    ) -> ReserveResult:
        res: ReserveResult = await self._shielded(
            workflow.start_local_activity(
                "budget_reserve",
                ReserveRequest(
                    key=key,
                    scopes=ctx.scopes,
                    amount_micros=amount,
                    min_micros=min(min_amount, amount),
                    max_tokens=max_tokens,
                    kind=kind,
                    subject=subject,
                    run_id=self._wid,
                    step_id=key.rsplit("/", 1)[1],
                    tier=tier,
                ),
                result_type=ReserveResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"reserve {kind} {subject}",
            )
        )
        if res.decision == Decision.DENY:
            raise _Abort("budget_exhausted", f"budget denied {kind} call: {res.reason}", "budget_denied")
        self._open_reservations[key] = (ctx.scopes, kind)
        return res

    async def _commit(self, key: str, actual: int) -> CommitResult:
        scopes, kind = self._open_reservations.get(key, ((), "model"))
        res: CommitResult = await self._shielded(
            workflow.start_local_activity(
                "budget_commit",
                CommitRequest(key=key, actual_micros=actual, scopes=scopes, kind=kind),
                result_type=CommitResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary="commit",
            )
        )
        self._open_reservations.pop(key, None)
        return res

    async def _release(self, req: AgentRequest, key: str) -> None:
        await self._shielded(
            workflow.start_local_activity(
                "budget_release",
                ReleaseRequest(key=key, reason="run ended before use"),
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary="release",
            )
        )
        self._open_reservations.pop(key, None)

    async def _gate(
        self,
        req: AgentRequest,
        ctx: RunContext,
        step_id: str,
        tool: str,
        args: dict[str, Any],
        *,
        allowed: bool,
        rule: str,
        reason: str,
        kind: str = "permission",
    ) -> StepGateResult:
        """Record a denial or a human's answer in the audit log (allowed steps are recorded
        by the tool activity itself, together with their reservation)."""
        return await self._shielded(
            workflow.start_local_activity(
                "authorize_step",
                StepGateInput(
                    workflow_id=self._wid,
                    tenant=req.tenant,
                    user=req.user,
                    step_id=step_id,
                    tool=tool,
                    args=args,
                    allowed=allowed,
                    rule=rule,
                    reason=reason,
                    kind=kind,
                ),
                result_type=StepGateResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"gate {tool} ({'allow' if allowed else 'deny'})",
            )
        )

    async def _settle(
        self,
        req: AgentRequest,
        step_id: str,
        subject: str,
        reserve_key: str,
        commit: int | None,
        decision: str,
        reason: str,
        kind: str = "tool",
    ) -> None:
        await self._shielded(
            workflow.start_local_activity(
                "settle_step",
                SettleInput(
                    workflow_id=self._wid,
                    tenant=req.tenant,
                    user=req.user,
                    step_id=step_id,
                    subject=subject,
                    reserve_key=reserve_key,
                    commit_micros=commit,
                    kind=kind,
                    decision=decision,
                    reason=reason,
                ),
                result_type=SettleResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"settle {subject} ({decision})",
            )
        )
        if reserve_key:
            self._open_reservations.pop(reserve_key, None)

    # ------------------------------------------------------------------ bookkeeping
    def _check_cancel(self) -> None:
        """A safe point: stop here if a cancel, a deadline or a Temporal cancel arrived."""
        if self._stop is not None:
            raise _Abort(self._stop.outcome, self._stop.reason, self._stop.flag)

    def _request_stop(self, stop: _Abort) -> None:
        """Record why the run must stop (the first reason wins) and cancel the long activity."""
        if self._stop is None:
            self._stop = stop
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()

    def _note_workflow_cancel(self) -> None:
        if self._stop is None:
            self._stop = _Abort("cancelled", "workflow cancelled", "cancelled")

    def _note_cancel(self, e: ActivityError) -> bool:
        """True when ``e`` is a cancellation; one we did not ask for is Temporal's cancel."""
        if not is_cancelled_exception(e):
            return False
        self._note_workflow_cancel()
        return True

    async def _interruptible(self, handle: workflow.ActivityHandle[Any]) -> Any:
        """Await a long activity that a stop request may cancel (see ``_request_stop``)."""
        self._inflight = handle
        try:
            return await handle
        finally:
            self._inflight = None

    async def _shielded(self, handle: workflow.ActivityHandle[Any]) -> Any:
        """Await an activity to its end even if the run is cancelled meanwhile.

        Control-plane calls (ledger, audit), compensations and the final answer must finish:
        cancelling one half-way would leave a reservation or an undo in an unknown state. A
        Temporal cancel that arrives here is remembered and honoured at the next safe point.
        """
        while True:
            try:
                return await asyncio.shield(handle)
            except asyncio.CancelledError:
                if handle.cancelled():
                    raise
                self._note_workflow_cancel()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()

    def _policy(self, ctx: RunContext) -> Policy:
        """The run's policy snapshot, validated once per run (not once per step)."""
        if self._policy_model is None:
            self._policy_model = Policy.model_validate(ctx.policy)
        return self._policy_model

    def _gate_context(self) -> dict[str, Any]:
        ctx: dict[str, Any] = {}
        for data in self._results.values():
            if "customer_email" in data:  # customers of orders looked up in this run
                ctx.setdefault("order_customer", []).append(data["customer_email"])
            if "order_id" in data:
                ctx.setdefault("order_ids", []).append(data["order_id"])
        return ctx

    def _put(self, record: StepRecord) -> None:
        if record.id not in self._steps:
            self._order.append(record.id)
        self._steps[record.id] = record

    def _records(self) -> tuple[StepRecord, ...]:
        return tuple(self._steps[s] for s in self._order)

    def _evaluated(self) -> tuple[StepRecord, ...]:
        """What the evaluator judges: a failure its fallback made good is not held against the
        run (else a degraded-but-answered step would escalate the model for a tool outage)."""
        return tuple(r for r in self._records() if r.id not in self._recovered)

    def _charge(
        self,
        micros: int,
        *,
        tier: str = "",
        model: str = "",
        tool: str = "",
        step: str = "",
        cheapest: bool = False,
    ) -> None:
        s = self._spend
        s["total"] += micros
        for bucket, name in (("by_tier", tier), ("by_model", model), ("by_tool", tool), ("by_step", step)):
            if name:
                s[bucket][name] = s[bucket].get(name, 0) + micros
        if model:
            s["model_calls"] += 1
            s["cheapest"] += 1 if cheapest else 0

    def _spend_model(self) -> Spend:
        s = self._spend
        return Spend(
            total_micros=s["total"],
            by_tier=dict(s["by_tier"]),
            by_model=dict(s["by_model"]),
            by_tool=dict(s["by_tool"]),
            by_step=dict(s["by_step"]),
            model_calls=s["model_calls"],
            cheapest_tier_calls=s["cheapest"],
        )


def _estimate(ctx: RunContext, model: str, input_tokens: int, max_tokens: int) -> int:
    """Worst-case micro-USD of a call, from the run's price snapshot (rounded up)."""
    p_in, p_out = ctx.token_prices.get(model, (0, 0))
    return -(-(input_tokens * p_in + max_tokens * p_out) // 1_000_000)


def _affordable_output(ctx: RunContext, model: str, input_tokens: int, granted: int) -> int:
    """Output tokens ``granted`` micro-USD still pays for after the prompt (rounded down)."""
    p_in, p_out = ctx.token_prices.get(model, (0, 0))
    if p_out <= 0:
        return PLAN_TOKENS
    return max(0, (granted * 1_000_000 - input_tokens * p_in) // p_out)


def _cause(e: BaseException) -> str:
    """The innermost message of an activity failure, one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    msg = e.message if isinstance(e, ApplicationError) else str(e)
    return (msg or type(e).__name__).splitlines()[0][:300]


def _when_text(when: dict[str, Any] | None) -> str:
    if not when:
        return ""
    op = "==" if "equals" in when else "!="
    return f"{when.get('step')}.{when.get('field')} {op} {when.get('equals', when.get('not_equals'))}"


def _tool_queue(tool: ToolInfo) -> str | None:
    """Rate-limited tools run on their own task queue, whose rate limit Temporal enforces."""
    return f"{workflow.info().task_queue}-tool-{tool.name}" if tool.rate_limit_per_second else None
