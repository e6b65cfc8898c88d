"""One planned step: condition, references, the gate, a human's approval, the tool, its
fallback. The gate is pure and runs here; its decision is made durable by the tool activity
(allowed steps) or by ``authorize_step`` (denials and a human's answers)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, FailureError

with workflow.unsafe.imports_passed_through():
    from keel import decisions as d
    from keel.agent_io import RunContext, StepGateInput, StepGateResult, tool_record
    from keel.budget import tool_hold
    from keel.gate import GateDecision, check_tool_call
    from keel.labels import ExecutedCall, Label, label_result
    from keel.models import (
        AgentRequest,
        Approval,
        EffectLimit,
        PlanStep,
        StepGate,
        StepRecord,
        StepState,
        ToolCall,
        ToolInfo,
        ToolResult,
    )
    from keel.redact import redact
    from keel.text import problem as text_problem
    from keel.workflows.details import approval_details, rule_text

from keel.workflows.holds import Holds
from keel.workflows.options import CONTROL_RETRY, CONTROL_TIMEOUT, TOOL_HEARTBEAT
from keel.workflows.saga import Saga
from keel.workflows.state import RunState
from keel.workflows.stop import Abort, Stopper, as_activity_error, cause

__all__ = ["FLOW_PATCH", "APPROVAL_AUDIT_PATCH", "StepRunner"]

FLOW_PATCH = "keel-17-flow-gate"
"""Runs started after issue 17 pass the gate a ``Flow`` (labels, provenance, cumulative
sums); older histories replay with the gate they were recorded with."""
APPROVAL_AUDIT_PATCH = "keel-17-approval-audit"
"""Runs started after issue 17 audit an approval's request and its abandonment too."""


class StepRunner:
    def __init__(self, state: RunState, stopper: Stopper, holds: Holds, saga: Saga) -> None:
        self._state, self._stopper, self._holds, self._saga = state, stopper, holds, saga
        self._admitted = False

    async def admit(self, ctx: RunContext, steps: tuple[PlanStep, ...]) -> None:
        """Before a plan with a side effect acts, hold every step it may take (all or none)."""
        tools = {t.name: t for t in ctx.tools}
        planned = [(s, tools[s.tool]) for s in steps if s.tool in tools]
        if not any(t.side_effects for _, t in planned):
            return
        wid = self._state.wid
        holds = tuple(
            tool_hold(
                key=f"{wid}/{s.id}/reserve",
                scopes=ctx.scopes,
                amount_micros=t.cost_micros,
                tool=t.name,
                run_id=wid,
                step_id=s.id,
                ttl=admitted_ttl(ctx),
            )
            for s, t in planned
        )
        await self._holds.admit(ctx, holds)
        self._admitted = True

    async def run(self, req: AgentRequest, ctx: RunContext, step: PlanStep) -> StepState:
        st = self._state
        record = StepRecord(id=step.id, tool=step.tool, args=step.args)
        st.put(record)
        try:
            condition = d.condition_holds(step.when, st.results)
        except Exception as e:  # a condition the pure code cannot evaluate: deny, never loop
            await self._deny(req, record, _unjudgeable(e))
        if not condition:
            st.put(
                record.model_copy(
                    update={
                        "state": StepState.SKIPPED,
                        "summary": f"condition not met: {_when_text(step.when)}",
                    }
                )
            )
            return StepState.SKIPPED
        try:
            args = d.resolve_args(step.args, st.results)
        except d.ReferenceError_ as e:
            st.put(record.model_copy(update={"state": StepState.FAILED, "error": str(e)}))
            return StepState.FAILED
        except Exception as e:
            await self._deny(req, record, _unjudgeable(e))
        record = record.model_copy(update={"args": args})
        tool = next((t for t in ctx.all_tools if t.name == step.tool), None)
        labels: dict[str, Label] = {}
        try:
            _check_payload(args)
            # Labels are computed for every run (pure, no commands); the gate reads them only
            # in runs that carry the patch marker, so older histories replay with their gate.
            facts = st.flow(req, ctx, tool, step.tool, step.args, args)
            labels = facts.labels
            if st.trust_plan() <= 1:
                st.trusted_calls.append((step.tool, d.call_signature(step.tool, args)))
            flow = facts if self._state.versions.patched(FLOW_PATCH) else None
            gate = check_tool_call(
                st.policy(ctx),
                req.tenant,
                req.user,
                ctx.permissions,
                tool if tool is not None and _offered(ctx, tool) else None,
                args,
                st.gate_context(ctx),
                flow,
            )
        except Exception as e:  # pure code meeting arguments it cannot judge: deny, never loop
            gate = _unjudgeable(e)
        key = f"{st.wid}/{step.id}"
        if not gate.allowed:
            await self._deny(req, record, gate)
        assert tool is not None
        approved_by = ""
        if gate.needs_approval:
            approved_by = await self._await_approval(
                req,
                record,
                gate,
                gate.approval_timeout_seconds or ctx.limits.approval_timeout_seconds,
                gate.on_timeout == "approve",
                _approval_rule(st.policy(ctx), step.tool, gate.rule),
            )
        # The allow decision is made here; the tool activity records it in the audit log and
        # holds the step's budget before the effect (one round trip per step, see bench/).
        hold = f"{key}/reserve"
        self._holds.placed_by_tool(hold)
        self._stopper.check()
        st.put(record.model_copy(update={"state": StepState.RUNNING}))
        stepgate = step_gate(ctx, tool, gate.rule, gate.reason, self._admitted).model_copy(
            update={
                "provenance": gate.provenance,
                "approved_by": approved_by,
                "limits": effect_limits(st.policy(ctx), tool.name),
                **(
                    {"approved_rule": gate.rule, "approved_total": gate.amount}
                    if approved_by and gate.needs_approval
                    else {}
                ),
            }
        )
        try:
            effect = _reused_key(req, step.id, tool.name, args) or key
            try:
                out = await self._stopper.interruptible(
                    self._start_tool(req, tool, args, effect, hold, stepgate)
                )
            except ActivityError:
                raise
            except FailureError as e:  # a local activity's own error may arrive unwrapped
                raise as_activity_error(e, "run_tool") from e
            if effect != key and out.replayed:  # the earlier run paid for it (ledger and report)
                out = out.model_copy(update={"cost_micros": 0})
        except ActivityError as e:
            cancelled = self._stopper.note_cancel(e)
            stop = self._stopper.stop
            why = f"cancelled: {stop.reason}" if cancelled and stop else cause(e)
            # The durable record decides: an effect recorded under the key means the step
            # succeeded, whatever the failed attempt said; otherwise the key is fenced.
            settled = await self._holds.settle(
                req,
                step.id,
                step.tool,
                hold,
                None,
                "cancelled" if cancelled else "failed",
                why,
                effect_key=_reused_key(req, step.id, tool.name, args) or key,
            )
            if settled.recorded is not None:
                self._holds.closed(hold)  # committed with the effect
                self._succeeded(record, tool, settled.recorded, labels)
                st.flags.append("effect_recovered")
                return StepState.SUCCEEDED
            st.put(record.model_copy(update={"state": StepState.FAILED, "error": why}))
            self._stopper.check()
            if tool.fallback and any(t.name == tool.fallback for t in ctx.tools):
                return await self._fallback(req, ctx, step, tool)
            return StepState.FAILED
        if out.refused == "budget":
            self._holds.closed(hold)  # DENY held nothing
            st.put(record.model_copy(update={"state": StepState.DENIED, "error": out.error}))
            raise Abort("budget_exhausted", f"budget denied {step.tool}: {out.error}", "budget_denied")
        if out.refused == "optional":
            self._holds.closed(hold)  # released by the activity
            st.put(record.model_copy(update={"state": StepState.SKIPPED, "summary": out.error}))
            return StepState.SKIPPED
        self._holds.closed(hold)
        self._succeeded(record, tool, out, labels, st.approval_notes.get(record.id, ""))
        return StepState.SUCCEEDED

    async def _deny(self, req: AgentRequest, record: StepRecord, gate: GateDecision) -> NoReturn:
        """Record a denial in the audit log and stop the run (the ending undoes what ran)."""
        await self._audit_gate(
            req,
            record.id,
            record.tool,
            record.args,
            allowed=False,
            rule=gate.rule,
            reason=gate.reason,
            detail=_detail(gate),
        )
        self._state.put(record.model_copy(update={"state": StepState.DENIED, "error": gate.reason}))
        raise Abort("denied", f"step {record.id} ({record.tool}) denied: {gate.reason}", "permission_denied")

    def _succeeded(
        self, record: StepRecord, tool: ToolInfo, out: ToolResult, labels: dict[str, Label], note: str = ""
    ) -> None:
        st = self._state
        st.results[record.id] = out.data
        st.labels[record.id] = label_result(record.id, record.tool, out.data, labels)
        st.executed.append(ExecutedCall(tool=record.tool, args=record.args))
        if tool.compensation:
            self._saga.push(record.id, tool.compensation, out.data)
        st.charge(out.cost_micros, tool=record.tool, step=record.id)
        st.put(
            record.model_copy(
                update={
                    "state": StepState.SUCCEEDED,
                    "summary": out.summary
                    + (" (replayed)" if out.replayed else "")
                    + (f" · {note}" if note else ""),
                    "result": out.data,
                    "cost_micros": out.cost_micros,
                    "score": 1.0,
                    "error": "",
                }
            )
        )

    async def _fallback(
        self, req: AgentRequest, ctx: RunContext, step: PlanStep, tool: ToolInfo
    ) -> StepState:
        """Graceful degradation: run the declared fallback with the same arguments."""
        assert tool.fallback is not None
        st = self._state
        fb = step.model_copy(update={"id": f"{step.id}f", "tool": tool.fallback})
        state = await self.run(req, ctx, fb)
        if state == StepState.SUCCEEDED:
            st.recovered.add(step.id)
            st.results[step.id] = st.results[fb.id]  # later ${sN.x} references still resolve
            st.labels[step.id] = st.labels[fb.id]
            st.flags.extend(["degraded", f"fallback:{step.tool}->{tool.fallback}"])
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
        """The step's ``run_tool``: a local activity for a quick in-process tool in a run with
        ``LOCAL_TOOLS_PATCH`` (same input, timeout, retries and cancellation; its result is a
        marker in this workflow task instead of an activity's three events and a second task
        through the server), otherwise an activity on the tool's queue.

        Either way the effect happens at most once per key: an attempt repeated because the
        worker died before this task completed finds the record under the key's lock and
        returns it (``keel.activities.tools.execute``). A local tool's dead worker is noticed
        when the workflow task times out rather than by a missed heartbeat."""
        call = ToolCall(
            tool=tool.name,
            args=args,
            idempotency_key=key,
            tenant=req.tenant,
            user=req.user,
            workflow_id=self._state.wid,
            step_id=key.rsplit("/", 1)[1],
            reservation_key=reserve_key,
            gate=gate,
        )
        retry = RetryPolicy(
            initial_interval=timedelta(milliseconds=500),
            maximum_interval=timedelta(seconds=10),
            maximum_attempts=tool.max_attempts,
            non_retryable_error_types=list(tool.non_retryable_errors),
        )
        # The summary is user metadata the Web UI shows: no secret or PII from the args.
        summary = redact(d.step_summary(tool.name, args))
        queue = _tool_queue(tool)
        st = self._state
        local = tool.local and queue is None and not st.begun_in_task and st.versions.local_tools()
        st.begun_in_task = False  # an activity ends this workflow task
        if local:
            return workflow.start_local_activity(
                "run_tool",
                call,
                result_type=ToolResult,
                start_to_close_timeout=timedelta(seconds=tool.timeout_seconds),
                retry_policy=retry,
                summary=summary,
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
        # WAIT_CANCELLATION_COMPLETED: a cancelled tool has really stopped (its transaction
        # rolled back) or really finished before the run moves on, so no effect goes unrecorded.
        return workflow.start_activity(
            "run_tool",
            call,
            result_type=ToolResult,
            start_to_close_timeout=timedelta(seconds=tool.timeout_seconds),
            heartbeat_timeout=TOOL_HEARTBEAT,
            retry_policy=retry,
            task_queue=queue,
            summary=summary,
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

    async def _await_approval(
        self,
        req: AgentRequest,
        record: StepRecord,
        gate: GateDecision,
        timeout_seconds: int,
        approve_on_timeout: bool,
        rule: tuple[str, str] = ("", ""),
    ) -> str:
        """Wait for a human; returns who approved. Every outcome has an audit row: requested,
        approved, rejected, timed out, or abandoned when the run stopped while waiting.
        ``rule`` (name, condition as text) makes the Web UI's Current Details say why."""
        st = self._state
        why = gate.reason
        detail = _detail(gate)
        audited = self._state.versions.patched(APPROVAL_AUDIT_PATCH)
        if audited:
            await self._audit_gate(
                req,
                record.id,
                record.tool,
                record.args,
                allowed=False,
                rule=gate.rule,
                reason=why,
                kind="approval",
                decision="requested",
                detail={**detail, "timeout_seconds": timeout_seconds},
                key_suffix="-requested",
            )
        st.put(record.model_copy(update={"state": StepState.WAITING_APPROVAL, "summary": why}))
        st.waiting_for = f"approval of {record.id} ({record.tool}): {why}"
        st.waiting_since = workflow.now()
        st.phase = "waiting_approval"
        default = "approve" if approve_on_timeout else "reject"
        details = approval_details(
            st.wid, record.id, record.tool, record.args, rule[0] or why, rule[1], timeout_seconds, default
        )
        st.show(details)
        try:
            await workflow.wait_condition(
                lambda: record.id in st.approvals or self._stopper.stop is not None,
                timeout=timedelta(seconds=timeout_seconds),
                timeout_summary=f"approval of {record.id} {record.tool}: {default} after {timeout_seconds} s",
            )
        except asyncio.CancelledError:
            self._stopper.note_workflow_cancel()
        except TimeoutError:
            st.approvals[record.id] = Approval(
                approve=approve_on_timeout,
                step_id=record.id,
                reason=f"no answer within {timeout_seconds} s (policy default: "
                f"{'approve' if approve_on_timeout else 'reject'})",
                by="timeout",
            )
        st.waiting_for = ""
        st.waiting_since = None
        st.phase = "executing"
        stop = self._stopper.stop
        if stop is not None:
            st.put(
                record.model_copy(
                    update={
                        "state": StepState.FAILED,
                        "error": f"stopped while waiting for approval: {stop.reason}",
                    }
                )
            )
            if audited and record.id not in st.approvals:
                await self._audit_gate(
                    req,
                    record.id,
                    record.tool,
                    record.args,
                    allowed=False,
                    rule=gate.rule,
                    reason=f"abandoned: the run stopped while waiting ({stop.reason})",
                    kind="approval",
                    decision="abandoned",
                    detail=detail,
                    key_suffix="-abandoned",
                )
        self._stopper.check()
        decision = st.approvals[record.id]
        timed_out = decision.by == "timeout" and decision.step_id == record.id
        verdict = "timed_out" if timed_out else ("approve" if decision.approve else "reject")
        by = decision.by or "unknown"
        await self._audit_gate(
            req,
            record.id,
            record.tool,
            record.args,
            allowed=decision.approve,
            rule="human_approval",
            reason=(decision.reason or ("approved" if decision.approve else "rejected"))
            + (f" (by {by}; asked: {why})" if audited else ""),
            kind="approval",
            decision=verdict if audited else "",
            detail={**detail, "by": by, "approved": decision.approve} if audited else {},
        )
        answer = f"{'approved' if decision.approve else 'rejected'} by {by}: {decision.reason or why}"
        st.approval_notes[record.id] = answer
        st.put(st.steps[record.id].model_copy(update={"summary": answer}))
        if not decision.approve:
            st.put(
                record.model_copy(update={"state": StepState.DENIED, "error": decision.reason or "rejected"})
            )
            raise Abort(
                "rejected",
                f"{record.tool} rejected by a human: {decision.reason or 'no reason given'}",
                "rejected",
            )
        return by

    async def _audit_gate(
        self,
        req: AgentRequest,
        step_id: str,
        tool: str,
        args: dict[str, Any],
        *,
        allowed: bool,
        rule: str,
        reason: str,
        kind: str = "permission",
        decision: str = "",
        detail: dict[str, Any] | None = None,
        key_suffix: str = "",
    ) -> StepGateResult:
        """Record a denial or a human's answer in the audit log (allowed steps are recorded
        by the tool activity itself, together with their reservation)."""
        return await self._stopper.shielded(
            workflow.start_local_activity(
                "authorize_step",
                StepGateInput(
                    workflow_id=self._state.wid,
                    tenant=req.tenant,
                    user=req.user,
                    step_id=step_id,
                    tool=tool,
                    args=args,
                    allowed=allowed,
                    rule=rule,
                    reason=reason,
                    kind=kind,
                    decision=decision,
                    detail=detail or {},
                    key_suffix=key_suffix,
                ),
                result_type=StepGateResult,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=CONTROL_RETRY,
                summary=f"gate {tool} ({'allow' if allowed else 'deny'})",
            )
        )


def _detail(gate: GateDecision) -> dict[str, Any]:
    """What an audit row says about a gate decision beyond allow/deny (issue 17)."""
    out: dict[str, Any] = {"approval_rule": gate.rule} if gate.needs_approval else {}
    if gate.provenance:
        out["provenance"] = gate.provenance
    if gate.amount is not None:
        out["amount"] = gate.amount
    return out


def _unjudgeable(e: Exception) -> GateDecision:
    return GateDecision(
        allowed=False,
        rule="unjudgeable_arguments",
        reason=f"arguments the gate cannot judge ({type(e).__name__}: {str(e)[:120]})",
    )


def admitted_ttl(ctx: RunContext) -> int:
    """A plan's holds live as long as the run may (its deadline), plus a minute."""
    return ctx.limits.deadline_seconds + 60


def step_gate(ctx: RunContext, tool: ToolInfo, rule: str, reason: str, admitted: bool) -> StepGate:
    """What the tool activity needs to audit the decision and place the step's hold; the hold
    is the same request the admission placed (see ``keel.budget.tool_hold``)."""
    return StepGate(
        rule=rule,
        reason=reason,
        scopes=ctx.scopes,
        amount_micros=tool.cost_micros,
        hold_ttl_seconds=admitted_ttl(ctx) if admitted else 300,
    )


def effect_limits(policy: Any, tool: str) -> tuple[EffectLimit, ...]:
    """The policy's cumulative limits on ``tool``, for the tool to re-check at its effect."""
    rule = policy.tools.get(tool)
    return tuple(
        EffectLimit(name=c.name, arg=c.arg, per=c.per, key=c.key, max=c.max, approval_over=c.approval_over)
        for c in (rule.cumulative if rule else ())
    )


def _check_payload(args: dict[str, Any]) -> None:
    """Arguments must survive a JSON round trip unchanged (no NaN or infinity, which JSON
    would carry as null) before they are judged, recorded or sent to a tool."""
    json.dumps(args, allow_nan=False)

    def walk(v: Any) -> None:
        if isinstance(v, str):
            if why := text_problem(v):
                raise ValueError(f"an argument {why}")
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(args)


def _when_text(when: dict[str, Any] | None) -> str:
    if not when:
        return ""
    op = "==" if "equals" in when else "!="
    return f"{when.get('step')}.{when.get('field')} {op} {when.get('equals', when.get('not_equals'))}"


def _offered(ctx: RunContext, tool: ToolInfo) -> bool:
    """Whether the planner was offered ``tool`` (one of ``ctx.tools``). ``all_tools`` holds
    records (``tool_record``; older snapshots: whole declarations, equal to the offered ones),
    so both sides are compared as records: the same answer for either shape."""
    record = tool_record(tool)
    return any(t.name == tool.name and tool_record(t) == record for t in ctx.tools)


def _tool_queue(tool: ToolInfo) -> str | None:
    """Rate-limited tools run on their own task queue, whose rate limit Temporal enforces."""
    if not tool.rate_limit_per_second:
        return None
    return f"{workflow.info().task_queue}-{tool.queue or f'tool-{tool.name}'}"


def _approval_rule(policy: Any, tool: str, name: str) -> tuple[str, str]:
    """(rule name, its condition as text) of the approval rule the gate matched."""
    rule = policy.tools.get(tool)
    for a in rule.approvals if rule else ():
        if a.name == name:
            return a.name, rule_text(a.when)
    return name, ""


def _reused_key(req: AgentRequest, step_id: str, tool: str, args: dict[str, Any]) -> str:
    """The earlier run's key for this exact step (same id, tool and arguments), or "".

    Only an exact match reuses a record: a retried plan that does something else under the
    same step id acts anew rather than being answered with another action's result."""
    for r in req.reuse_effects:
        if r.step_id == step_id and r.tool == tool and r.args == args:
            return r.key
    return ""
