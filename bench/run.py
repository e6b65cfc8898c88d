"""Run every Keel benchmark against services of its own and write the results as Markdown.

    python bench/run.py                              # full sizes → bench/RESULTS.md
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

from bench import report  # noqa: E402

__all__ = ["main"]

ALL = ("step", "history", "throughput", "peer", "recovery", "ledger")


def _machine(settings: Any, pg_version: str) -> dict[str, Any]:
    from importlib.metadata import version

    from keel.devservices import temporal_binary

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    cli = subprocess.run([str(temporal_binary()), "--version"], capture_output=True, text=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
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
            print(f"services up: temporal {settings.temporal_address}, "
                  f"postgres :{settings.pg_port}", flush=True)
            runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "step": lambda: _mod("bench_step").run(client, pool, settings, smoke=args.smoke),
                "history": lambda: _mod("bench_history").run(client, pool, settings,
                                                              smoke=args.smoke),
                "throughput": lambda: _mod("bench_throughput").run(client, pool, settings,
                                                                    smoke=args.smoke),
                "peer": lambda: _mod("bench_peer").run(client, pool, settings, smoke=args.smoke),
                "recovery": lambda: _external("bench_recovery", {
                    "settings": settings, "url": settings.database_url, "client": client,
                    "pool": pool, "smoke": args.smoke}),
                "ledger": lambda: _external("bench_ledger", {
                    "url": settings.database_url, "smoke": args.smoke}),
            }
            for name in only:
                print(f"[{name}] running ...", flush=True)
                t0 = time.perf_counter()
                try:
                    results[name] = await runners[name]()
                except Exception as e:  # one failing benchmark must not hide the others
                    results[name] = {"error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(limit=6)}
                results[name]["_seconds"] = round(time.perf_counter() - t0, 1)
                print(f"[{name}] done in {results[name]['_seconds']} s"
                      + (f" — {results[name]['error']}" if "error" in results[name] else ""),
                      flush=True)
            machine["loadavg_end"] = os.getloadavg()
        finally:
            await pool.close()
    return machine, results


def _mod(name: str) -> Any:
    return importlib.import_module(f"bench.{name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to prove it still runs")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write Markdown (default bench/RESULTS.md; smoke: stdout)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--json", type=Path, default=None, help="also write raw figures as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    machine, results = asyncio.run(_run_all(args))
    machine["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = report.render(machine, results, smoke=args.smoke)
    out = args.out or (None if args.smoke else ROOT / "bench" / "RESULTS.md")
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2,
                                        default=str), encoding="utf-8")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
