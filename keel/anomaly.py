"""Run-shape anomaly flags: a pure function of what a run did, for operators to alert on.

Escape hatches *stop* a run; flags only *mark* one that looks wrong while staying inside
its limits, so that an operator sees it (search attribute ``KeelFlags``, an audit row, the
response, and the ``keel.run.flags`` metric that the Prometheus alerts read):

* ``near_miss_thrash`` — the same call repeated up to one short of the thrashing hatch, or
  calls that differ only in trivia the exact-match hatch does not see (case, spacing,
  ``42.5`` vs ``"42.50"``);
* ``fan_out`` — one plan with more steps than ``max_fan_out``;
* ``cost_spike`` — the run cost more than ``cost_factor`` x the p95 of the tenant's recent
  runs of the same agent (read from PostgreSQL by ``finish_run``; no flag until
  ``cost_min_runs`` runs exist, so a new tenant is not flagged on its first run, and none
  for runs under ``cost_min_micros``);
* ``long_loop`` — ``loop_iterations`` plan/act iterations or ``loop_tool_calls`` tool
  calls;
* ``high_error_rate`` — at least ``error_min_calls`` failed calls, and failures make up
  ``error_rate`` or more of the calls that ran.

No I/O, clock or randomness here: the same run shape always gives the same flags.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from keel.models import Frozen

__all__ = [
    "ANOMALY_FLAGS",
    "AnomalyLimits",
    "CallShape",
    "RunFlag",
    "RunShape",
    "canonical_call",
    "could_spike",
    "run_flags",
]

ANOMALY_FLAGS = ("near_miss_thrash", "fan_out", "cost_spike", "long_loop", "high_error_rate")


class AnomalyLimits(Frozen):
    """Thresholds; ``from_env`` reads ``KEEL_FLAG_<FIELD>`` (e.g. ``KEEL_FLAG_COST_FACTOR=5``)."""

    max_fan_out: int = Field(default=6, ge=1)
    """Steps in one plan above which the run is flagged ``fan_out``."""
    cost_factor: float = Field(default=3.0, gt=0)
    """``cost_spike`` when spend > this x the p95 of recent runs."""
    cost_min_runs: int = Field(default=5, ge=1)
    """Recent runs needed before a p95 means anything."""
    cost_window: int = Field(default=50, ge=1)
    """How many of the tenant's latest runs of the agent the p95 is taken over."""
    cost_min_micros: int = Field(default=10_000, ge=0)
    """Spend below this ($0.01) is never a spike: among near-free runs a ratio is noise (a
    $0.002 refund run is 3x a tenant's $0.0006 lookups, and nobody should be paged for it)."""
    loop_iterations: int = Field(default=3, ge=1)
    loop_tool_calls: int = Field(default=10, ge=1)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    error_min_calls: int = Field(default=2, ge=1)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AnomalyLimits:
        """Thresholds from ``KEEL_FLAG_*``; a bad value is one clear error naming the variable."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(f"KEEL_FLAG_{name.upper()}", "").strip()
            if raw:
                values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"KEEL_FLAG_{str(err['loc'][0]).upper()}: {err['msg']}") from None


class CallShape(Frozen):
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    state: str = "succeeded"


class RunShape(Frozen):
    """What a run did, as far as the flags care."""

    calls: tuple[CallShape, ...] = ()
    plan_sizes: tuple[int, ...] = ()
    iterations: int = 0
    spend_micros: int = 0
    baseline_runs: int = 0
    """How many recent runs of this tenant and agent the p95 below was taken over."""
    baseline_p95_micros: float = 0.0
    thrash_repeats: int = 3
    """The run's thrashing limit (an exact call may run this many times)."""
    hatches: tuple[str, ...] = ()
    """Flags the run already carries (``thrashing`` means the hatch fired: no near miss)."""


class RunFlag(Frozen):
    name: str
    detail: str


_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def _canon(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        try:
            return round(float(value), 6)
        except OverflowError:  # an int beyond float range (a planner's 10**400): exact, as text
            return str(value)
    if isinstance(value, str):
        text = _SPACE.sub(" ", value).strip().lower()
        return round(float(text), 6) if _NUMBER.match(text) else text
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        return {str(k).strip().lower(): _canon(v) for k, v in value.items()}
    return str(value)


def canonical_call(tool: str, args: Mapping[str, Any]) -> str:
    """A call's identity up to trivia (case, spacing, number spelling): near misses match."""
    return tool + ":" + json.dumps(_canon(dict(args)), sort_keys=True, default=str)


def could_spike(spend_micros: int, limits: AnomalyLimits) -> bool:
    """Whether any baseline could make ``spend_micros`` a ``cost_spike``: never under
    ``cost_min_micros``, never at zero (a spike is spend above a positive p95). The finish
    skips the baseline read for a run that could not (``keel.activities.flags``)."""
    return spend_micros > 0 and spend_micros >= limits.cost_min_micros


def run_flags(shape: RunShape, limits: AnomalyLimits = AnomalyLimits()) -> tuple[RunFlag, ...]:
    """The anomaly flags of one run, in ``ANOMALY_FLAGS`` order."""
    flags: list[RunFlag] = []
    ran = [c for c in shape.calls if c.state in ("succeeded", "failed")]
    near = max(2, shape.thrash_repeats - 1)
    if ran and "thrashing" not in shape.hatches:
        counts = Counter(canonical_call(c.tool, c.args) for c in ran)
        sig, n = counts.most_common(1)[0]
        if n >= near:
            flags.append(
                RunFlag(
                    name="near_miss_thrash",
                    detail=f"{sig.split(':', 1)[0]} ran {n} times with the same arguments "
                    f"(thrashing stops a run after {shape.thrash_repeats})",
                )
            )
    widest = max(shape.plan_sizes, default=0)
    if widest > limits.max_fan_out:
        flags.append(RunFlag(name="fan_out", detail=f"a plan of {widest} steps (limit {limits.max_fan_out})"))
    p95 = shape.baseline_p95_micros
    if (
        could_spike(shape.spend_micros, limits)
        and shape.baseline_runs >= limits.cost_min_runs
        and p95 > 0
        and shape.spend_micros > limits.cost_factor * p95
    ):
        flags.append(
            RunFlag(
                name="cost_spike",
                detail=f"spent {shape.spend_micros} uUSD, {shape.spend_micros / p95:.1f}x the p95 "
                f"({p95:.0f} uUSD) of the last {shape.baseline_runs} runs (limit {limits.cost_factor:g}x)",
            )
        )
    if shape.iterations >= limits.loop_iterations or len(ran) >= limits.loop_tool_calls:
        flags.append(
            RunFlag(
                name="long_loop",
                detail=f"{shape.iterations} iterations, {len(ran)} tool calls (flagged at "
                f"{limits.loop_iterations} iterations or {limits.loop_tool_calls} calls)",
            )
        )
    failed = sum(1 for c in ran if c.state == "failed")
    if failed >= limits.error_min_calls and failed / len(ran) >= limits.error_rate:
        flags.append(
            RunFlag(
                name="high_error_rate",
                detail=f"{failed} of {len(ran)} tool calls failed (flagged at {limits.error_rate:.0%})",
            )
        )
    return tuple(flags)
