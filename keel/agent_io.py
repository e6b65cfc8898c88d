"""Inputs and outputs of the agent's own activities (prepare, plan, evaluate, finish, gate).

Kept apart from ``keel.models`` (the public request/response) because these describe the
internal steps of a run; they travel through history, so they stay small: references and
summaries, never whole documents.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import Field

from keel.models import (
    AgentRequest,
    Decision,
    Frozen,
    ModelCallRecord,
    Plan,
    StepRecord,
    ToolInfo,
    ToolResult,
    Usage,
)

__all__ = [
    "JUDGE_TOKENS",
    "MAX_EXECUTED_IN_PROMPT",
    "PLAN_TOKENS",
    "MODEL_ATTEMPTS",
    "RunLimits",
    "PrepareInput",
    "RunContext",
    "BeginInput",
    "BeginOutput",
    "first_plan_input",
    "tool_record",
    "PlanInput",
    "PlanOutput",
    "EvalInput",
    "EvalOutput",
    "FinishInput",
    "FinishOutput",
    "StepGateInput",
    "StepGateResult",
    "SettleInput",
    "SettleResult",
    "ModelCallsInput",
    "ModelCallsOutput",
]

PLAN_TOKENS = 1024
"""Output cap of a plan call; the reservation prices this worst case."""
JUDGE_TOKENS = 256
"""Output cap of a judge's verdict (a score, a confidence, one reason)."""
MAX_EXECUTED_IN_PROMPT = 20
"""A prompt shows at most the latest 20 executed steps: prompts (and reservations) stay
bounded however long a run loops. The workflow sends no more than these to ``plan`` and
prices its holds for them; the activity renders no more than these."""


MODEL_ATTEMPTS = 5
"""Temporal attempts of a model step (plan, judge, answer). A provider's breaker opens after
fewer consecutive outages (``KEEL_MODEL_BREAKER_THRESHOLD``, default 3), so the attempts left
fail over to the other provider inside the run that met the outage."""


class RunLimits(Frozen):
    """Escape-hatch limits for one run, resolved from policy defaults and request overrides."""

    max_iterations: int = 3
    max_tool_calls: int = 12
    deadline_seconds: int = 300
    thrash_repeats: int = 3
    max_consecutive_failures: int = 3
    min_confidence: float = 0.5
    escalate_below: float = 0.75
    approval_timeout_seconds: int = 3600
    max_model_calls: int = 40
    """Model calls a run may send in all (plans, repairs, retries, judge, answer): each model
    step is told how many are left, and its activity refuses the call past it."""


class PrepareInput(Frozen):
    request: AgentRequest
    workflow_id: str
    chain_id: str = ""
    """The run's first execution run id: shared by a reset, retry or continue-as-new of this
    run, new for a fresh start that reuses the workflow id (which ``prepare_run`` refuses)."""


class RunContext(Frozen):
    """Everything a run decides with, captured once at its start (a snapshot in history)."""

    authorized: bool
    reason: str = ""
    rule: str = ""
    input_ok: bool = True
    input_reason: str = ""
    policy_version: str = ""
    policy: dict[str, Any] = Field(default_factory=dict)
    """The policy snapshot (``keel.policy.Policy`` as JSON) the gate evaluates against."""
    permissions: tuple[str, ...] = ()
    """Effective permissions: the request's, bounded by what the policy grants."""
    tools: tuple[ToolInfo, ...] = ()
    """Tools the caller may use (what the planner sees)."""
    all_tools: tuple[ToolInfo, ...] = ()
    """Every declared tool incl. compensations (for re-checks and rollback), as records
    (``tool_record``: no description or argument schema, which only the planner's prompt
    reads, from ``tools``). Snapshots recorded before carry whole declarations; the workflow
    reads neither field of these, so they decide alike."""
    tiers: dict[str, str] = Field(default_factory=dict)
    model_label: str = ""
    memory: str = ""
    """Short summary of earlier turns in this session (the full text stays in PostgreSQL)."""
    prior_totals: dict[str, float] = Field(default_factory=dict)
    """Sums cumulative limits add to, read from the database at run start (``Flow.prior``)."""
    scopes: tuple[str, ...] = ()
    limits: RunLimits = RunLimits()
    judge: bool = False
    """Ask a model to judge plans and results in addition to the rules (set when the worker
    holds a provider key; the offline path judges by rules only, at no cost)."""
    token_prices: dict[str, tuple[int, int]] = Field(default_factory=dict)
    """Per model: worst-case micro-USD per million input and output tokens, priced when the
    run started, so the workflow prices reservations without reading files or the env."""
    agent: str = ""
    """The agent definition this run follows (``""`` in runs recorded before definitions)."""
    instructions: str = ""
    """The agent's instructions: the first part of the planner's system prompt."""
    notes: tuple[str, ...] = ()
    """What the run must report without stopping (``mcp_unavailable:<server>``): they become
    response flags."""


def tool_record(tool: ToolInfo) -> ToolInfo:
    """``tool`` as the workflow decides with it: all but its description and argument schema.

    Those two are the planner's prompt (``RunContext.tools`` keeps them for the tools it may
    see) and more than half of a declaration's bytes; every byte of the snapshot is encoded,
    encrypted, stored and decoded in the workflow's sandbox on every run. Everything the
    gate, the step runner and the saga read (permissions, side effects, timeouts, retries,
    queue, cost, fallback, compensation, facts) stays, so the decisions stay recorded."""
    return tool.model_copy(update={"description": "", "args_schema": {}})


class PlanInput(Frozen):
    workflow_id: str
    message: str
    memory: str = ""
    """Session memory (untrusted); shown to plans after the first only."""
    tools: tuple[ToolInfo, ...] = ()
    executed: tuple[StepRecord, ...] = ()
    model: str
    tier: str = "fast"
    max_tokens: int = 1024
    iteration: int = 1
    budget_micros: int | None = None
    """Legacy: what the workflow's own hold granted (runs recorded before holds moved into
    the activity). Ignored when ``scopes`` is set."""
    scopes: tuple[str, ...] = ()
    """The run's budget scopes: the activity holds budget for each model call itself."""
    start_tier: str = ""
    """The run's starting tier (calls above it are recorded as escalated)."""
    tiers: dict[str, str] = Field(default_factory=dict)
    """The run's tier → model map, for a hold the ledger caps to a cheaper tier."""
    max_calls: int | None = None
    """Model calls the run has left (``RunLimits.max_model_calls`` minus those sent)."""
    instructions: str = ""
    """The agent's instructions (``RunContext.instructions``); empty: a generic planner."""
    deadline_at: datetime | None = None
    """When the run's deadline passes (the first plan only, made inside ``begin_run`` before
    the workflow's deadline timer exists): the plan stops there, ``RunDeadline``."""


class PlanOutput(Frozen):
    plan: Plan
    usage: Usage = Usage()
    cost_micros: int = 0
    """Every call of this step, earlier attempts included: what the ledger committed."""
    model: str = ""
    latency_ms: float = 0.0
    repaired: bool = False
    calls: tuple[ModelCallRecord, ...] = ()
    """One record per model call the step made (each under its own ledger hold)."""


class BeginInput(Frozen):
    """``begin_run``: prepare the run, then (authorized, input passed) make its first plan.

    Carries what the workflow knows before the snapshot exists; the first plan's input is
    built inside the activity from the snapshot it just took (``first_plan_input``), so the
    tool catalogue and the run's context travel through history once (in the output), not
    twice."""

    prepare: PrepareInput
    tier: str = "fast"
    """The run's starting tier (the request's ``min_tier`` clamped to its ``max_tier``)."""
    started_at: datetime | None = None
    """When the run started (workflow time): with the snapshot's deadline, when the first plan
    must stop. ``None`` (inputs recorded before it existed): the plan is unbounded."""


class BeginOutput(Frozen):
    context: RunContext
    plan: PlanOutput | None = None
    """The first plan; ``None`` when the run was refused or its input blocked (no model
    call was made, nothing was held or spent)."""
    remote: bool = False
    """``begin_local`` only: the run may call a model over the network (or one a test or a
    deployment serves in the offline model's place), so nothing was done here and the run
    begins with the ``begin_run`` activity (``context`` is empty)."""


def first_plan_input(inp: BeginInput, ctx: RunContext) -> PlanInput:
    """The first plan's input, exactly as ``Planner.plan`` builds it for iteration 1 (nothing
    executed yet, no model call booked: the run's whole call allowance is left)."""
    return PlanInput(
        workflow_id=inp.prepare.workflow_id,
        message=inp.prepare.request.message,
        memory=ctx.memory,
        tools=ctx.tools,
        model=ctx.tiers.get(inp.tier, "offline"),
        executed=(),
        tier=inp.tier,
        max_tokens=PLAN_TOKENS,
        iteration=1,
        scopes=ctx.scopes,
        start_tier=inp.tier,
        tiers=ctx.tiers,
        max_calls=max(0, ctx.limits.max_model_calls),
        instructions=ctx.instructions,
        deadline_at=(
            inp.started_at + timedelta(seconds=ctx.limits.deadline_seconds) if inp.started_at else None
        ),
    )


class EvalInput(Frozen):
    workflow_id: str
    message: str
    executed: tuple[StepRecord, ...] = ()
    model: str | None = None
    """Judge model; ``None`` evaluates by rules only (no model call, no cost)."""
    max_tokens: int = 256
    iteration: int = 0
    scopes: tuple[str, ...] = ()
    """The run's budget scopes (the judge's call is held and committed by the activity)."""
    plan: Plan | None = None
    """Judge this plan before it runs (the cascade's check), instead of executed results."""
    history: tuple[StepRecord, ...] = ()
    """Steps of earlier iterations: not scored, but they count for the intent rule (an
    order looked up before an escalation has been touched)."""
    tier: str = ""
    start_tier: str = ""
    side_effect_tools: tuple[str, ...] = ()
    """Tools of the run's catalogue that write outside it (checked before they run)."""
    max_calls: int | None = None
    """Model calls the run has left."""


class EvalOutput(Frozen):
    score: float
    confidence: float
    reason: str = ""
    cost_micros: int = 0
    model: str = ""
    calls: tuple[ModelCallRecord, ...] = ()


class FinishInput(Frozen):
    workflow_id: str
    request: AgentRequest
    executed: tuple[StepRecord, ...] = ()
    outcome: str = "completed"
    reason: str = ""
    answer: str = ""
    model: str = "offline"
    iterations: int = 0
    spend_micros: int = 0
    """What the run spent (the workflow's account), for the cost-spike flag."""
    plan_sizes: tuple[int, ...] = ()
    """Steps of each plan, in order (the fan-out flag)."""
    flags: tuple[str, ...] = ()
    """Flags the run already raised (escape hatches), so anomaly flags do not repeat them."""
    thrash_repeats: int = 3
    scopes: tuple[str, ...] = ()
    """The run's budget scopes; set, a live model writes the answer under its own hold."""
    start_tier: str = ""
    max_calls: int | None = None
    """Model calls the run has left."""


class FinishOutput(Frozen):
    message: str
    cost_micros: int = 0
    model: str = ""
    flags: tuple[str, ...] = ()
    """Anomaly flags of the run (``keel.anomaly``), recorded in ``run_stats`` and audited."""
    calls: tuple[ModelCallRecord, ...] = ()
    flag: str = ""
    """Why the model-written answer was not returned (it claimed an effect no step
    produced): the run is then handed to a human, never reported completed."""


class StepGateInput(Frozen):
    """Record a gate decision that does not lead to a tool call: a denial, or a human's
    answer to an approval request (allowed steps are recorded by the tool activity)."""

    workflow_id: str
    tenant: str
    user: str
    step_id: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    allowed: bool
    rule: str = ""
    reason: str = ""
    kind: str = "permission"
    decision: str = ""
    """Overrides allow/deny for approval rows: ``requested``, ``approve``, ``reject``,
    ``timed_out``, ``abandoned``."""
    detail: dict[str, Any] = Field(default_factory=dict)
    """Extra audit data: approver (``by``), amount, the rule asked about, provenance."""
    key_suffix: str = ""
    """Distinguishes several rows of one kind for one step (``-requested``, ``-abandoned``)."""


class StepGateResult(Frozen):
    """What the audit of a gate decision returns. Recorded histories (before step holds moved
    to the tool activity) also carry ``granted_micros`` and ``caps``: extra fields are ignored
    on decoding, so they still replay."""

    decision: Decision
    reason: str = ""
    observed: bool = False


class SettleInput(Frozen):
    """Release (or commit) a reservation and audit the step's outcome."""

    workflow_id: str
    tenant: str
    user: str
    step_id: str
    subject: str
    reserve_key: str = ""
    commit_micros: int | None = None
    """``None`` releases the reservation; a number commits that actual cost."""
    kind: str = "tool"
    decision: str = ""
    reason: str = ""
    effect_key: str = ""
    """Set when the workflow is about to declare a side-effect step failed: the durable record
    under this key decides (see ``activities/tools/effects.py``)."""


class SettleResult(Frozen):
    ok: bool = True
    recorded: ToolResult | None = None
    """The effect recorded under ``effect_key``: the step succeeded after all."""


class ModelCallsInput(Frozen):
    """Settle the model calls of a step whose activity died without reporting them."""

    prefix: str
    """``<workflow_id>/<role><iteration>``, as the activity's holds were keyed."""


class ModelCallsOutput(Frozen):
    cost_micros: int = 0
    calls: tuple[ModelCallRecord, ...] = ()
