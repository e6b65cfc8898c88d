"""What the Web UI's "Current Details" says about a run, at every moment.

Pure text from the run's record: the phase, the step in flight, the spend so far, and for a
wait on a person exactly what is asked, by which rule, and how to answer. Money is written
as dollars (``keel.money``). The workflow sets it with ``workflow.set_current_details``
whenever any of these change (``RunState``), so it is never stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.money import usd

__all__ = ["approval_details", "args_text", "phase_details", "rule_text"]

_PHASES = {
    "starting": "starting",
    "authorizing": "authorizing the user and checking the input",
    "planning": "planning",
    "executing": "executing the plan",
    "evaluating": "evaluating the results",
    "compensating": "rolling back side effects, newest first",
    "finishing": "writing the answer",
}


def _value(name: str, value: Any) -> str:
    if name.endswith("_usd") and not isinstance(value, bool):
        try:
            return usd(round(float(str(value)) * 1_000_000))
        except (ValueError, OverflowError):
            pass  # not a finite number after all: show it as it is
    if isinstance(value, dict | list | tuple):
        # Never str() a container: a hostile plan nests thousands deep, and a RecursionError
        # here would fail the workflow task instead of letting the gate deny the step.
        return f"<{type(value).__name__} of {len(value)}>"
    text = (
        str(value).replace("\n", " ") if isinstance(value, str | int | float | bool) else type(value).__name__
    )
    return text if len(text) <= 40 else text[:37] + "..."


def args_text(args: Mapping[str, Any]) -> str:
    """``order_id=ORD-125, amount_usd=$250.00`` (long values cut, money as dollars)."""
    return ", ".join(f"{k}={_value(k, v)}" for k, v in args.items())


def rule_text(when: Any) -> str:
    """``amount_usd > $100.00`` from an approval rule's condition (empty when unconditional)."""
    arg = getattr(when, "arg", None)
    if not arg:
        return ""
    parts = [
        f"{arg} {op} {_value(arg, bound)}"
        for op, bound in ((">", when.gt), (">=", when.gte), ("<", when.lt), ("<=", when.lte))
        if bound is not None
    ]
    if when.equals is not None:
        parts.append(f"{arg} = {when.equals}")
    return " and ".join(parts)


def approval_details(
    wid: str,
    step_id: str,
    tool: str,
    args: Mapping[str, Any],
    rule: str,
    condition: str,
    timeout_seconds: int,
    on_timeout: str,
) -> str:
    """The wait, in one line a person can act on."""
    why = f"rule {rule}" + (f" ({condition})" if condition else "")
    return (
        f"waiting for approval: {step_id} {tool} {args_text(args)} — {why} — answer with "
        f"`keel approve {wid}` (or `--reject`); {on_timeout} by itself after {_duration(timeout_seconds)}"
    )


def phase_details(phase: str, *, iteration: int, spent_micros: int, outcome: str, running: str) -> str:
    if phase == "done":
        return f"done: {outcome or 'finished'} — spent {usd(spent_micros)}"
    what = _PHASES.get(phase, phase)
    if phase == "planning" and iteration:
        what = f"planning (iteration {iteration})"
    if phase == "executing" and running:
        what = f"running {running}"
    if phase == "finishing" and outcome:
        what = f"writing the answer (outcome {outcome})"
    return f"{what} — spent {usd(spent_micros)} so far"


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
