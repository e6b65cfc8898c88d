"""What a request asks for, and whether a plan or its results address it: the rules half of
the evaluator, pure so the workflow can apply them before a plan's side effects run.

"Completed" must mean done. A model that answers "Done!" with no steps, or plans a refund of
another order, or refunds unconditionally when the request said "if it shipped", can look
fine to a score that only counts failed steps. These rules catch what a request states
plainly — the identifiers it names, the actions it asks for, a condition it sets — and leave
judgement to the model judge. They never call anything and never read the environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTIONS",
    "Intent",
    "claimed_effects",
    "intent_of",
    "plan_problems",
    "results_verdict",
    "step_view",
    "unaddressed",
]

_ID = re.compile(r"\b(?:ORD|SKU)-[A-Z0-9][A-Z0-9-]{0,40}\b")
_CONDITIONAL = re.compile(r"\bif (so|it is|it's|it has|shipped|delivered)\b|\bonly if\b|\bunless\b", re.I)

ACTIONS: dict[str, tuple[str, ...]] = {
    "issue_refund": ("refund",),
    "send_email": ("email", "e-mail", "notify", "tell the customer", "let the customer know"),
    "lookup_order": ("status", "where is", "check", "look up", "lookup", "shipped", "track", "find"),
    "check_inventory": ("stock", "inventory", "how many"),
}
"""Tool each kind of request calls for, by the words that ask for it (the demo catalogue)."""

_EFFECT_CLAIMS: dict[str, re.Pattern[str]] = {
    "issue_refund": re.compile(
        r"\brefunded\b|\brefund (has been|was|is) (issued|processed|made|sent)\b"
        r"|\b(issued|processed|sent|made) (a|the|your) refund\b",
        re.I,
    ),
    "send_email": re.compile(
        r"\b(e-?mailed|notified)\b|\b(sent|send) (an? |the )?(e-?mail|message|notification)\b"
        r"|\b(e-?mail|message) (has been|was) sent\b",
        re.I,
    ),
}
"""Phrases by which an answer claims a side effect happened, per tool that produces it."""


@dataclass(frozen=True)
class Intent:
    """The parts of a request the rules can check."""

    ids: tuple[str, ...] = ()
    """Order and SKU identifiers named in the request."""
    actions: tuple[str, ...] = ()
    """Tools the request's words ask for (``issue_refund``, ``send_email``, ...)."""
    conditional: bool = False
    """The request sets a condition ("refund it if it shipped")."""

    @property
    def actionable(self) -> bool:
        """It names something and asks for something: there is work no answer can replace."""
        return bool(self.ids) and bool(self.actions)


def intent_of(message: str) -> Intent:
    """Read the identifiers, actions and condition a request states."""
    lower = message.lower()
    actions = tuple(tool for tool, words in ACTIONS.items() if any(w in lower for w in words))
    if _ID.search(message) and not actions:
        actions = ("lookup_order",) if "ORD-" in message else ("check_inventory",)
    return Intent(
        ids=tuple(dict.fromkeys(_ID.findall(message))),
        actions=actions,
        conditional=bool(_CONDITIONAL.search(message)),
    )


def _mentions(value: Any, ident: str) -> bool:
    return ident in json.dumps(value, default=str, sort_keys=True)


def unaddressed(message: str, steps: Iterable[Mapping[str, Any]]) -> str:
    """Why the request's actionable intent was not addressed by ``steps``, or ``""``.

    ``steps`` are executed steps (``tool``, ``args``, ``state``, ``result``) or planned ones
    (``tool``, ``args``): a request naming ``ORD-123`` and asking for an action is addressed
    only if some step that ran (or will run) touches ``ORD-123``.
    """
    intent = intent_of(message)
    if not intent.actionable:
        return ""
    touched = [s for s in steps if s.get("state") not in ("skipped", "denied")]
    for ident in intent.ids:
        if not any(_mentions(s.get("args"), ident) or _mentions(s.get("result"), ident) for s in touched):
            what = ", ".join(a.replace("_", " ") for a in intent.actions)
            return f"the request names {ident} and asks to {what}, but no step touched {ident}"
    return ""


def step_view(r: Any) -> dict[str, Any]:
    """A step record (``keel.models.StepRecord``) as the intent rules and the deterministic
    answer read it."""
    return {
        "id": r.id,
        "tool": r.tool,
        "args": r.args,
        "state": r.state.value,
        "result": r.result or {},
        "data": r.result or {},
        "summary": r.summary,
        "error": r.error,
    }


def results_verdict(
    message: str, executed: Sequence[Any], history: Sequence[Any] = ()
) -> tuple[float, float, str, str]:
    """The rules' score of an iteration's executed steps: ``(score, confidence, reason,
    problem)``. The share of steps that ran and succeeded with a result, unless the request's
    intent is left unaddressed by every step of the run (``history`` and ``executed``), which
    scores 0. The ``evaluate`` activity combines this with a judge's score; a run without a
    judge applies it in the workflow (the same function, so both give the same verdict)."""
    ran = [r for r in executed if r.state.value != "skipped"]
    ok = [r for r in ran if r.state.value == "succeeded" and r.result]
    score = 1.0 if not ran else round(len(ok) / len(ran), 3)
    confidence = 0.9 if ran else 0.6
    reason = f"rules: {len(ok)} of {len(ran)} executed steps succeeded with a result"
    problem = unaddressed(message, [step_view(r) for r in (*history, *executed)])
    if problem:
        score, confidence = 0.0, 0.9
        reason = f"rules: not done: {problem}"
    return score, confidence, reason[:300], problem


def plan_problems(
    message: str,
    steps: Sequence[Mapping[str, Any]],
    side_effect_tools: set[str],
    *,
    whole: bool = True,
) -> str:
    """Why a plan must not run its side effects as it stands, or ``""``.

    Only for an actionable request (it names an order or SKU and asks for something); then,
    checked before any step runs, every side-effecting step must be asked for by the request,
    must stay within the identifiers the request names (or values earlier steps produce),
    and must be conditional when the request sets a condition; the plan must touch what the
    request names (unless ``whole`` is false: ``steps`` is only the part before a step the
    gate will deny, and the run stops there).
    """
    intent = intent_of(message)
    if not intent.actionable:
        return ""  # a request that states nothing specific gives the rules nothing to hold to
    for s in steps:
        tool = str(s.get("tool", ""))
        if tool not in side_effect_tools:
            continue
        act = f"step {s.get('id')} would {tool.replace('_', ' ')}"
        if tool in ACTIONS and tool not in intent.actions:
            return f"{act}, which the request does not ask for"
        named = set(_ID.findall(json.dumps(s.get("args"), default=str)))
        stray = sorted(named - set(intent.ids))
        if stray:
            return f"{act} on {stray[0]}, which the request does not name"
        if intent.conditional and not s.get("when"):
            return f"{act} unconditionally, but the request sets a condition"
    return unaddressed(message, steps) if whole else ""


def claimed_effects(answer: str, executed: Iterable[Mapping[str, Any]]) -> str:
    """An effect the answer claims that no succeeded step produced, or ``""``."""
    done = {str(s.get("tool")) for s in executed if s.get("state") == "succeeded"}
    for tool, claim in _EFFECT_CLAIMS.items():
        if tool in done:
            continue
        for match in claim.finditer(answer):
            before = re.split(r"[.!?;]", answer[max(0, match.start() - 30) : match.start()])[-1]
            if _NEGATED.search(before):
                continue  # "no refund was made", "I have not e-mailed"
            return f"the answer says {match.group(0)!r}, but no {tool} step succeeded"
    return ""


_NEGATED = re.compile(r"\b(no|not|never|without|nothing)\b|n't\b", re.I)
