"""Typed payloads exchanged between the starter, the workflow and the activities.

Every workflow, activity, query and update takes exactly one of these models and returns
one, so that the contract can grow by adding defaulted fields without breaking histories
that are already recorded (replay decodes old payloads into the new models).

Money is carried as integer micro-USD (``*_micros``) everywhere; floats only appear at the
edges (CLI flags, printed output).
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.redact import find
from keel.text import problem as text_problem

__all__ = [
    "first_error",
    "MAX_DEADLINE_SECONDS",
    "MAX_ITERATIONS",
    "MAX_RUN_BUDGET_USD",
    "MICROS_PER_USD",
    "usd_to_micros",
    "micros_to_usd",
    "Frozen",
    "ModelPolicy",
    "AgentRequest",
    "PLAN_REQUIRED",
    "STEP_REQUIRED",
    "ReusedEffect",
    "PlanStep",
    "Plan",
    "StepState",
    "StepRecord",
    "Spend",
    "AgentResponse",
    "RunStatus",
    "ChatMessage",
    "Usage",
    "ModelCall",
    "ModelResult",
    "ToolCall",
    "ToolResult",
    "Decision",
    "BudgetCaps",
    "Approval",
    "ToolInfo",
    "ModelCallRecord",
    "StepGate",
    "FACTS_BEFORE_DECLARATIONS",
]

MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: float) -> int:
    """Convert dollars to integer micro-dollars, rounding half up (ledger never sees floats)."""
    return round(usd * MICROS_PER_USD)


def micros_to_usd(micros: int) -> float:
    """Convert micro-dollars back to dollars for display only."""
    return micros / MICROS_PER_USD


def first_error(e: ValidationError, whole: str) -> str:
    """The first problem of a validation error as one line, ``field.path: message`` (``whole``
    names the value when the problem is with all of it): what a model's repair turn and a
    tool's caller are told."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or whole
    return f"{where}: {err.get('msg', 'invalid')}"


class Frozen(BaseModel):
    """Base for all payloads: immutable, and tolerant of fields added by newer versions."""

    model_config = ConfigDict(frozen=True, extra="ignore")


MAX_RUN_BUDGET_USD = 10_000.0
"""Largest budget one run may carry; larger numbers are typos, not plans."""
MAX_DEADLINE_SECONDS = 7 * 24 * 3600
"""Longest wall-clock deadline of one run (a week: human approvals included)."""
MAX_ITERATIONS = 20
"""Most plan/act iterations one run may ask for."""
_TIERS = ("fast", "balanced", "powerful")


class ModelPolicy(Frozen):
    """Which models a run may use; the cascade starts at ``min_tier`` and may climb to ``max_tier``."""

    min_tier: str = "fast"
    """Cheapest tier the cascade may start from."""
    max_tier: str = "powerful"
    """Highest tier escalation may reach; caps from the budget can lower it further."""
    max_escalations: int = Field(default=2, ge=0, le=5)
    """Bound on escalations per role, so a stubborn low score cannot climb forever."""

    @field_validator("min_tier", "max_tier")
    @classmethod
    def _tier(cls, v: str) -> str:
        if v not in _TIERS:
            raise ValueError(f"unknown tier {v!r} (fast, balanced, powerful)")
        return v


def _not_secret(v: str) -> str:
    """Identifiers end up in the workflow id and search attributes, which Temporal keeps in
    plaintext (they are indexed, never encrypted): one that looks like a secret is refused."""
    kinds = find(v)
    if kinds:
        raise ValueError(f"looks like a secret or personal data ({kinds[0]}); use an opaque id")
    return v


class ReusedEffect(Frozen):
    """One effect of an earlier run that a retry may return instead of repeating."""

    step_id: str
    tool: str
    args: dict[str, Any] = {}
    key: str
    """The idempotency key the effect is recorded under (``<old workflow id>/<step>``)."""


class AgentRequest(Frozen):
    """What a caller asks for. Secrets never travel here: payloads are visible in the UI."""

    tenant: str
    user: str
    message: str
    request_id: str = ""
    """Caller-chosen id; the workflow id is ``agent/<tenant>/<agent>/<request_id>``
    (``keel.agents.workflow_id``)."""
    agent: str = "support"
    """Name of the agent definition to run (``keel.agents``); the worker refuses unknown ones."""
    session: str = "default"
    workspace: str = "default"
    permissions: tuple[str, ...] = ()
    """Permissions the caller holds (e.g. ``orders:read``); tools needing others are hidden."""
    max_budget_usd: float = 1.0
    """Hard limit for this run's scope in the ledger."""
    model_policy: ModelPolicy = ModelPolicy()
    max_iterations: int | None = None
    """Override of the policy's plan/replan iteration cap."""
    deadline_seconds: int | None = None
    """Override of the policy's wall-clock deadline for the whole run."""
    reuse_effects: tuple[ReusedEffect, ...] = ()
    """``keel retry``: effects an earlier run recorded; a step with the same id, tool and
    arguments is answered from that record (its key) instead of acting again."""

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str) -> str:
        v = v.strip()
        if not v or len(v) > 40 or not all(c.islower() or c.isdigit() or c in "-_" for c in v):
            raise ValueError("must be 1-40 lower-case letters, digits, '-' or '_'")
        return v

    @field_validator("tenant", "user", "session", "workspace")
    @classmethod
    def _ident(cls, v: str) -> str:
        v = v.strip()
        if not v or len(v) > 64 or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("must be 1-64 characters of letters, digits, '-', '_' or '.'")
        return _not_secret(v)

    @field_validator("message")
    @classmethod
    def _message(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("message must not be empty")
        if len(v) > 8000:
            raise ValueError("message is longer than 8000 characters")
        if why := text_problem(v):
            raise ValueError(f"message {why}")
        return v

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, v: str) -> str:
        if v and (len(v) > 128 or not all(c.isascii() and (c.isalnum() or c in "-_.:") for c in v)):
            raise ValueError("request id must be 1-128 characters of letters, digits, '-', '_', '.' or ':'")
        return _not_secret(v)

    @field_validator("permissions")
    @classmethod
    def _permissions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p or len(p) > 64 or not all(c.isascii() and (c.isalnum() or c in ":_.*-") for c in p):
                raise ValueError(f"permission {p[:40]!r} must be 1-64 characters of letters, digits, ':_.*-'")
        return v

    @field_validator("max_budget_usd")
    @classmethod
    def _budget(cls, v: float) -> float:
        if not math.isfinite(v) or not v > 0:
            raise ValueError("budget must be a positive, finite number of USD")
        if v > MAX_RUN_BUDGET_USD:
            raise ValueError(f"budget must be at most {MAX_RUN_BUDGET_USD:,.2f} USD")
        if usd_to_micros(v) < 1:
            raise ValueError("budget must be at least $0.000001 (one micro-USD)")
        return v

    @field_validator("max_iterations")
    @classmethod
    def _iterations(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_ITERATIONS:
            raise ValueError(f"max iterations must be between 1 and {MAX_ITERATIONS}")
        return v

    @field_validator("deadline_seconds")
    @classmethod
    def _deadline(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_DEADLINE_SECONDS:
            raise ValueError(f"deadline must be between 1 and {MAX_DEADLINE_SECONDS} seconds (7 days)")
        return v


PLAN_REQUIRED: tuple[str, ...] = ("steps", "answer")
"""Keys a model's plan must carry (``replan`` may be left out: it defaults to false)."""
STEP_REQUIRED: tuple[str, ...] = ("id", "tool", "args")
"""Keys each step of a model's plan must carry."""


class PlanStep(Frozen):
    """One tool call the planner proposes.

    ``args`` values may reference earlier results as ``"${s1.field}"``; ``when`` makes the
    step conditional on an earlier result (``{"step": "s1", "field": "status", "equals":
    "shipped"}``). Both are resolved deterministically in the workflow.

    Unknown keys are refused (``extra="forbid"``): a step that says more than the schema is
    a model that did not follow it. Scalars are coerced as pydantic's lax mode does, plus
    numbers to strings, so ``"id": 1`` is the step ``"1"`` rather than a wasted repair.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    id: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    when: dict[str, Any] | None = None
    why: str = ""


class Plan(Frozen):
    """A validated plan. An empty ``steps`` list means the model answers directly.

    Code may build a ``Plan`` with defaults (scripted planners, tests); a model's output is
    held to more with :meth:`from_model_output`: the required keys present, no unknown key
    (so ``{"plan": ...}`` wrappers, copies of the JSON schema and ``{}`` are refused), and a
    plan with no steps must carry its answer — "nothing to do" has to say so.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[PlanStep, ...] = ()
    answer: str = ""
    """Direct answer / final message template when no (more) tools are needed."""
    replan: bool = False
    """Ask to see these steps' results and plan again (e.g. "watch until it ships")."""

    @classmethod
    def from_model_output(cls, data: Any) -> Plan:
        """Validate what a model returned as a plan.

        Raises:
            ValueError: one line naming the first thing wrong (sent back in the repair turn).
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in PLAN_REQUIRED if k not in data]
        if missing:
            extra = sorted(set(data) - set(cls.model_fields))
            hint = f" (it has {', '.join(map(repr, extra))} instead)" if extra else ""
            raise ValueError(f"missing required field(s) {', '.join(missing)}{hint}")
        steps = data.get("steps")
        for i, step in enumerate(steps if isinstance(steps, list) else ()):
            gone = [k for k in STEP_REQUIRED if isinstance(step, dict) and k not in step]
            if gone:
                raise ValueError(f"steps.{i}: missing required field(s) {', '.join(gone)}")
        try:
            plan = cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(first_error(e, "plan")) from None
        if not plan.steps and not plan.answer.strip():
            raise ValueError("a plan with no steps must put the reply in a non-empty 'answer'")
        return plan

    @classmethod
    def model_output_schema(cls) -> dict[str, Any]:
        """The JSON schema a planner is asked to follow: this model's, with the required keys."""
        schema = cls.model_json_schema()
        schema["required"] = list(PLAN_REQUIRED)
        step = schema.get("$defs", {}).get("PlanStep")
        if isinstance(step, dict):
            step["required"] = list(STEP_REQUIRED)
        return schema


class StepState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    DENIED = "denied"
    COMPENSATED = "compensated"


class StepRecord(Frozen):
    """What happened to one plan step; the status query and response carry these."""

    id: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    state: StepState = StepState.PENDING
    summary: str = ""
    """Short, redacted result summary (the full result lives in PostgreSQL)."""
    result: dict[str, Any] | None = None
    cost_micros: int = 0
    error: str = ""
    score: float | None = None
    attempts: int = 0


class Spend(Frozen):
    """Spend so far, broken down three ways for the status query and response."""

    total_micros: int = 0
    reserved_micros: int = 0
    by_tier: dict[str, int] = Field(default_factory=dict)
    by_model: dict[str, int] = Field(default_factory=dict)
    by_tool: dict[str, int] = Field(default_factory=dict)
    by_step: dict[str, int] = Field(default_factory=dict)
    model_calls: int = 0
    cheapest_tier_calls: int = 0


class ModelCallRecord(Frozen):
    """One model call of a run, for cost attribution and the cascade hit rate."""

    role: str
    tier: str = ""
    model: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    latency_ms: float = 0.0
    escalated: bool = False
    """Served above the run's starting tier (the cascade climbed)."""
    key: str = ""
    """The call's own ledger hold (``<workflow_id>/<role><iteration>/call<n>``)."""
    fallback_from: str = ""
    """The model the call was meant for when its provider's breaker sent it elsewhere."""
    outcome: str = "ok"
    """``ok``, or the error type that ended the call (its cost is still charged)."""


RunOutcome = Literal[
    "completed",
    "partial",
    "denied",
    "budget_exhausted",
    "escape_hatch",
    "failed",
    "cancelled",
    "rejected",
    "needs_human",
]


class AgentResponse(Frozen):
    """The result of a run: the answer, what was done, what it cost, and why it stopped."""

    workflow_id: str
    message: str
    outcome: RunOutcome = "completed"
    reason: str = ""
    steps: tuple[StepRecord, ...] = ()
    spend: Spend = Spend()
    model_label: str = ""
    """Models that served the run, e.g. ``offline (deterministic, no API key)``."""
    compensated: tuple[str, ...] = ()
    """Step ids rolled back by saga compensation, in the order they were undone."""
    iterations: int = 0
    policy_version: str = ""
    flags: tuple[str, ...] = ()
    calls: tuple[ModelCallRecord, ...] = ()
    """Every model call: tier, model, tokens, cost, latency, escalated or not."""


class RunStatus(Frozen):
    """Live view for the ``status`` query; cheap to compute, no I/O."""

    workflow_id: str
    phase: str
    steps: tuple[StepRecord, ...] = ()
    spend: Spend = Spend()
    waiting_for: str = ""
    iterations: int = 0
    model_label: str = ""
    outcome: str = ""
    details: str = ""
    """What the Web UI's Current Details say (for a wait: what, which rule, how to answer)."""
    waiting_since: datetime | None = None
    """When the run started waiting for a person (``keel approvals`` shows the age)."""
    waiting_step: str = ""


class ChatMessage(Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


class Usage(Frozen):
    input_tokens: int = 0
    cached_input_tokens: int = 0
    """Subset of ``input_tokens`` served from the provider's prompt cache."""
    cache_write_tokens: int = 0
    output_tokens: int = 0


class ModelCall(Frozen):
    """One model invocation. ``model`` is ``provider:name`` (``offline``, ``openai:gpt-4o-mini``)."""

    model: str
    role: Literal["plan", "evaluate", "summarise", "classify", "respond"] = "plan"
    system: str = ""
    messages: tuple[ChatMessage, ...] = ()
    output_schema: dict[str, Any] | None = None
    """JSON schema the answer must satisfy (structured output); ``None`` for free text."""
    schema_name: str = "output"
    max_tokens: int = 1024
    tools_doc: tuple[dict[str, Any], ...] = ()
    """Tool descriptions (name, description, argument schema) offered to a planner."""


class ModelResult(Frozen):
    text: str = ""
    parsed: dict[str, Any] | None = None
    usage: Usage = Usage()
    model: str = ""
    provider: str = ""
    latency_ms: float = 0.0
    truncated: bool = False
    """The reply stopped at the output cap (``finish_reason == "length"`` / ``max_tokens``)."""
    parse_error: str = ""
    """Why structured output could not be read (``parsed`` is then ``None``); the caller
    decides whether to repair."""
    usage_known: bool = True
    """The provider reported usage; ``False`` means the ledger charges the call's full hold."""


class EffectLimit(Frozen):
    """A cumulative limit the tool itself enforces where the money moves (issue 17): the
    policy's ``CumulativeLimit`` as the step's gate carries it to the tool activity."""

    name: str
    arg: str
    per: Literal["order", "run", "tenant_day"]
    key: str | None = None
    max: float | None = None
    approval_over: float | None = None


class StepGate(Frozen):
    """The workflow's allow decision for a step, and the budget to hold for it."""

    rule: str = ""
    reason: str = ""
    scopes: tuple[str, ...] = ()
    amount_micros: int = 0
    hold_ttl_seconds: int = 300
    """Lease of the step's hold; a hold placed when the plan was admitted lives as long as
    the run may (see ``keel.budget.tool_hold``)."""
    provenance: str = ""
    """``trusted`` or ``untrusted: why`` (issue 17); recorded in the allow row."""
    approved_by: str = ""
    """Who approved the step, when a human did."""
    approved_rule: str = ""
    approved_total: float | None = None
    """When a human approved the step on a cumulative rule: that rule and the total the
    approver was shown. The tool refuses if concurrent runs have since taken the sum above
    it (the human approved $250 in total, not whatever the total has become)."""
    limits: tuple[EffectLimit, ...] = ()
    """The policy's cumulative limits on this tool. The gate checked them against the sums
    it could see at run start; the tool re-checks them under a lock inside its effect's
    transaction, so concurrent runs cannot together pass what each passed alone."""


class ToolCall(Frozen):
    """Input of the tool activity. ``idempotency_key`` is ``workflow_id/step_id``, never the attempt."""

    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str
    tenant: str
    user: str = ""
    workflow_id: str = ""
    step_id: str = ""
    reservation_key: str = ""
    """Ledger reservation to commit in the same transaction as the tool's effect."""
    gate: StepGate | None = None
    """When set, the activity audits the (already made) permission decision and reserves
    the step's budget itself before the effect: one round trip per controlled step."""


class ToolResult(Frozen):
    ok: bool = True
    data: dict[str, Any] = Field(default_factory=dict)
    summary: str = ""
    error: str = ""
    cost_micros: int = 0
    replayed: bool = False
    """True when the effect had already happened under this key and was not repeated."""
    refused: Literal["", "budget", "optional"] = ""
    """Not run: the ledger denied the step's budget, or caps switched an optional step off."""


class Decision(str, Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class BudgetCaps(Frozen):
    """Caps computed from remaining headroom; the workflow applies them to the next call."""

    max_tier: str | None = None
    max_tokens: int | None = None
    disable_optional: bool = False
    disabled_tools: tuple[str, ...] = ()


class Approval(Frozen):
    """Update payload for ``approve`` / ``reject`` of a step waiting for a human."""

    approve: bool = True
    step_id: str = ""
    reason: str = ""
    by: str = ""


FACTS_BEFORE_DECLARATIONS: dict[str, str] = {"customer_email": "order_customer", "order_id": "order_ids"}
"""The facts every result yielded before tools declared theirs (``ToolInfo.facts`` is None in
such snapshots); kept so those recorded runs replay to the same gate decisions."""


class ToolInfo(Frozen):
    """A tool's declaration as the workflow and planner see it (no code, only metadata).

    The workflow receives a snapshot of these at the start of a run, so a redeploy that
    changes the registry cannot change the decisions of a run already under way.
    """

    name: str
    description: str
    args_schema: dict[str, Any] = Field(default_factory=dict)
    permissions: tuple[str, ...] = ()
    """All of these must be held by the caller, or the tool is hidden from the planner."""
    idempotent: bool = True
    """Naturally idempotent (a read); non-idempotent tools are recorded by key before/after."""
    compensation: str | None = None
    """Tool that undoes this one (saga rollback), called with ``{"effect": <result data>}``."""
    fallback: str | None = None
    """Tool to use when this one is unavailable (breaker open, permanent failure)."""
    timeout_seconds: float = 30.0
    max_attempts: int = 3
    non_retryable_errors: tuple[str, ...] = ()
    cost_micros: int = 0
    """Estimated cost of one call, reserved in the ledger before it runs."""
    risk: Literal["low", "medium", "high"] = "low"
    optional: bool = False
    """May be skipped when the budget decision disables optional steps."""
    rate_limit_per_second: float | None = None
    """Global cap across all workers (dedicated task queue with a Temporal rate limit)."""
    side_effects: bool = False
    """Writes something outside the run (refund, e-mail): eligible for compensation/approval."""
    tags: tuple[str, ...] = ()
    """Free labels an agent definition selects tools by (``tag:orders``)."""
    local: bool = False
    """Quick and in-process (its work is the database transaction Keel hands it, a few ms):
    the step runs as a local activity in the workflow task that decided it, with every record
    the activity path writes. Never for sandboxed, MCP or rate-limited tools (see README)."""
    queue: str | None = None
    """Task-queue suffix shared by several tools under one rate limit (an MCP server's
    ``mcp-<server>``); ``None``: a rate-limited tool gets its own ``tool-<name>`` queue."""
    facts: dict[str, str] | None = None
    """Result field -> gate-context fact (``customer_email`` -> ``order_customer``): what a
    successful call establishes for the policy's ``one_of_ref`` checks of later steps.
    ``None`` only in snapshots recorded before tools declared facts (see keel.gate)."""
