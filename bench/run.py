"""Run every Keel benchmark against services of its own and write the results as Markdown.

    python bench/run.py                              # full sizes -> bench/RESULTS.md
    python bench/run.py --smoke --out /tmp/x.md      # tiny sizes, < ~30 s
    python bench/run.py --only step,history          # a subset

Starts a Temporal dev server and a PostgreSQL in a temporary folder on free ports (never a
developer's), runs the benchmarks one after another, and stops everything it started, also
on failure. A benchmark that fails or cannot run here is reported as such; the rest go on.
Ratios are only ever computed between figures measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Bytecode is cached, as for an installed package. With PYTHONDONTWRITEBYTECODE set (some
# shells and CI images set it) no ``.pyc`` is ever written, and Temporal's sandbox, which
# re-imports a workflow's module for every new run, compiled it from source each time:
# ~11 ms per run for keel.workflows.agent alone on a loaded 2-core VM, and the floor's and the
# peer's workflow modules likewise. That is an artefact of the shell, not a cost of a run.
sys.dont_write_bytecode = False

__all__ = ["main"]

ALL = ("step", "history", "throughput", "peer", "recovery", "ledger", "model_cost")


def _machine(settings: Any, pg_version: str) -> dict[str, Any]:
    from importlib.metadata import version

    from keel.devservices import temporal_binary

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    cli = subprocess.run([str(temporal_binary()), "--version"], capture_output=True, text=True)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    try:
        peer = version("pydantic-ai-slim")
    except Exception:
        peer = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "temporal_cli": cli.stdout.strip().splitlines()[0] if cli.stdout else "unknown",
        "postgresql": pg_version,
        "pydantic_ai_slim": peer,
        "git": git + (" (with uncommitted changes)" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


async def _external(module: str, candidates: dict[str, Any]) -> dict[str, Any]:
    """Run another engineer's ``bench/<module>.py`` if present, passing what its ``run`` takes."""
    try:
        mod = importlib.import_module(f"bench.{module}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.{module}",):
            return {"skipped": f"bench/{module}.py is not in this checkout"}
        raise
    fn = getattr(mod, "run", None)
    if fn is None:
        return {"skipped": f"bench/{module}.py has no run()"}
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in candidates.items() if k in params}
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result if isinstance(result, dict) else {"result": result}


async def _run_all(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from bench.common import own_services
    from keel.client import connect
    from keel.db import open_pool

    only = [b.strip() for b in args.only.split(",")] if args.only else list(ALL)
    results: dict[str, Any] = {}
    with own_services() as settings:
        client = await connect(settings)
        pool = await open_pool(settings.database_url, max_size=20)
        try:
            async with pool.connection() as conn:
                pg = (await (await conn.execute("show server_version")).fetchone() or ["?"])[0]
            machine = _machine(settings, str(pg))
            print(
                f"services up: temporal {settings.temporal_address}, postgres :{settings.pg_port}", flush=True
            )
            runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "step": lambda: _mod("bench_step").run(client, pool, settings, smoke=args.smoke),
                "history": lambda: _mod("bench_history").run(client, pool, settings, smoke=args.smoke),
                "throughput": lambda: _mod("bench_throughput").run(client, pool, settings, smoke=args.smoke),
                "peer": lambda: _mod("bench_peer").run(client, pool, settings, smoke=args.smoke),
                "model_cost": lambda: _mod("bench_model_cost").run(client, pool, settings, smoke=args.smoke),
                "recovery": lambda: _external(
                    "bench_recovery",
                    {
                        "settings": settings,
                        "url": settings.database_url,
                        "client": client,
                        "pool": pool,
                        "smoke": args.smoke,
                    },
                ),
                "ledger": lambda: _external(
                    "bench_ledger",
                    {"url": settings.database_url, "owner_url": settings.owner_url, "smoke": args.smoke},
                ),
            }
            for name in only:
                print(f"[{name}] running ...", flush=True)
                t0 = time.perf_counter()
                try:
                    results[name] = await runners[name]()
                except Exception as e:  # one failing benchmark must not hide the others
                    results[name] = {
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=6),
                    }
                results[name]["_seconds"] = round(time.perf_counter() - t0, 1)
                print(
                    f"[{name}] done in {results[name]['_seconds']} s"
                    + (f" — {results[name]['error']}" if "error" in results[name] else ""),
                    flush=True,
                )
            machine["loadavg_end"] = os.getloadavg()
        finally:
            await pool.close()
    return machine, results


def _mod(name: str) -> Any:
    return importlib.import_module(f"bench.{name}")


# ---------------------------------------------------------------------------- Markdown
def _s(d: dict[str, Any] | None, unit: str = "ms") -> str:
    """A spread as ``p50 (p90 / p99, min-max, n)``."""
    if not d or not d.get("n"):
        return "-"
    return f"{d['p50']} {unit} (p90 {d['p90']}, p99 {d['p99']}, min {d['min']}-max {d['max']}, n={d['n']})"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _problem(r: dict[str, Any]) -> str | None:
    if "error" in r:
        return f"**Failed:** `{r['error']}`\n\n```\n{r.get('traceback', '').strip()}\n```"
    if "skipped" in r:
        return f"**Not run:** {r['skipped']}"
    return None


def _step_md(r: dict[str, Any]) -> str:
    big = r["steps_big"]
    rows = []
    keel_label = "Keel step (permission decision + run_tool: audit, reserve, effect, commit + rules)"
    for kind, label in (
        ("keel", keel_label + ", quick tool: run_tool a local activity"),
        ("keel_activity", "the same Keel step, tool declared local=False: run_tool an activity"),
        ("floor", "floor: 1 trivial activity"),
        ("floor_la", "floor+LA: 1 trivial local activity + 1 activity"),
    ):
        v = r[kind]
        rows.append(
            [
                label,
                f"**{v['per_step_ms']}**",
                _s(v["per_step_pairs_ms"]),
                v["fixed_ms"],
                v["events_per_step"],
                _s(v["history_step_ms"].get("interval")),
            ]
        )
    parts = []
    for kind in ("keel_activity", "floor", "floor_la"):  # the local step has no activity events
        h = r[kind]["history_step_ms"]
        parts.append(
            [kind]
            + [h.get(k, {}).get("p50", "-") for k in ("interval", "execute", "wft_wait", "wft", "queue")]
        )
    ip = r.get("in_process_ms", {})
    verdict = "within" if r["ratio"] <= r["target_ratio"] else "ABOVE"
    return "\n\n".join(
        [
            f"Per step = (median run time at N={big} - median at N=1) / {big - 1}; "
            f"{r['rounds']} interleaved rounds. Fixed = per-run cost outside the steps.",
            _table(
                [
                    "shape",
                    "per step ms (medians)",
                    "per step, per round pair",
                    "fixed ms/run",
                    "history events/step",
                    "step interval from history",
                ],
                rows,
            ),
            f"**Ratio Keel / floor: {r['ratio']}x** (target ≤ {r['target_ratio']}x: {verdict}); "
            f"Keel / floor+LA: {r['ratio_vs_floor_la']}x. "
            f"**Activity-path Keel step / floor: {r.get('activity_ratio')}x** (MCP, sandboxed, "
            "rate-limited and `local=False` tools). "
            + (
                f"**Fixed per-run cost Keel / floor: {r['fixed_ratio']}x** "
                f"({r['keel']['fixed_ms']} vs {r['floor']['fixed_ms']} ms; history events outside "
                f"the steps: {r['keel']['events_fixed']} vs {r['floor']['events_fixed']})."
                if "fixed_ratio" in r
                else ""
            ),
            "Where a step's time goes (p50 ms, from history timestamps; `execute` = activity "
            "started->completed, `wft_wait` = activity completed->next workflow task started, "
            "`wft` = workflow task started->completed, which includes local activities):",
            _table(["shape", "interval", "execute", "wft_wait", "wft", "queue"], parts),
            "Measured in-process inside the Keel worker: "
            f"`authorize_step` (local activity; only denials and approvals use it since the "
            f"one-round-trip step) {_s(ip.get('authorize_step'))}; "
            f"`run_tool` body {_s(ip.get('run_tool'))}; workflow-side "
            f"`Policy.model_validate(snapshot)` {ip.get('policy_model_validate')} ms and "
            f"`check_tool_call` {ip.get('check_tool_call')} ms per step (CPU, outside the sandbox)."
            + (
                f" PostgreSQL transactions per Keel step: {r['pg_commits_per_step']}."
                if r.get("pg_commits_per_step") is not None
                else ""
            ),
            _codec_md(r.get("codec")),
        ]
    )


def _codec_md(c: dict[str, Any] | None) -> str:
    if not c or not c.get("enabled"):
        return "Payload codec: not measured (the client has no codec)."
    verdict = "within" if c["per_step_ms"] <= c["goal_ms"] else "ABOVE"
    return (
        f"**Payload encryption (AES-256-GCM codec) per Keel step: {c['per_step_ms']} ms** "
        f"(goal ≤ {c['goal_ms']} ms: {verdict}), {c['payloads_per_step']} payloads encoded or "
        f"decoded per step by worker and client, timed around every codec call in this same run; "
        f"per run: " + "; ".join(f"N={n} {_s(v)}" for n, v in c["per_run_ms"].items()) + ". One encode + "
        f"decode of a {c.get('bytes')}-byte payload: {c.get('round_trip_us')} µs."
    )


def _history_md(r: dict[str, Any]) -> str:
    lr, pj, lim = r["long_run"], r["projection"], r["limits"]
    rows = [
        ["per agent step (N=10 - N=1) / 9", r["per_step"]["events"], r["per_step"]["bytes"]],
        ["fixed per run", r["fixed"]["events"], r["fixed"]["bytes"]],
        [f"{lr['steps']}-step run ({lr['wall_s']} s)", lr["events"], lr["bytes"]],
    ]
    if "demo_task" in r:
        d = r["demo_task"]
        rows.append([f"demo 3-tool task ({' -> '.join(d['tools'])})", d["events"], d["bytes"]])
    return "\n\n".join(
        [
            _table(["run", "history events", "history bytes"], rows),
            f"A {lr['steps']}-step run uses {pj['long_run_share_of_event_limit_pct']} % of the "
            f"{lim['events']:,}-event limit and {pj['long_run_share_of_byte_limit_pct']} % of the "
            f"50 MB limit; largest single event {lr['largest_event_bytes']:,} bytes "
            f"({lr['largest_event_type']}; payload limit 2 MB). At these rates a run reaches the "
            f"event limit after ~{pj['steps_to_event_limit']:,} steps and the byte limit after "
            f"~{pj['steps_to_byte_limit']:,} steps (events bind first).",
        ]
    )


def _throughput_md(r: dict[str, Any]) -> str:
    rows = []
    for n, v in sorted(r["by_workers"].items(), key=lambda kv: int(kv[0])):
        c = v["cpu_ms_per_run"]
        rows.append(
            [
                n,
                f"**{v['runs_per_s']}**",
                f"{v['completed']}/{r['runs_per_batch']}",
                v["wall_s"],
                v["cpu_ms_per_run_total"],
                c.get("workers"),
                c.get("temporal"),
                c.get("postgres"),
                f"{v['server_cpu_share_pct']} %",
                f"{v['cpu_utilisation_pct_of_all_cores']} %",
            ]
        )
    return "\n\n".join(
        [
            f"Task: {r['task']}; {r['runs_per_batch']} runs started at once per batch.",
            _table(
                [
                    "worker processes",
                    "runs/s",
                    "completed",
                    "wall s",
                    "CPU ms/run (all)",
                    "workers",
                    "dev server",
                    "PostgreSQL",
                    "dev server share",
                    "CPU used of all cores",
                ],
                rows,
            ),
            f"Scaling 2 vs 1 worker processes: **{r.get('scaling', '-')}x**.",
        ]
    )


def _peer_md(r: dict[str, Any]) -> str:
    rows = []
    for kind in ("keel", "peer"):
        v = r[kind]
        rows.append(
            [
                kind,
                f"**{v['per_step_ms']}**",
                _s(v["per_step_pairs_ms"]),
                _s(v["task_ms"]),
                f"**{v['runs_per_s']}**",
                v["task_history_events"],
                v["task_history_bytes"],
            ]
        )
    return "\n\n".join(
        [
            f"Peer model: {r['model']}. Both run in-process on one worker each, interleaved; "
            f"{r['rounds']} rounds, per step from N=1 vs N={r['steps_big']} noop runs; runs/s "
            f"from {r['batch']} concurrent demo tasks, the median of {r.get('batches', 1)} interleaved "
            f"batches (throughput ratio: the median of adjacent pairs, "
            f"{r.get('throughput_pair_ratios', [])}).",
            _table(
                [
                    "system",
                    "per step ms",
                    "per step, per round pair",
                    "3-tool task latency",
                    "runs/s",
                    "task history events",
                    "task history bytes",
                ],
                rows,
            ),
            f"Keel / peer: per step **{r['per_step_ratio_keel_over_peer']}x**, task latency "
            f"**{r['task_latency_ratio_keel_over_peer']}x**, throughput "
            f"**{r['throughput_ratio_keel_over_peer']}x** (above 1 = Keel faster for throughput, "
            "slower for latency).",
        ]
    )


def _generic_md(r: dict[str, Any]) -> str:
    if isinstance(r.get("markdown"), str):
        return r["markdown"]
    body = {k: v for k, v in r.items() if not k.startswith("_")}
    return "```json\n" + json.dumps(body, indent=2, default=str) + "\n```"


_SECTIONS = (
    ("step", "1. Per-step overhead: Keel vs the bare Temporal floor", _step_md),
    ("history", "2. History size per step and for a long run", _history_md),
    ("throughput", "3. Throughput and scaling (worker processes)", _throughput_md),
    ("peer", "4. Peer: pydantic-ai's Temporal integration, same task, same server", _peer_md),
    ("recovery", "5. Recovery (bench/bench_recovery.py)", _generic_md),
    ("ledger", "6. Budget ledger (bench/bench_ledger.py)", _generic_md),
    ("model_cost", "7. Judge and answer cost on the offline path (bench/bench_model_cost.py)", _generic_md),
)


TARGETS = {
    "fixed": 2.0,  # a run's fixed cost / a bare workflow's, at most
    "step": 1.3,  # a controlled step / a bare activity round trip, at most
    "events": 1.0,  # history events of the demo task / the peer's, at most
    "runs": 1.2,  # demo-task runs/s / the peer's, at least
}
"""Issue 23's throughput targets, each a ratio between two figures of the same run."""


def _targets(results: dict[str, Any]) -> list[list[Any]]:
    """One row per target the run measured: figure, ratio, target, met or not."""

    def ok(r: dict[str, Any] | None, *keys: str) -> bool:
        return bool(r) and "error" not in r and "skipped" not in r and all(k in r for k in keys)

    rows: list[list[Any]] = []
    step, peer = results.get("step"), results.get("peer")
    if ok(step, "keel", "floor", "ratio"):
        k, f = step["keel"], step["floor"]  # type: ignore[index]
        fixed = step.get("fixed_ratio") or round(k["fixed_ms"] / f["fixed_ms"], 2)  # type: ignore[union-attr]
        rows.append(
            [
                "fixed per-run cost vs a bare workflow",
                f"{k['fixed_ms']} vs {f['fixed_ms']} ms",
                f"{fixed}x",
                f"≤ {TARGETS['fixed']}x",
                fixed <= TARGETS["fixed"],
            ]
        )
        ratio = step["ratio"]  # type: ignore[index]
        rows.append(
            [
                "controlled step vs a bare activity round trip",
                f"{k['per_step_ms']} vs {f['per_step_ms']} ms",
                f"{ratio}x",
                f"≤ {TARGETS['step']}x",
                ratio <= TARGETS["step"],
            ]
        )
        if "keel_activity" in step:  # type: ignore[operator]
            a = step["keel_activity"]  # type: ignore[index]
            rows.append(
                [
                    "(reported) the same step on the activity path (MCP, sandboxed, rate-limited tools)",
                    f"{a['per_step_ms']} vs {f['per_step_ms']} ms",
                    f"{step['activity_ratio']}x",  # type: ignore[index]
                    f"≤ {TARGETS['step']}x",
                    step["activity_ratio"] <= TARGETS["step"],  # type: ignore[index]
                ]
            )
    if ok(peer, "keel", "peer"):
        ke, pe = peer["keel"]["task_history_events"], peer["peer"]["task_history_events"]  # type: ignore[index]
        rows.append(
            [
                "history events per demo run vs the peer",
                f"{ke} vs {pe}",
                f"{round(ke / pe, 2)}x",
                f"≤ {TARGETS['events']}x",
                ke <= pe * TARGETS["events"],
            ]
        )
        kr, pr = peer["keel"]["runs_per_s"], peer["peer"]["runs_per_s"]  # type: ignore[index]
        ratio = peer["throughput_ratio_keel_over_peer"]  # type: ignore[index]
        rows.append(
            [
                "demo-task runs/s vs the peer",
                f"{kr} vs {pr}",
                f"{ratio}x",
                f"≥ {TARGETS['runs']}x",
                ratio >= TARGETS["runs"],
            ]
        )
    return rows


def _targets_md(results: dict[str, Any]) -> str | None:
    rows = _targets(results)
    if not rows:
        return None
    body = [
        [what, figures, ratio, target, "**target met**" if met else "**target NOT met**"]
        for what, figures, ratio, target, met in rows
    ]
    return "\n\n".join(
        [
            "## Targets (issue 23)",
            "Each a ratio between two figures of this same run (sections 1 and 4 below).",
            _table(["figure", "Keel vs floor/peer", "ratio", "target", "verdict"], body),
        ]
    )


def _render(machine: dict[str, Any], results: dict[str, Any], *, smoke: bool) -> str:
    m = machine
    out = [
        "# Keel benchmark results" + (" (SMOKE: tiny sizes, figures meaningless)" if smoke else ""),
        f"`{m['command']}` — {m['date']}, {m['total_seconds']} s in total, git {m['git']}.",
        _table(
            ["machine", ""],
            [
                ["cores (nproc)", m["nproc"]],
                ["CPU", m["cpu"]],
                ["memory", f"{m['memory_gib']} GiB"],
                ["Python", m["python"]],
                ["temporalio", m["temporalio"]],
                ["Temporal CLI (dev server)", m["temporal_cli"]],
                ["PostgreSQL", m["postgresql"]],
                ["pydantic-ai-slim (peer)", m["pydantic_ai_slim"]],
                [
                    "load average at start / end",
                    f"{'/'.join(f'{x:.2f}' for x in m['loadavg_start'])} -> "
                    f"{'/'.join(f'{x:.2f}' for x in m.get('loadavg_end', (0, 0, 0)))}",
                ],
            ],
        ),
        "Services are the benchmark's own: a dev server (SQLite WAL, tuned poll rates, as "
        "`make up`) and an embedded PostgreSQL, in a temporary folder on free ports. "
        "Absolute figures depend on this machine and on whatever else ran on it (see the "
        "load average); ratios are between figures measured in the same run.",
    ]
    targets = _targets_md(results)
    if targets:
        out.append(targets)
    for key, title, render in _SECTIONS:
        if key not in results:
            continue
        r = results[key]
        secs = r.get("_seconds")
        out.append(f"## {title}" + (f" ({secs} s)" if secs is not None else ""))
        out.append(_problem(r) or render(r))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to prove it still runs")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write Markdown (default bench/RESULTS.md; smoke: stdout)",
    )
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--json", type=Path, default=None, help="also write raw figures as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    machine, results = asyncio.run(_run_all(args))
    machine["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = _render(machine, results, smoke=args.smoke)
    out = args.out or (None if args.smoke else ROOT / "bench" / "RESULTS.md")
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "results": results}, indent=2, default=str), encoding="utf-8"
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
