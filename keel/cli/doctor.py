"""``doctor``: is everything a run needs up, applied and configured? Exit 1 when not."""

from __future__ import annotations

import argparse
import os

from keel.cli._output import add_output, emit_json, fmt, print_table
from keel.settings import load_settings

__all__ = ["register"]

_EXAMPLES = """examples:
  starter.py doctor            # a table; exit status 1 if anything fails
  starter.py doctor -o json    # for monitoring

checks: Temporal reachable, search attributes registered, a worker polling each task queue
(workflow and activity tasks, and each rate-limited tool's queue), PostgreSQL reachable,
migrations applied, the policy file valid, a price for every configured model, the payload
encryption keys (their ids only)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "doctor",
        help="check services, workers, migrations, search attributes, policy and prices",
        description="Check, without changing anything, everything a run needs.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output(p)
    p.set_defaults(func=_doctor)


async def _doctor(args: argparse.Namespace) -> int:
    from keel.doctor import run_checks

    output = fmt(args)
    checks = await run_checks(load_settings(), os.environ)
    failed = [c for c in checks if not c.ok]
    if output != "table":
        emit_json([c.as_dict() for c in checks], output)
    else:
        rows = [
            (c.name, "ok" if c.ok else "FAIL", c.detail + (f" — {c.hint}" if c.hint else "")) for c in checks
        ]
        print_table(["check", "result", "detail"], rows, styles={"ok": "green", "FAIL": "bold red"})
        print(f"{len(failed)} problem(s)" if failed else "all checks passed")
    return 1 if failed else 0
