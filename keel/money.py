"""Money as people read it: ``$42.50``, never ``$42.5`` or ``42500000 micro-USD``.

Pure, so workflow code (current details, timer summaries) and the CLI format alike. The
ledger speaks integer micro-USD and its SQL writes reasons in micro-USD; ``usd_reason``
rewrites those sentences once, where their model is built, so every message that quotes a
ledger reason shows dollars.
"""

from __future__ import annotations

import functools
import re

__all__ = ["usd", "usd_reason"]


def usd(micros: int | None, *, unlimited: str = "unlimited") -> str:
    """``$1,234.50``: two decimals; an amount under one cent keeps its digits (``$0.0021``)
    rather than print as ``$0.00``, which would hide a real charge."""
    if micros is None:
        return unlimited
    sign = "-" if micros < 0 else ""
    m = abs(micros)
    if m == 0 or m >= 10_000:
        return f"{sign}${m / 1_000_000:,.2f}"
    return f"{sign}${f'{m / 1_000_000:.6f}'.rstrip('0')}"


_SENTENCES = (
    # keel/migrations/baseline/ledger.sql keel_budget_decide: DENY, partial grant, low water.
    (
        re.compile(r"has (-?\d+) micro-USD left of its (-?\d+) limit; request needs (\d+) \(minimum (\d+)\)"),
        "has {0} left of its {1} limit; request needs {2} (minimum {3})",
    ),
    (re.compile(r"has only (\d+) of the (\d+) micro-USD requested"), "has only {0} of the {1} requested"),
    (re.compile(r"keeps (-?\d+) of its (-?\d+) micro-USD limit"), "keeps {0} of its {1} limit"),
)


def usd_reason(text: str) -> str:
    """A ledger reason with its micro-USD amounts written as dollars (others unchanged)."""
    if "micro-USD" not in text:
        return text
    for pattern, template in _SENTENCES:
        text = pattern.sub(functools.partial(_fill, template), text)
    return text


def _fill(template: str, m: re.Match[str]) -> str:
    return template.format(*(usd(int(g)) for g in m.groups()))
