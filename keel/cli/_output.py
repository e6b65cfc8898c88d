"""Output people and scripts expect: ``-o table|json|jsonl`` on every command, money as USD.

``table`` (the default) is for people: columns drawn by ``rich``, colour only on a terminal
and never with ``NO_COLOR`` set. ``json`` is one document; ``jsonl`` one object per line
(rows of a list, events of ``--follow``) so ``| jq -c`` and ``| head`` work on streams.
``--json`` stays as the short form of ``-o json``. ``rich`` is imported only when a table is
drawn, so ``--help`` and machine output do not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from keel.errors import KeelError

__all__ = ["FORMATS", "CliError", "add_output", "dollars", "emit_json", "fmt", "print_table"]

FORMATS = ("table", "json", "jsonl")


class CliError(KeelError):
    """A user-facing failure: printed as ``error: <message>``, exit status 2. Defined here, below
    every command module, so they and the package itself import it from below (``keel.cli``
    re-exports it as part of its interface)."""


def add_output(p: argparse.ArgumentParser) -> None:
    """``-o/--output`` plus ``--json`` (an alias of ``-o json``) on one subcommand."""
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=None,
        help="output format: table (default, for people), json, jsonl (one object per line)",
    )
    p.add_argument("--json", action="store_true", help="same as -o json")


def fmt(args: argparse.Namespace) -> str:
    """The chosen format; ``--json`` and ``-o`` together must agree."""
    chosen = getattr(args, "output", None)
    if getattr(args, "output_resolved", False):
        return str(chosen)
    if getattr(args, "json", False):
        if chosen not in (None, "json"):
            raise CliError(f"--json contradicts -o {chosen}")
        return "json"
    return chosen or "table"


def dollars(micros: int | None, *, unlimited: str = "unlimited") -> str:
    """Micro-USD as people read money: ``$1,234.50``; sub-cent amounts keep their precision
    (``$0.0021``) instead of rounding to ``$0.00``, which would hide a real charge."""
    if micros is None:
        return unlimited
    sign = "-" if micros < 0 else ""
    m = abs(micros)
    if m == 0 or m % 10_000 == 0 or m >= 10_000:
        return f"{sign}${m / 1_000_000:,.2f}"
    digits = f"{m / 1_000_000:.6f}".rstrip("0")
    return f"{sign}${digits}"


def emit_json(doc: Any, output: str) -> None:
    """``doc`` as JSON; with ``jsonl`` a list prints one element per line. Every string is
    redacted first (results and summaries carry raw tool output: secrets, PII)."""
    from keel.redact import redact_data

    doc = redact_data(doc)
    if output == "jsonl":
        items = doc if isinstance(doc, list) else [doc]
        for item in items:
            print(json.dumps(item, default=str, separators=(",", ":"), ensure_ascii=False))
    else:
        print(json.dumps(doc, indent=2, default=str, ensure_ascii=False))


def _render(renderable: Any) -> str:
    """Draw with ``rich`` into text: colour only on a terminal without ``NO_COLOR``, a fixed
    width elsewhere (pipes and files get the same lines every time), no trailing blanks."""
    import io

    from rich.console import Console

    tty = sys.stdout.isatty()
    color = tty and not os.environ.get("NO_COLOR")
    buf = io.StringIO()
    width = Console().width if tty else 160
    console = Console(
        file=buf,
        width=width,
        no_color=not color,
        force_terminal=color,
        highlight=False,
        color_system="auto" if color else None,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def print_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[str] = (),
    title: str | None = None,
    styles: dict[str, str] | None = None,
) -> None:
    """A plain table (no boxes: copy-paste and grep friendly) drawn by ``rich``. ``styles``
    colours cells by their whole text (``{"FAIL": "bold red"}``); cell text is never parsed
    as markup, so a ``[tag]`` in data prints as it is."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from keel.redact import redact

    align_right = set(right)
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False, show_edge=False)
    for h in headers:
        table.add_column(h.upper(), justify="right" if h in align_right else "left", overflow="fold")
    for r in rows:
        cells = ["" if c is None else redact(str(c)) for c in r]
        table.add_row(*(Text(c, style=(styles or {}).get(c, "")) for c in cells))
    print(_render(table))
