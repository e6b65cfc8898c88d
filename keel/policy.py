"""The policy file: who may run the agent, with which tools, on which arguments.

A policy is a small versioned YAML document (see ``config/policy.yaml``) parsed into frozen
pydantic models. The worker loads it once per run and hands the workflow a snapshot, so a
policy edited mid-run cannot change decisions already recorded in history; the snapshot is
compact (no compiled regexes, no derived indexes) because it lives in every run's history.

Parsing from a file is strict: an unknown key is an error (a typo like ``mx: 500`` must not
silently drop a refund limit), and every problem is reported as ONE line naming the file,
the field path and what is wrong. Models decoded from workflow history are lenient
(``Frozen`` ignores unknown fields) so a newer worker's snapshot still replays.

Failing closed (issue 17): a rule naming a tool, argument or role that does not exist is a
load-time error when the caller passes the tool catalogue (the worker always does: a typo like
``isue_refund:`` must not silently drop the refund limits); numbers must be finite (``1e400``
is not a limit); a key written twice in one mapping is refused (YAML would keep the last one
silently); patterns are compiled by RE2, a linear-time engine, because they are evaluated in
workflow code on model-chosen text (a backtracking ``(a+)+$`` would stall a workflow task).

Evaluation lives in ``keel/gate.py``; this module only describes and validates.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import re2
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from keel.errors import ConfigError
from keel.models import Frozen, ToolInfo

__all__ = [
    "GUARDRAIL_CATEGORIES",
    "ApprovalRule",
    "Check",
    "Condition",
    "Constraint",
    "CumulativeLimit",
    "Guardrails",
    "InputGuardrails",
    "Limits",
    "Policy",
    "PolicyError",
    "Provenance",
    "TenantPolicy",
    "ToolRule",
    "load_policy",
    "compile_pattern",
    "parse_policy",
    "policy_hash",
]

GUARDRAIL_CATEGORIES = (
    "injection",
    "jailbreak",
    "prompt_leak",
    "smuggling",
    "encoded",
    "off_topic",
)
"""Input-guardrail categories ``keel.activities.guardrails.scan_input`` can report."""

_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}\.\d+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.:*-]{0,63}$")


class PolicyError(ConfigError):
    """A policy file that cannot be used; ``str(e)`` is one line: ``file: field.path: problem``."""


def compile_pattern(pattern: str) -> Any:
    """Compile with RE2 (linear time, no backreferences or lookaround); ``re2.error`` if refused.

    RE2 raises for constructs it cannot run in linear time instead of falling back to a
    backtracking engine, so a pattern that loads is a pattern that cannot stall a workflow.
    """
    opts = re2.Options()
    opts.log_errors = False
    return re2.compile(pattern, options=opts)


class _Strict(Frozen):
    """Frozen policy model; unknown keys are errors when validated with ``strict`` context."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("strict"):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        return data


class Check(_Strict):
    """Predicates on one argument value; every predicate that is set must hold (AND)."""

    min: float | None = None
    """Numeric lower bound (inclusive); strings holding a number are accepted."""
    max: float | None = None
    """Numeric upper bound (inclusive), e.g. the hard refund limit."""
    one_of: tuple[str | int | float, ...] | None = None
    """Static allow-list of values (strings compared case-insensitively)."""
    one_of_ref: str | None = None
    """Name of a fact in the gate's ``context`` (e.g. ``order_customer``) the value must equal."""
    domain_in: tuple[str, ...] | None = None
    """Value must be ONE e-mail address whose domain is in this list."""
    prefix_in: tuple[str, ...] | None = None
    """Value's first word must be in this list; shell metacharacters are always refused."""
    pattern: str | None = None
    """Regular expression (RE2 syntax, linear time) the whole value must match."""
    max_length: int | None = None
    """Upper bound on the length of the value's text."""
    named_in_request: bool = False
    """Data-flow rule: the value must be one the trusted request named (e.g. a refund's
    order id), whether it was written literally or came from a step whose input was."""
    data_about: str | None = None
    """Data-flow rule: the value may carry data only about the customer the argument with
    this name addresses (``send_email``: body and recipient hold only that recipient's data)."""

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                compile_pattern(v)
            except re2.error as e:
                why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
                raise ValueError(f"pattern refused by the linear-time engine (RE2): {why}") from e
        return v


class Constraint(Check):
    """A named rule on one argument; a denial names the rule that fired."""

    name: str
    arg: str
    any_of: tuple[Check, ...] = ()
    """Alternatives: at least one must hold (in addition to this rule's own predicates)."""
    optional: bool = False
    """When false (the default) a missing argument fails the rule: fail closed."""
    message: str = ""
    """Human-readable explanation used in the denial reason."""


class Condition(_Strict):
    """When an approval rule fires; all set comparisons must hold. Empty = always."""

    arg: str | None = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    equals: str | int | float | bool | None = None


class ApprovalRule(_Strict):
    """A tool call a human must approve first; silence until the timeout means ``on_timeout``."""

    name: str
    when: Condition = Condition()
    timeout_seconds: int = Field(default=3600, gt=0)
    on_timeout: Literal["reject", "approve"] = "reject"
    """Safe default: an unanswered request is a rejection."""


class CumulativeLimit(_Strict):
    """A limit on the SUM of one argument over calls, not on one call (split refunds).

    ``per: order`` sums calls with the same ``key`` argument (the order id) across steps AND
    runs (the earlier runs' sum comes from the database); ``per: run`` sums this run's calls;
    ``per: tenant_day`` sums the tenant's calls since midnight UTC across runs. A call that
    would take the sum above ``max`` is denied; above ``approval_over`` it needs a human.
    """

    name: str
    arg: str
    per: Literal["order", "run", "tenant_day"]
    key: str | None = None
    """The argument that names the order (required for ``per: order``)."""
    max: float | None = Field(default=None, ge=0)
    approval_over: float | None = Field(default=None, ge=0)
    timeout_seconds: int = Field(default=3600, gt=0)
    on_timeout: Literal["reject", "approve"] = "reject"

    @model_validator(mode="after")
    def _shape(self) -> CumulativeLimit:
        if self.per == "order" and not self.key:
            raise ValueError("per: order needs 'key' (the argument naming the order)")
        if self.max is None and self.approval_over is None:
            raise ValueError("needs 'max' or 'approval_over'")
        return self


class ToolRule(_Strict):
    """Per-tool policy: extra permissions (ACL override), argument constraints, approvals."""

    permissions: tuple[str, ...] = ()
    """Required IN ADDITION to the tool's own declared permissions."""
    constraints: tuple[Constraint, ...] = ()
    approvals: tuple[ApprovalRule, ...] = ()
    cumulative: tuple[CumulativeLimit, ...] = ()
    on_untrusted: Literal["approve", "deny"] | None = None
    """What a side-effecting step of this tool gets when its provenance is untrusted (see
    ``Provenance``); unset = the policy-wide ``provenance.untrusted_side_effects``."""


class TenantPolicy(_Strict):
    """Which users of a tenant may run the agent, and with which roles.

    ``users`` accepts three spellings: ``"*"`` (anyone, with ``roles``), a list of names
    (each with ``roles``) or a mapping ``name: [role, ...]``. It is stored normalised as the
    mapping plus ``any_user`` so the snapshot round-trips through history unchanged.
    """

    users: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    any_user: bool = False
    """True when the file said ``users: "*"``: every user gets ``roles``."""
    roles: tuple[str, ...] = ()
    """Roles for users admitted by ``"*"`` or listed without their own roles."""
    deny_tools: tuple[str, ...] = ()
    """Tools this tenant may never use, whatever the roles say."""
    shared_memory: bool = False
    """Session memory is per (tenant, user, session); true lets a tenant's users share a
    session's memory (a team inbox), which also shares whatever one user's runs read."""

    @model_validator(mode="before")
    @classmethod
    def _normalise_users(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        users, roles = data.get("users"), data.get("roles") or ()
        if users == "*":
            data["users"], data["any_user"] = {}, True
        elif isinstance(users, list):
            data["users"] = {str(u): tuple(roles) for u in users}
        elif isinstance(users, dict):
            data["users"] = {
                str(k): tuple(roles) if v is None else ((v,) if isinstance(v, str) else v)
                for k, v in users.items()
            }
        return data


class Limits(_Strict):
    """Escape hatches: when any is hit the run stops (or asks a human) instead of looping."""

    max_iterations: int = Field(default=3, ge=1)
    """Plan/replan rounds per run."""
    max_tool_calls: int = Field(default=12, ge=1)
    deadline_seconds: int = Field(default=300, ge=1)
    """Wall-clock budget for the whole run (workflow time)."""
    thrash_repeats: int = Field(default=3, ge=2)
    """The same tool with the same arguments this many times = thrashing."""
    max_consecutive_failures: int = Field(default=3, ge=1)
    min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """Evaluation scores below this hand the run to a human."""


class InputGuardrails(_Strict):
    enabled: bool = True
    block: tuple[str, ...] = ("injection", "jailbreak", "prompt_leak", "smuggling", "encoded")
    """Categories that refuse the request; others are only flagged."""

    @field_validator("block")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in GUARDRAIL_CATEGORIES]
        if bad:
            raise ValueError(f"unknown category {bad[0]!r} (known: {', '.join(GUARDRAIL_CATEGORIES)})")
        return v


class Guardrails(_Strict):
    input: InputGuardrails = InputGuardrails()
    flag_tool_output: bool = True
    """Scan tool output for injected instructions and record a flag."""
    redact_output: bool = True
    """Redact secrets and PII from the final answer."""
    prompt_pii: Literal["redact", "keep"] = "redact"
    """PII (e-mail, card, phone, SSN) in the request sent to a model provider: ``redact``
    (typed placeholders) or ``keep``. Secrets are always replaced, whatever this says."""


class Provenance(_Strict):
    """Plan-then-execute: which side effects a run may take is fixed by the trusted request.

    The first plan is made from the request and trusted configuration only. A later plan
    (made after tool output was seen) may add read-only steps freely; a side-effecting step
    it adds, or one whose arguments did not come from the request or the trusted plan, gets
    ``untrusted_side_effects``: ``approve`` (a human decides) or ``deny``.
    """

    untrusted_side_effects: Literal["approve", "deny"] = "approve"
    approval_timeout_seconds: int = Field(default=3600, gt=0)


class Policy(_Strict):
    """The whole policy; ``version`` is recorded with every run and every audit row."""

    version: str
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    tools: dict[str, ToolRule] = Field(default_factory=dict)
    limits: Limits = Limits()
    guardrails: Guardrails = Guardrails()
    provenance: Provenance = Provenance()

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if not isinstance(v, str) or not _VERSION_RE.match(v):
            raise ValueError('must be a quoted string like "2026-11-01.1" (date.revision)')
        return v


_UNION_TAGS = {"str", "int", "float", "bool"}


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    while loc and loc[-1] in _UNION_TAGS:  # pydantic tags union members; users never wrote them
        loc = loc[:-1]
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _tool_args(t: ToolInfo) -> set[str]:
    return set((t.args_schema or {}).get("properties", {}))


def _check_catalogue(p: Policy, tools: Sequence[ToolInfo]) -> tuple[str, str] | None:
    """Every tool, argument and permission a rule names must exist: a typo fails to load."""
    known = {t.name: t for t in tools}
    names = ", ".join(sorted(known))
    for tname, t in p.tenants.items():
        for i, tool in enumerate(t.deny_tools):
            if tool not in known:
                return f"tenants.{tname}.deny_tools[{i}]", f"unknown tool {tool!r} (known: {names})"
    return check_tool_rules(p.tools, tools)


CROSS_RUN_SUMS = ("issue_refund",)
"""Tools whose earlier runs' sums Keel can read (``refunds``): only they may have a
``per: tenant_day`` limit. On any other tool such a limit could only sum this run's calls, a
limit that silently means less than it says, so it is refused at load time."""


def check_tool_rules(
    rules: Mapping[str, ToolRule], tools: Sequence[ToolInfo], prefix: str = "tools", mcp: Sequence[str] = ()
) -> tuple[str, str] | None:
    """Every tool and argument the rules name must exist in the catalogue ``tools`` (the
    policy file's ``tools:`` and an agent's ``policy.tools:`` alike); a rule on an MCP tool
    ``<server>.<tool>`` needs ``<server>`` in ``mcp`` (its arguments are known only when a
    run lists the server's tools). Also the shape checks: one name per rule, comparisons
    with an ``arg``. Returns (path, problem) or None."""
    known = {t.name: t for t in tools}
    names = ", ".join(sorted(known))
    for tool, rule in rules.items():
        where = f"{prefix}.{tool}"
        server = tool.split(".", 1)[0] if "." in tool else ""
        if tool not in known and not (server and server in mcp):
            extra = f"; MCP servers: {', '.join(mcp)}" if mcp else ""
            return where, f"unknown tool {tool!r} (known: {names}{extra})"
        for i, perm in enumerate(rule.permissions):
            if not _NAME_RE.match(perm):
                return f"{where}.permissions[{i}]", f"invalid permission {perm!r}"
        if tool in known:
            args = _tool_args(known[tool])
            refs = [(f"constraints[{i}].arg", c.arg) for i, c in enumerate(rule.constraints)]
            refs += [
                (f"constraints[{i}].data_about", c.data_about)
                for i, c in enumerate(rule.constraints)
                if c.data_about
            ]
            refs += [
                (f"approvals[{i}].when.arg", a.when.arg) for i, a in enumerate(rule.approvals) if a.when.arg
            ]
            refs += [(f"cumulative[{i}].arg", c.arg) for i, c in enumerate(rule.cumulative)]
            refs += [(f"cumulative[{i}].key", c.key) for i, c in enumerate(rule.cumulative) if c.key]
            listed = ", ".join(sorted(args)) or "none"
            for path, arg in refs:
                if arg not in args:
                    return f"{where}.{path}", f"tool {tool!r} has no argument {arg!r} (arguments: {listed})"
        for i, c in enumerate(rule.cumulative):
            if c.per == "tenant_day" and tool not in CROSS_RUN_SUMS:
                return (
                    f"{where}.cumulative[{i}].per",
                    f"per: tenant_day needs the tool's calls across runs, which Keel records only for "
                    f"{', '.join(CROSS_RUN_SUMS)} (use per: run, or per: order, which asks a human)",
                )
        bad = _rule_shape(rule, where)
        if bad:
            return bad
    return None


def _rule_shape(rule: ToolRule, where: str) -> tuple[str, str] | None:
    names = [c.name for c in rule.constraints] + [a.name for a in rule.approvals]
    names += [c.name for c in rule.cumulative]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        return where, f"rule name {dup!r} used twice; denials must name one rule"
    for i, a in enumerate(rule.approvals):
        c = a.when
        if (c.gt, c.gte, c.lt, c.lte, c.equals) != (None,) * 5 and not c.arg:
            return f"{where}.approvals[{i}].when", "a comparison needs 'arg'"
    return None


def _check_references(p: Policy) -> tuple[str, str] | None:
    """Cross-field checks pydantic cannot place on a path: returns (path, problem) or None."""
    for role, perms in p.roles.items():
        for i, perm in enumerate(perms):
            if not _NAME_RE.match(perm):
                return f"roles.{role}[{i}]", f"invalid permission {perm!r}"
    for tname, t in p.tenants.items():
        refs = [(f"tenants.{tname}.roles", r) for r in t.roles]
        refs += [(f"tenants.{tname}.users.{u}", r) for u, rs in t.users.items() for r in rs]
        for path, role in refs:
            if role not in p.roles:
                return (
                    path,
                    f"unknown role {role!r} (defined: {', '.join(sorted(p.roles)) or 'none'})",
                )
        if t.any_user and not t.roles:
            return f"tenants.{tname}.roles", 'users: "*" needs roles for those users'
    for tool, rule in p.tools.items():
        bad = _rule_shape(rule, f"tools.{tool}")
        if bad:
            return bad
    return None


def _strict_loader() -> Any:
    """A SafeLoader that refuses a key written twice in one mapping (YAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def policy_hash(text: str) -> str:
    """The identity of a policy's exact text (sha256 hex), recorded when a worker first uses it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_policy(text: str, source: str = "<policy>", tools: Sequence[ToolInfo] | None = None) -> Policy:
    """Parse and validate policy YAML; raises ``PolicyError`` with one line on any problem.

    ``tools`` is the tool catalogue (hidden tools included): when given, every tool and
    argument a rule names must exist in it. The worker always passes it.
    """
    import yaml  # here, not at module top: the workflow sandbox imports this module for the models

    try:
        raw = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"{source}: {where}invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: (top level): expected a mapping with 'version', 'tenants', ...")
    try:
        policy = Policy.model_validate(raw, context={"strict": True})
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise PolicyError(f"{source}: {_loc(err['loc'])}: {msg}{more}") from None
    bad = _check_references(policy) or (_check_catalogue(policy, tools) if tools is not None else None)
    if bad:
        raise PolicyError(f"{source}: {bad[0]}: {bad[1]}")
    return policy


def load_policy(path: str | Path, tools: Sequence[ToolInfo] | None = None) -> Policy:
    """Read and parse a policy file; a missing or unreadable file is a ``PolicyError`` too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy file: {e.strerror or e}") from None
    return parse_policy(text, str(path), tools)
