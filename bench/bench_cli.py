"""How long ``keel --help`` takes as a whole process (goal: <= 0.3 s on the bench machine).

Whole-process wall time, fork to exit, of N subprocess runs per command, interleaved so load
changes hit every command alike; medians with p90/min/max. Commands:

* ``keel --help``            the installed console script (lazy: no SDK is imported);
* ``starter.py --help``      the thin entry point, same code path;
* ``keel run --help``        a subcommand's help (imports its module: Temporal, pydantic);
* ``full parser --help``     what ``--help`` cost before (every command module imported);
* ``python -c pass``         the interpreter's own floor.

python bench/bench_cli.py [--runs 20] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FULL = "from keel.cli import build_parser; build_parser().parse_args(['--help'])"

COMMANDS: dict[str, list[str]] = {
    "keel --help": [str(BIN / "keel"), "--help"],
    "starter.py --help": [sys.executable, str(ROOT / "starter.py"), "--help"],
    "keel run --help": [str(BIN / "keel"), "run", "--help"],
    "full parser --help (before)": [sys.executable, "-c", FULL],
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
}


def _once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd="/tmp")
    return time.perf_counter() - t0


def run(runs: int = 20) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for cmd in COMMANDS.values():  # warm the page cache and .pyc files once
        _once(cmd)
    for _ in range(runs):
        for name, cmd in COMMANDS.items():
            samples[name].append(_once(cmd))
    out = {}
    for name, xs in samples.items():
        xs.sort()
        out[name] = {
            "median_s": statistics.median(xs),
            "p90_s": xs[min(len(xs) - 1, int(len(xs) * 0.9))],
            "min_s": xs[0],
            "max_s": xs[-1],
            "n": len(xs),
        }
    return out


def markdown(result: dict[str, dict[str, float]]) -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Whole-process wall time, {next(iter(result.values()))['n']} interleaved runs each; "
        f"load average at end {load}.",
        "",
        "| command | median s | p90 s | min s | max s |",
        "|---|---|---|---|---|",
    ]
    for name, r in result.items():
        lines.append(
            f"| {name} | **{r['median_s']:.3f}** | {r['p90_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    print(markdown(run(args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
