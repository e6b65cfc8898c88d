"""Human-readable rendering of responses and statuses (the ``--json`` forms are the models)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from keel.models import AgentResponse, RunStatus, StepRecord
from keel.money import usd as _usd
from keel.redact import redact

__all__ = ["Progress", "render_response", "render_status", "usd"]


def usd(micros: int) -> str:
    return _usd(micros)


def _steps(steps: tuple[StepRecord, ...]) -> list[str]:
    if not steps:
        return ["  (no tool steps)"]
    width = max(len(s.tool) for s in steps)
    return [
        f"  {s.id:<5} {s.tool:<{width}}  {s.state.value:<16} {usd(s.cost_micros):>10}  "
        f"{(s.summary or s.error)[:90]}"
        for s in steps
    ]


def render_response(r: AgentResponse, url: str) -> str:
    lines = [
        f"Run      {r.workflow_id}",
        f"Model    {r.model_label}",
        f"Outcome  {r.outcome}" + (f" — {r.reason}" if r.reason else ""),
        "",
        r.message,
        "",
        "Steps",
    ]
    lines += _steps(r.steps)
    if r.compensated:
        lines.append(f"Rolled back: {', '.join(r.compensated)}")
    sp = r.spend
    lines += [
        "",
        f"Spend    {usd(sp.total_micros)} total"
        + "".join(f" · {k} {usd(v)}" for k, v in sorted(sp.by_tier.items()))
        + (f" · tools {usd(sum(sp.by_tool.values()))}" if sp.by_tool else ""),
        f"Cascade  {sp.cheapest_tier_calls}/{sp.model_calls} model calls on the cheapest tier"
        if sp.model_calls
        else "Cascade  no model calls",
        f"Policy   {r.policy_version or '-'}" + (f" · flags: {', '.join(r.flags)}" if r.flags else ""),
        f"Web UI   {url}",
    ]
    return "\n".join(lines)


def render_status(st: RunStatus, temporal_status: str, url: str) -> str:
    lines = [
        f"Run      {st.workflow_id}",
        f"Status   {temporal_status} · phase {st.phase}" + (f" · outcome {st.outcome}" if st.outcome else ""),
        f"Model    {st.model_label}",
        f"Spend    {usd(st.spend.total_micros)} over {st.iterations} iteration(s)",
    ]
    if st.waiting_for:
        lines.append(f"Waiting  {st.waiting_for}")
    lines += ["Steps", *_steps(st.steps), f"Web UI   {url}"]
    return "\n".join(lines)


_ICONS = {
    "pending": ("·", "."),
    "running": ("▸", ">"),
    "waiting_approval": ("⏸", "?"),
    "succeeded": ("✓", "+"),
    "failed": ("✗", "x"),
    "skipped": ("↷", "-"),
    "denied": ("⊘", "!"),
    "compensated": ("↺", "<"),
}
_PHASES = {
    "authorizing": "authorizing the user and checking the input",
    "planning": "planning",
    "executing": "executing the plan",
    "evaluating": "evaluating the results",
    "waiting_approval": "waiting for a human",
    "compensating": "rolling back side effects",
    "finishing": "writing the answer",
}


class Progress:
    """Turns successive ``RunStatus`` snapshots into progress lines for ``run --follow``.

    Each phase change and each step state change prints once (so piped output is a clean
    log); on a terminal a live line below them shows a spinner, elapsed time and spend.
    """

    def __init__(
        self,
        workflow_id: str,
        url: str,
        *,
        tty: bool,
        unicode: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workflow_id, self.url, self.tty, self.unicode = workflow_id, url, tty, unicode
        self._clock, self._t0 = clock, clock()
        self._phase, self._waiting, self._ticks, self._live = "", "", 0, False
        self._steps: dict[str, str] = {}

    def header(self) -> str:
        return f"{'▶' if self.unicode else '>'} {self.workflow_id}  ({self.url})"

    def update(self, st: RunStatus) -> list[str]:
        """The lines that are new since the previous snapshot."""
        lines: list[str] = []
        t = f"{self._clock() - self._t0:5.1f}s"
        if st.phase != self._phase and st.phase != "done":
            self._phase = st.phase
            extra = f" · iteration {st.iterations}" if st.phase == "planning" else ""
            lines.append(f"{t}  {_PHASES.get(st.phase, st.phase)}{extra}")
        for r in st.steps:
            if self._steps.get(r.id) == r.state.value:
                continue
            self._steps[r.id] = r.state.value
            icon = _ICONS.get(r.state.value, ("•", "*"))[0 if self.unicode else 1]
            detail = (r.error or r.summary).replace("\n", " ")[:70]
            cost = f" {usd(r.cost_micros)}" if r.cost_micros else ""
            lines.append(
                f"{'':6}   {icon} {r.id:<4} {r.tool:<14} {r.state.value:<11}{cost}"
                + (f"  {detail}" if detail else "")
            )
        if st.waiting_for and st.waiting_for != self._waiting:
            lines.append(f"{'':6}   waiting: {st.waiting_for}")
            lines.append(
                f"{'':6}   answer with: starter.py approve {self.workflow_id} [--reject --reason ...]"
            )
        self._waiting = st.waiting_for
        if st.phase == "done" and self._phase != "done":
            self._phase = "done"
            lines.append(
                f"{t}  done · {st.outcome or 'finished'} · spent "
                f"{usd(st.spend.total_micros)} in {st.iterations} iteration(s)"
            )
        return lines

    def tick(self, st: RunStatus | None) -> None:
        """Redraw the live line (terminals only)."""
        if not self.tty:
            return
        self._ticks += 1
        spin = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if self.unicode else "|/-\\"
        phase = _PHASES.get(st.phase, st.phase) if st else "waiting for a worker"
        spent = f" · {usd(st.spend.total_micros)}" if st else ""
        print(
            f"\r\x1b[K{spin[self._ticks % len(spin)]} {self._clock() - self._t0:5.1f}s {phase}{spent}",
            end="",
            file=sys.stderr,
            flush=True,
        )
        self._live = True

    def emit(self, line: str | None) -> None:
        """Print ``line`` above the live line; ``None`` just clears the live line."""
        if self._live:
            print("\r\x1b[K", end="", file=sys.stderr)
            self._live = False
        if line is not None:  # step summaries and errors carry tool output: redact
            print(redact(line), file=sys.stderr, flush=True)
