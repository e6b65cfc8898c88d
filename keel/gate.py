"""The permissions gate: pure, deterministic policy evaluation at three levels.

1. ``authorize_user`` — may this user of this tenant run the agent at all?
2. ``visible_tools`` — which tools may the planner even see? (filtered BEFORE planning)
3. ``check_tool_call`` — re-checked at execution: tool known, permissions held, every argument
   constraint satisfied, and whether a human must approve first.

Everything here is a function of its arguments only: no I/O, no clock, no randomness, and only
stdlib + ``keel`` imports, because it runs inside the Temporal workflow sandbox and must give
the same answer on replay. Every decision names the ``rule`` that produced it so the audit
log and the user can see *why*.

Effective permissions (the rule that stops a caller granting itself more):

* The policy grants ``granted`` = union of the permissions of the user's roles (the user's
  own roles, or the tenant's ``roles`` for users admitted by list / ``"*"``).
* The request's ``permissions`` (``--perm`` flags) are an UPPER BOUND: when given, the
  effective set is ``requested ∩ granted``; requested permissions the policy does not grant
  are dropped (and named in the reason), never added. When none are given the caller does
  not narrow anything and the effective set is ``granted``.
* A permission pattern ``refunds:*`` covers ``refunds:write``; ``*`` covers everything.
* A tool needs its own declared ``ToolInfo.permissions`` plus the policy's per-tool
  ``tools.<name>.permissions`` (ACL override); a tenant's ``deny_tools`` removes it outright.

``context`` keys understood by argument constraints (``one_of_ref``) — facts the workflow has
established from earlier steps of the same run, never from the model's say-so. Tools
declare them (``@tool(facts={"customer_email": "order_customer"})``: that result field of a
successful call becomes an accepted value); the demo declares:

* ``order_customer`` — e-mail(s) of the customer(s) of orders looked up in this run
  (``lookup_order`` result field ``customer_email``).
* ``order_ids`` — order ids looked up or refunded in this run.
* Any other key a policy's ``one_of_ref`` names; a missing key fails the rule (fail closed).

``flow`` (a ``Flow``) carries what the workflow knows about where the call came from (issue
17): the trusted request's text, a data-flow ``Label`` per argument, the step's
``StepProvenance``, and the sums cumulative limits add to (earlier runs' from the database,
read at run start; this run's from its executed steps). Rules that need it fail closed
without it. Patterns run on RE2 (linear time); e-mail addresses are parsed by
``email-validator`` and routing characters (``%``, ``!``) in the local part are refused.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from keel.labels import ExecutedCall, Flow, Label, named_in, parse_address
from keel.models import Frozen, ToolInfo
from keel.policy import ApprovalRule, Check, Condition, Constraint, CumulativeLimit, Policy, compile_pattern

__all__ = [
    "ExecutedCall",
    "Flow",
    "GateDecision",
    "authorize_user",
    "check_tool_call",
    "required_permissions",
    "visible_tools",
]

_SHELL_META = re.compile(r"[;&|`$<>(){}\\\n\r!*?\[\]~]")


class GateDecision(Frozen):
    """Outcome of one gate check; every field is safe to record in history and the audit log."""

    allowed: bool
    rule: str
    """The rule that decided (``allow``, ``tenant-unknown``, a constraint name, ...)."""
    reason: str
    needs_approval: bool = False
    effective_permissions: tuple[str, ...] = ()
    approval_timeout_seconds: int = 0
    """How long to wait for a human when ``needs_approval``; then ``on_timeout`` applies."""
    on_timeout: str = "reject"
    provenance: str = ""
    """``trusted`` / ``untrusted: why`` when the workflow passed a ``Flow``; audited."""
    amount: float | None = None
    """The amount the deciding cumulative rule summed (this call included), when one did."""


def _covers(held: Sequence[str], perm: str) -> bool:
    for h in held:
        if h == perm or h == "*" or (h.endswith(":*") and perm.startswith(h[:-1])):
            return True
    return False


def _ask(
    rule: ApprovalRule | CumulativeLimit, reason: str, held: tuple[str, ...], amount: float | None = None
) -> GateDecision:
    """Allowed once a person approves: ``rule`` (an approval or a cumulative limit) names
    itself and says how long the person has and what happens when that time runs out."""
    return GateDecision(
        allowed=True,
        rule=rule.name,
        reason=reason,
        needs_approval=True,
        effective_permissions=held,
        approval_timeout_seconds=rule.timeout_seconds,
        on_timeout=rule.on_timeout,
        amount=amount,
    )


def _deny(rule: str, reason: str, perms: tuple[str, ...] = ()) -> GateDecision:
    return GateDecision(allowed=False, rule=rule, reason=reason, effective_permissions=perms)


def authorize_user(policy: Policy, tenant: str, user: str, permissions: Sequence[str]) -> GateDecision:
    """Level 1: is ``user`` of ``tenant`` allowed to run the agent, and with which permissions."""
    t = policy.tenants.get(tenant)
    if t is None:
        return _deny("tenant-unknown", f"tenant {tenant!r} is not in policy {policy.version}")
    if user in t.users:
        roles = t.users[user]
    elif t.any_user:
        roles = t.roles
    else:
        return _deny("user-not-allowed", f"user {user!r} may not run the agent for {tenant!r}")
    granted = tuple(sorted({p for r in roles for p in policy.roles.get(r, ())}))
    if not permissions:
        effective, dropped = granted, []
    else:
        effective = tuple(sorted({p for p in permissions if _covers(granted, p)}))
        dropped = sorted({p for p in permissions if not _covers(granted, p)})
    reason = f"roles {', '.join(roles) or 'none'}"
    if dropped:
        reason += f"; requested but not granted (ignored): {', '.join(dropped)}"
    return GateDecision(allowed=True, rule="user-allowed", reason=reason, effective_permissions=effective)


def required_permissions(policy: Policy, tool: ToolInfo) -> tuple[str, ...]:
    """Permissions a tool needs: its declaration plus the policy's ACL override."""
    rule = policy.tools.get(tool.name)
    extra = rule.permissions if rule else ()
    return tuple(dict.fromkeys((*tool.permissions, *extra)))


def _tool_level(policy: Policy, tenant: str, tool: ToolInfo, held: tuple[str, ...]) -> GateDecision | None:
    t = policy.tenants.get(tenant)
    if t is not None and tool.name in t.deny_tools:
        return _deny("tool-disabled", f"tool {tool.name!r} is disabled for tenant {tenant!r}", held)
    missing = [p for p in required_permissions(policy, tool) if not _covers(held, p)]
    if missing:
        return _deny(
            "tool-permission",
            f"tool {tool.name!r} needs {', '.join(missing)} which the caller lacks",
            held,
        )
    return None


def visible_tools(
    policy: Policy, tenant: str, user: str, permissions: Sequence[str], tools: Sequence[ToolInfo]
) -> tuple[ToolInfo, ...]:
    """Level 2: the tools the planner may see; everything else is removed before planning."""
    who = authorize_user(policy, tenant, user, permissions)
    if not who.allowed:
        return ()
    held = who.effective_permissions
    return tuple(t for t in tools if _tool_level(policy, tenant, t, held) is None)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _fold(v: Any) -> Any:
    return v.strip().casefold() if isinstance(v, str) else v


def _check(c: Check, value: Any, context: Mapping[str, Any]) -> str | None:
    """Returns why ``value`` fails ``c``, or None when every predicate holds."""
    if c.min is not None or c.max is not None:
        n = _number(value)
        if n is None:
            return f"{value!r} is not a number"
        if c.min is not None and n < c.min:
            return f"{n:g} is below the minimum {c.min:g}"
        if c.max is not None and n > c.max:
            return f"{n:g} exceeds the limit {c.max:g}"
    text = value if isinstance(value, str) else str(value)
    if c.max_length is not None and len(text) > c.max_length:
        return f"longer than {c.max_length} characters"
    if c.one_of is not None and _fold(value) not in {_fold(x) for x in c.one_of}:
        return f"{value!r} is not one of the allowed values"
    if c.one_of_ref is not None:
        ref = context.get(c.one_of_ref)
        if ref is None:
            return f"no {c.one_of_ref!r} established earlier in this run"
        allowed = ref if isinstance(ref, list | tuple | set | frozenset) else (ref,)
        if _fold(value) not in {_fold(x) for x in allowed}:
            return f"{value!r} is not the {c.one_of_ref.replace('_', ' ')}"
    if c.domain_in is not None:
        parsed = parse_address(value)
        if isinstance(parsed, str):
            return parsed
        if parsed[1] not in {d.casefold() for d in c.domain_in}:
            return f"domain {parsed[1]!r} is not allowed"
    if c.prefix_in is not None:
        if not isinstance(value, str) or _SHELL_META.search(value):
            return "shell metacharacters are not allowed"
        first = value.strip().split(" ", 1)[0] if value.strip() else ""
        if first not in c.prefix_in:
            return f"{first!r} is not in the allow-list"
    if c.pattern is not None and not _pattern(c.pattern).fullmatch(text):
        return "does not match the required pattern"
    return None


@functools.lru_cache(maxsize=256)
def _pattern(p: str) -> Any:
    return compile_pattern(p)  # RE2: linear in the text, whatever the pattern


def _flow_rules(c: Constraint, value: Any, args: Mapping[str, Any], flow: Flow | None) -> str | None:
    """The data-flow predicates of ``c``; without a ``Flow`` they fail closed."""
    if not (c.named_in_request or c.data_about):
        return None
    if flow is None:
        return "no data-flow labels for this call (fail closed)"
    if c.named_in_request and not named_in(flow.request, value):
        return f"{value!r} was not named in the request"
    if c.data_about:
        target = parse_address(args.get(c.data_about))
        if isinstance(target, str):
            return f"cannot tell whom {c.data_about!r} addresses: {target}"
        label = flow.labels.get(c.arg, Label())
        others = sorted(set(label.customers) - {target[0]})
        if others:
            src = ", ".join(s for s in label.sources if ":" in s) or "earlier steps"
            return f"carries data about {', '.join(others)} (from {src}), not only about {target[0]}"
    return None


def _constraint(
    c: Constraint, args: Mapping[str, Any], context: Mapping[str, Any], flow: Flow | None
) -> str | None:
    if c.arg not in args or args[c.arg] is None:
        return None if c.optional else f"argument {c.arg!r} is missing"
    value = args[c.arg]
    why = _check(c, value, context) or _flow_rules(c, value, args, flow)
    if why is None and c.any_of:
        fails = [_check(alt, value, context) for alt in c.any_of]
        if all(fails):
            why = "; ".join(f for f in fails if f)
    if why is None:
        return None
    return f"{c.arg}: {why}" + (f" ({c.message})" if c.message else "")


def _fires(cond: Condition, args: Mapping[str, Any]) -> bool:
    if cond.arg is None:
        return True
    if cond.arg not in args:
        return True  # cannot tell: ask a human rather than skip the approval
    v = args[cond.arg]
    if cond.equals is not None and _fold(v) != _fold(cond.equals):
        return False
    bounds = (cond.gt, cond.gte, cond.lt, cond.lte)
    if bounds == (None,) * 4:
        return True
    n = _number(v)
    if n is None:
        return True
    return (
        (cond.gt is None or n > cond.gt)
        and (cond.gte is None or n >= cond.gte)
        and (cond.lt is None or n < cond.lt)
        and (cond.lte is None or n <= cond.lte)
    )


def cumulative_sum(lim: CumulativeLimit, tool: str, args: Mapping[str, Any], flow: Flow | None) -> float:
    """The sum ``lim`` bounds if this call runs: this call + this run's earlier calls of the
    same tool (same order for ``per: order``) + earlier runs' (``flow.prior``, from the DB)."""
    total = _number(args.get(lim.arg)) or 0.0
    key = str(args.get(lim.key, "")) if lim.key else ""
    if flow is None:
        return total
    for call in flow.executed:
        if call.tool != tool:
            continue
        if lim.per == "order" and str(call.args.get(lim.key or "", "")) != key:
            continue
        total += _number(call.args.get(lim.arg)) or 0.0
    if lim.per == "order":
        total += flow.prior.get(f"{tool}|order|{key}", 0.0)
    elif lim.per == "tenant_day":
        total += flow.prior.get(f"{tool}|tenant_day", 0.0)
    return round(total, 6)


def _scope(lim: CumulativeLimit, args: Mapping[str, Any]) -> str:
    return {"order": f"order {args.get(lim.key or '')}", "run": "this run", "tenant_day": "the tenant today"}[
        lim.per
    ]


def _provenance_text(flow: Flow | None) -> str:
    if flow is None:
        return ""
    p = flow.provenance
    return "trusted" if p.trusted else f"untrusted: {p.why}"


def check_tool_call(
    policy: Policy,
    tenant: str,
    user: str,
    permissions: Sequence[str],
    tool: ToolInfo | None,
    args: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
    flow: Flow | None = None,
) -> GateDecision:
    """Level 3: may this exact call run now? Checks in order; the first failure decides.

    Order: user → tool known → tool disabled/permissions → each constraint (file order) →
    cumulative maxima → provenance (``deny``) → approval rules, cumulative approval
    thresholds, provenance (``approve``). An allowed call that needs a human comes back
    with ``allowed=True, needs_approval=True`` and the rule's timeout.
    """
    d = _check_tool_call(policy, tenant, user, permissions, tool, args, context or {}, flow)
    return d.model_copy(update={"provenance": _provenance_text(flow)}) if flow is not None else d


def _check_tool_call(
    policy: Policy,
    tenant: str,
    user: str,
    permissions: Sequence[str],
    tool: ToolInfo | None,
    args: Mapping[str, Any],
    ctx: Mapping[str, Any],
    flow: Flow | None,
) -> GateDecision:
    who = authorize_user(policy, tenant, user, permissions)
    if not who.allowed:
        return who
    held = who.effective_permissions
    if tool is None:
        return _deny("unknown-tool", "the plan named a tool that does not exist", held)
    denied = _tool_level(policy, tenant, tool, held)
    if denied:
        return denied
    rule = policy.tools.get(tool.name)
    for c in rule.constraints if rule else ():
        why = _constraint(c, args, ctx, flow)
        if why:
            return _deny(c.name, why, held)
    sums = [(lim, cumulative_sum(lim, tool.name, args, flow)) for lim in (rule.cumulative if rule else ())]
    unknown = [
        lim
        for lim in (rule.cumulative if rule else ())
        if flow is not None
        and lim.per == "order"
        and f"{tool.name}|order|{args.get(lim.key or '')}" not in flow.prior
    ]
    for lim, total in sums:
        if lim.max is not None and total > lim.max:
            return _deny(
                lim.name,
                f"{lim.arg}: {total:g} in total on {_scope(lim, args)} would exceed the limit {lim.max:g}",
                held,
            ).model_copy(update={"amount": total})
    untrusted = flow is not None and tool.side_effects and not flow.provenance.trusted
    on_untrusted = (rule.on_untrusted if rule else None) or policy.provenance.untrusted_side_effects
    if untrusted and on_untrusted == "deny":
        assert flow is not None
        return _deny(
            "untrusted-side-effect",
            f"{tool.name} has side effects and was planned after untrusted data: {flow.provenance.why}",
            held,
        )
    for a in rule.approvals if rule else ():
        if _fires(a.when, args):
            amount = _number(args.get(a.when.arg)) if a.when.arg else None
            return _ask(a, f"{tool.name} needs human approval ({a.name})", held, amount)
    for lim, total in sums:
        if lim.approval_over is not None and total > lim.approval_over:
            why = (
                f"{tool.name} needs human approval ({lim.name}: {total:g} in total on "
                f"{_scope(lim, args)} is over {lim.approval_over:g})"
            )
            return _ask(lim, why, held, total)
    for lim in unknown:  # earlier runs' sum on this order was never read: a human decides
        why = (
            f"{tool.name} needs human approval ({lim.name}: earlier {lim.arg} on "
            f"{_scope(lim, args)} unknown: it was not named in the request)"
        )
        return _ask(lim, why, held)
    if untrusted:
        assert flow is not None
        return GateDecision(
            allowed=True,
            rule="untrusted-side-effect",
            reason=f"{tool.name} needs human approval: planned after untrusted data ({flow.provenance.why})",
            needs_approval=True,
            effective_permissions=held,
            approval_timeout_seconds=policy.provenance.approval_timeout_seconds,
            on_timeout="reject",
        )
    return GateDecision(
        allowed=True, rule="allow", reason=f"{tool.name} permitted", effective_permissions=held
    )
