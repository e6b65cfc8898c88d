"""Pure decision logic for the agent loop: no I/O, no clock, no randomness.

Everything here is a function of its arguments, so the workflow can call it freely and replay
reaches the same answers. It resolves references between steps (``"${s1.total_usd}"``),
evaluates step conditions, applies the rule-based evaluator, and decides escape hatches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from keel.agent_io import RunLimits

__all__ = [
    "Limits",
    "ReferenceError_",
    "resolve_args",
    "condition_holds",
    "rule_score",
    "call_signature",
    "escape_hatch",
    "step_summary",
]

_REF = re.compile(r"^\$\{(s\d+)\.([A-Za-z_][A-Za-z0-9_]*)\}$")
_INLINE_REF = re.compile(r"\$\{(s\d+)\.([A-Za-z_][A-Za-z0-9_]*)\}")


class ReferenceError_(ValueError):
    """A plan referenced a step or field that does not exist (the plan is invalid)."""


Limits = RunLimits
"""Escape-hatch limits in force for a run (one model: policy defaults, request overrides)."""


def _lookup(results: Mapping[str, Mapping[str, Any]], step: str, field: str) -> Any:
    if step not in results:
        raise ReferenceError_(f"reference to {step}.{field}, but {step} has no result")
    data = results[step]
    if field not in data:
        raise ReferenceError_(f"reference to {step}.{field}, but {step} has no field {field!r}")
    return data[field]


def resolve_args(args: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Replace ``"${sN.field}"`` with earlier results; a whole-string reference keeps its type."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            whole = _REF.match(value)
            if whole:
                return _lookup(results, whole.group(1), whole.group(2))
            return _INLINE_REF.sub(lambda m: str(_lookup(results, m.group(1), m.group(2))), value)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    return {k: resolve(v) for k, v in args.items()}


def condition_holds(when: Mapping[str, Any] | None, results: Mapping[str, Mapping[str, Any]]) -> bool:
    """``{"step", "field", "equals"}`` (or ``not_equals``); a missing step result means False."""
    if not when:
        return True
    step, field = str(when.get("step", "")), str(when.get("field", ""))
    if step not in results or field not in results[step]:
        return False
    value = results[step][field]
    if "equals" in when:
        return bool(value == when["equals"])
    if "not_equals" in when:
        return bool(value != when["not_equals"])
    return bool(value)


def call_signature(tool: str, args: Mapping[str, Any]) -> str:
    """Canonical identity of a call, used to spot an agent repeating itself (thrashing)."""
    return tool + ":" + json.dumps(args, sort_keys=True, default=str)


def rule_score(states: Sequence[str]) -> float:
    """Rule evaluator: the share of executed (not skipped) steps that succeeded."""
    ran = [s for s in states if s != "skipped"]
    if not ran:
        return 1.0
    return round(sum(1 for s in ran if s == "succeeded") / len(ran), 3)


def escape_hatch(
    limits: Limits,
    *,
    tool_calls: int,
    consecutive_failures: int,
    signatures: Sequence[str],
    next_signature: str | None = None,
) -> str | None:
    """The escape hatch that fires before the next tool call, or ``None`` to go on."""
    if tool_calls >= limits.max_tool_calls:
        return f"tool_call_cap: {tool_calls} tool calls reached the cap of {limits.max_tool_calls}"
    if consecutive_failures >= limits.max_consecutive_failures:
        return (
            f"error_cascade: {consecutive_failures} consecutive failures "
            f"(limit {limits.max_consecutive_failures})"
        )
    if next_signature is not None:
        repeats = sum(1 for s in signatures if s == next_signature)
        if repeats >= limits.thrash_repeats:
            return (
                f"thrashing: the same call was about to run for the {repeats + 1}th time "
                f"({next_signature[:80]})"
            )
    return None


def step_summary(tool: str, args: Mapping[str, Any]) -> str:
    """Short label for the Web UI: ``tool issue_refund ORD-123``."""
    first = next((v for v in args.values() if isinstance(v, str | int | float)), "")
    return f"tool {tool} {first}".strip()[:100]
