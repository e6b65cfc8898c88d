"""``breakers``: the circuit breakers every worker shares, and their recent transitions."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from keel.cli._output import CliError, add_output, emit_json, fmt
from keel.settings import load_settings

__all__ = ["register", "render_breakers"]

_EXAMPLES = """examples:
  starter.py breakers                   # every breaker that ever saw a failure
  starter.py breakers --events 20       # and the last 20 state changes
  starter.py breakers --json

A breaker opens after KEEL_BREAKER_THRESHOLD consecutive transient failures (default 5),
stays open KEEL_BREAKER_COOLDOWN_S seconds (default 30), then lets exactly one probe call
through; the probe's success closes it, its failure opens it again."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "breakers",
        help="show circuit-breaker state per tool and model provider",
        description="Circuit breakers are shared by all workers through PostgreSQL: one per "
        "tool (tool:<name>) and per model provider (model:<provider>).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=int, default=0, metavar="N", help="also show the last N state changes")
    add_output(p)
    p.set_defaults(func=_breakers)


def render_breakers(views: list[Any], events: list[Any], now: datetime) -> str:
    """A table of breakers (open ones say until when) and, optionally, recent transitions."""
    if not views:
        lines = ["no breaker has seen a failure: every tool and provider is closed"]
    else:
        head = ("SCOPE", "STATE", "FAILURES", "OPENED", "UNTIL", "LAST ERROR")
        rows = [
            (
                v.scope,
                v.state.replace("_", "-"),
                str(v.consecutive_failures),
                f"{v.opened_count}x",
                _until(v, now),
                (v.last_error or "-")[:60],
            )
            for v in views
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [fmt.format(*head), *(fmt.format(*r) for r in rows)]
    if events:
        lines += ["", "Recent transitions (newest first)"]
        lines += [
            f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.scope}  {e.from_state} -> {e.to_state}  {e.reason[:80]}"
            for e in events
        ]
    return "\n".join(lines)


def _until(v: Any, now: datetime) -> str:
    if v.state == "open" and v.opened_until is not None:
        left = (v.opened_until - now).total_seconds()
        return f"{v.opened_until:%H:%M:%S} ({max(0, round(left))}s)"
    if v.state == "half_open" and v.probe_lease_until is not None:
        return f"probe until {v.probe_lease_until:%H:%M:%S}"
    return "-"


async def _breakers(args: argparse.Namespace) -> int:
    import psycopg

    from keel.activities import breaker

    if args.events < 0:
        raise CliError("--events must be 0 or more")
    async with await psycopg.AsyncConnection.connect(
        load_settings().database_url, autocommit=True, connect_timeout=10
    ) as conn:
        views = await breaker.snapshot(conn)
        events = await breaker.events(conn, limit=args.events) if args.events else []
    if fmt(args) == "jsonl":  # one line per breaker, then per event
        emit_json([{"breaker": v.model_dump(mode="json")} for v in views], "jsonl")
        emit_json([{"event": e.model_dump(mode="json")} for e in events], "jsonl")
    elif fmt(args) == "json":
        emit_json(
            {
                "breakers": [v.model_dump(mode="json") for v in views],
                "events": [e.model_dump(mode="json") for e in events],
            },
            "json",
        )
    else:
        print(render_breakers(views, events, datetime.now(UTC)))
    return 0
