"""Model calls of the loop: the plan of each iteration and its evaluation.

Each call is priced from the run's snapshot before it is sent, held in the ledger, and
committed with what the activity reports it cost.
"""

from __future__ import annotations

import json

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keel.agent_io import EvalInput, EvalOutput, PlanInput, PlanOutput, RunContext
    from keel.models import AgentRequest, ModelCallRecord
    from keel.tiers import TIER_ORDER, clamp_tier

from workflows.holds import Holds
from workflows.options import MODEL_HEARTBEAT, MODEL_RETRY, MODEL_TIMEOUT
from workflows.state import RunState
from workflows.stop import Abort, Stopper, cause

__all__ = ["JUDGE_TOKENS", "MAX_EXECUTED_IN_PROMPT", "PLAN_TOKENS", "Planner"]

PLAN_TOKENS = 1024  # output cap of a plan call; reservations price it in full
JUDGE_TOKENS = 256
MIN_OUTPUT_TOKENS = 128  # a grant smaller than the prompt plus this much output is useless
PROMPT_OVERHEAD_TOKENS = 700  # system prompt and message framing, generously rounded up
MAX_EXECUTED_IN_PROMPT = 20  # must match activities.agent: prompts show the latest 20 steps


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
