"""The run's in-memory record: steps, results, spend, flags and model calls.

Everything here is rebuilt by replay from the activities' results, so it needs no
persistence of its own; the ``status`` query reads it, and the final response is made from
it. Spend counts only what the ledger committed, so the report equals the ledger.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel import decisions as d
    from keel.agent_io import RunContext
    from keel.labels import ExecutedCall, Flow, Label, label_args, step_provenance
    from keel.models import (
        FACTS_BEFORE_DECLARATIONS,
        AgentRequest,
        Approval,
        ModelCallRecord,
        Spend,
        StepRecord,
        StepState,
        ToolInfo,
    )
    from keel.policy import Policy
    from keel.redact import redact
    from keel.workflows.details import args_text, phase_details

from keel.workflows.versions import Versions

__all__ = ["RunState"]


class RunState:
    """Shared by the workflow's helpers (planning, steps, saga, holds)."""

    def __init__(self) -> None:
        self.wid = ""
        self.versions = Versions()
        """The code version the run follows (``keel.workflows.versions``)."""
        self._phase = "starting"
        self.running = ""
        """The step in flight, as the Web UI shows it (``s2 issue_refund order_id=...``)."""
        self.waiting_since: Any = None
        self.details = ""
        """The Web UI's Current Details as last set (the status query returns it too)."""
        self.steps: dict[str, StepRecord] = {}
        self.order: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.recovered: set[str] = set()
        """Failed steps whose fallback tool succeeded (graceful degradation, not a failure)."""
        self.approvals: dict[str, Approval] = {}
        self.approval_notes: dict[str, str] = {}
        """Step id -> who approved or rejected it and why (shown by ``status``)."""
        self.labels: dict[str, Label] = {}
        """Data-flow label of each succeeded step's result (``keel.labels``)."""
        self.executed: list[ExecutedCall] = []
        """Succeeded calls with their resolved arguments, for cumulative limits."""
        self.trusted_calls: list[tuple[str, str]] = []
        """``(tool, signature)`` of every step the first (trusted) plan wrote, resolved."""
        self.waiting_for = ""
        self.begun_in_task = False
        """The current workflow task ran ``begin_local``: the next tool, even a quick one, runs
        as an activity, so the beginning is in history before any effect (and stops sent while
        it ran arrive before any tool acts)."""
        self.iterations = 0
        self.plan_saw_untrusted = False
        """Whether the current plan was made after untrusted data reached the planner (a tool's
        output or error, or memory): set by the loop before each plan."""
        self.model_label = ""
        self.outcome = ""
        self.flags: list[str] = []
        self.plan_sizes: list[int] = []
        """Steps of each plan, in order (the fan-out anomaly flag)."""
        self.calls: list[ModelCallRecord] = []
        self.start_tier = ""
        self._policy: Policy | None = None
        self._spend: dict[str, Any] = {
            "total": 0,
            "by_tier": {},
            "by_model": {},
            "by_tool": {},
            "by_step": {},
            "model_calls": 0,
            "cheapest": 0,
        }

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value
        if value != "waiting_approval":  # the wait writes its own, more precise, details
            self.show()

    def show(self, text: str = "") -> None:
        """Keep the Web UI's Current Details true: ``text``, or what the phase and spend say.
        Not a command: it rides on the task completion and is not part of replay."""
        if not text:
            text = phase_details(
                self._phase,
                iteration=self.iterations,
                spent_micros=self._spend["total"] if hasattr(self, "_spend") else 0,
                outcome=self.outcome,
                running=self.running,
            )
        text = redact(text)  # arguments carry customer data; details are stored in plaintext
        self.details = text
        with contextlib.suppress(Exception):  # outside a workflow (unit tests of helpers)
            workflow.set_current_details(text)

    def policy(self, ctx: RunContext) -> Policy:
        """The run's policy snapshot, validated once per run (not once per step)."""
        if self._policy is None:
            self._policy = Policy.model_validate(ctx.policy)
        return self._policy

    def gate_context(self, ctx: RunContext) -> dict[str, Any]:
        """Facts earlier steps established, as their tools declare them (``ToolInfo.facts``):
        the values a policy's ``one_of_ref`` may accept. Nothing here names a tool or field."""
        declared = {t.name: t.facts for t in ctx.all_tools}
        facts: dict[str, Any] = {}
        for step_id, data in self.results.items():
            record = self.steps.get(step_id)
            mapping = declared.get(record.tool) if record is not None else None
            if mapping is None:  # a snapshot recorded before tools declared their facts
                mapping = FACTS_BEFORE_DECLARATIONS
            for field, fact in mapping.items():
                if field in data:
                    facts.setdefault(fact, []).append(data[field])
        return facts

    def trust_plan(self) -> int:
        """The plan number provenance works with: a plan made before any untrusted data reached
        the planner (e.g. the escalation of a plan refused before it ran) is as trusted as the
        first one; any other is its iteration number."""
        return self.iterations if self.plan_saw_untrusted else 1

    def flow(
        self,
        req: AgentRequest,
        ctx: RunContext,
        tool: ToolInfo | None,
        name: str,
        raw_args: Mapping[str, Any],
        args: Mapping[str, Any],
    ) -> Flow:
        """The data-flow facts the gate judges a call with: its arguments' labels, the step's
        provenance, earlier sums and the calls executed so far. One construction for the step
        runner (which decides) and the plan check (which predicts the decision)."""
        return Flow(
            request=req.message,
            labels=label_args(
                raw_args,
                args,
                plan=self.trust_plan(),
                request=req.message,
                results=self.results,
                result_labels=self.labels,
            ),
            provenance=step_provenance(
                self.trust_plan(),
                name,
                bool(tool and tool.side_effects),
                d.call_signature(name, args),
                self.trusted_calls,
            ),
            prior=ctx.prior_totals,
            executed=tuple(self.executed),
        )

    def put(self, record: StepRecord) -> None:
        if record.id not in self.steps:
            self.order.append(record.id)
        self.steps[record.id] = record
        if record.state == StepState.RUNNING:
            self.running = f"{record.id} {record.tool} {args_text(record.args)}"[:200]
            self.show()
        elif self.running.startswith(f"{record.id} "):
            self.running = ""

    def records(self) -> tuple[StepRecord, ...]:
        return tuple(self.steps[s] for s in self.order)

    def evaluated(self) -> tuple[StepRecord, ...]:
        """What the evaluator judges: a failure its fallback made good is not held against the
        run (else a degraded-but-answered step would escalate the model for a tool outage)."""
        return tuple(r for r in self.records() if r.id not in self.recovered)

    def waiting_step(self) -> str:
        return next((s for s, r in self.steps.items() if r.state == StepState.WAITING_APPROVAL), "")

    def charge(
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

    def spend(self) -> Spend:
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
