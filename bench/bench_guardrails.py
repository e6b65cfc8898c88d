"""Guardrail detection and false-positive rates on the corpus in tests/adversarial/families.py.

    python bench/bench_guardrails.py            # Markdown table on stdout
    python bench/bench_guardrails.py --baseline /tmp/old_guardrails.py

An attack counts as detected when ``scan_input`` refuses it (the request path) or
``detect_injection`` flags it (the tool-output path); a benign request is a false positive
when either says anything at all. ``--baseline`` measures another guardrails module (e.g.
the version before issue 17, from ``git show``) on the same corpus, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.adversarial.families import ATTACKS, BENIGN  # noqa: E402


def _load(path: str | None) -> ModuleType:
    if path is None:
        import keel.activities.guardrails as current

        return current
    spec = importlib.util.spec_from_file_location("baseline_guardrails", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(g: ModuleType) -> tuple[dict[str, tuple[int, int, int]], int, int, list[str]]:
    """Per family (blocked at input, detected by either path, total); false positives."""
    fam: dict[str, list[int]] = {}
    for family, text in ATTACKS:
        row = fam.setdefault(family, [0, 0, 0])
        blocked = not g.scan_input(text).ok
        row[0] += blocked
        row[1] += blocked or bool(g.detect_injection(text))
        row[2] += 1
    fps = [
        b
        for b in BENIGN
        if not g.scan_input(b, off_topic=True).ok or g.scan_input(b).reason or g.detect_injection(b)
    ]
    return {k: (v[0], v[1], v[2]) for k, v in fam.items()}, len(fps), len(BENIGN), fps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="path of another guardrails.py to compare with")
    args = ap.parse_args()
    now = measure(_load(None))
    base = measure(_load(args.baseline)) if args.baseline else None
    head = "| family | n | blocked at input | detected (input or tool output) |"
    if base:
        head += " before issue 17: detected |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    totals = Counter()
    for family, (blocked, detected, n) in now[0].items():
        line = f"| {family} | {n} | {blocked} ({blocked / n:.0%}) | {detected} ({detected / n:.0%}) |"
        totals.update(n=n, blocked=blocked, detected=detected)
        if base:
            b = base[0][family][1]
            totals.update(base=b)
            line += f" {b} ({b / n:.0%}) |"
        print(line)
    n = totals["n"]
    line = (
        f"| **all attacks** | {n} | {totals['blocked']} ({totals['blocked'] / n:.1%}) "
        f"| {totals['detected']} ({totals['detected'] / n:.1%}) |"
    )
    if base:
        line += f" {totals['base']} ({totals['base'] / n:.1%}) |"
    print(line)
    fp, nb = now[1], now[2]
    line = f"| **benign (false positives)** | {nb} | - | {fp} ({fp / nb:.1%}) |"
    if base:
        line += f" {base[1]} ({base[1] / nb:.1%}) |"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
