"""Human-readable rendering of responses and statuses (the ``--json`` forms are the models)."""

from __future__ import annotations

from keel.models import AgentResponse, RunStatus, StepRecord

__all__ = ["render_response", "render_status", "usd"]


def usd(micros: int) -> str:
    return f"${micros / 1_000_000:.6f}"


def _steps(steps: tuple[StepRecord, ...]) -> list[str]:
    if not steps:
        return ["  (no tool steps)"]
    width = max(len(s.tool) for s in steps)
    return [f"  {s.id:<5} {s.tool:<{width}}  {s.state.value:<16} {usd(s.cost_micros):>10}  "
            f"{(s.summary or s.error)[:90]}" for s in steps]


def render_response(r: AgentResponse, url: str) -> str:
    lines = [f"Run      {r.workflow_id}",
             f"Model    {r.model_label}",
             f"Outcome  {r.outcome}" + (f" — {r.reason}" if r.reason else ""),
             "", r.message, "", "Steps"]
    lines += _steps(r.steps)
    if r.compensated:
        lines.append(f"Rolled back: {', '.join(r.compensated)}")
    sp = r.spend
    lines += ["", f"Spend    {usd(sp.total_micros)} total"
              + "".join(f" · {k} {usd(v)}" for k, v in sorted(sp.by_tier.items()))
              + (f" · tools {usd(sum(sp.by_tool.values()))}" if sp.by_tool else ""),
              f"Cascade  {sp.cheapest_tier_calls}/{sp.model_calls} model calls on the cheapest tier"
              if sp.model_calls else "Cascade  no model calls",
              f"Policy   {r.policy_version or '-'}" + (f" · flags: {', '.join(r.flags)}" if r.flags else ""),
              f"Web UI   {url}"]
    return "\n".join(lines)


def render_status(st: RunStatus, temporal_status: str, url: str) -> str:
    lines = [f"Run      {st.workflow_id}",
             f"Status   {temporal_status} · phase {st.phase}" + (f" · outcome {st.outcome}" if st.outcome else ""),
             f"Model    {st.model_label}",
             f"Spend    {usd(st.spend.total_micros)} over {st.iterations} iteration(s)"]
    if st.waiting_for:
        lines.append(f"Waiting  {st.waiting_for}")
    lines += ["Steps", *_steps(st.steps), f"Web UI   {url}"]
    return "\n".join(lines)
