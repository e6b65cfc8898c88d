"""``budget`` commands: set a scope's limit, show a scope, list its reservations.

USD on the command line is parsed as a decimal string (never through a float) and stored as
integer micro-USD; output prints dollars with two decimals (``-o json`` has the exact
micro-USD). A scope whose tenant is not in the policy is refused with the closest names, so
a typo (``acmee``) cannot silently create a budget nobody spends against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg

from keel.activities import ledger
from keel.budget import HistoryEntry, ScopeView
from keel.cli._output import CliError, add_output, emit_json, fmt, print_table
from keel.money import usd
from keel.settings import load_settings

__all__ = ["parse_usd", "register"]

_MICROS = Decimal(1_000_000)


def parse_usd(text: str, *, allow_unlimited: bool = False) -> int | None:
    """``"2.50"`` → 2_500_000 micro-USD; ``unlimited`` → None when allowed. Rejects junk."""
    if allow_unlimited and text.strip().lower() in ("unlimited", "none"):
        return None
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise CliError(f"not a USD amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise CliError(f"USD amount must be a finite number >= 0, got {text!r}")
    micros = value * _MICROS
    if micros != micros.to_integral_value():
        raise CliError(f"USD amount has more than 6 decimals: {text!r}")
    return int(micros)


def _usd(micros: int | None) -> str:
    return usd(micros)


def _known_tenant(scope: str) -> None:
    """Refuse a scope whose tenant the policy does not know, naming the closest ones."""
    import difflib

    from keel.policy import load_policy

    tenant = scope.split("/", 1)[0]
    settings = load_settings()
    known = sorted(load_policy(settings.policy_file).tenants)
    if tenant in known:
        return
    close = difflib.get_close_matches(tenant, known, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f" (known: {', '.join(known)})"
    )
    raise CliError(
        f"unknown tenant {tenant!r} in {settings.policy_file.name}{hint} (--new-tenant to create it anyway)"
    )


async def _with_conn(fn: Any, *args: Any) -> Any:
    url = load_settings().database_url
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
        return await fn(conn, *args)


def _set(args: argparse.Namespace) -> int:
    limit = parse_usd(args.usd, allow_unlimited=True)
    overdraft = None if args.overdraft is None else parse_usd(args.overdraft)
    if not args.new_tenant:
        _known_tenant(args.scope)
    asyncio.run(_with_conn(ledger.set_limit, args.scope, limit, args.observe, overdraft))
    if args.json:
        print(
            json.dumps(
                {
                    "scope": args.scope,
                    "limit_micros": limit,
                    "observe": args.observe,
                    "overdraft_micros": overdraft,
                }
            )
        )
        return 0
    mode = "observe (dry-run: decisions recorded, not enforced)" if args.observe else "enforced"
    extra = "" if overdraft is None else f", overdraft {_usd(overdraft)}"
    print(f"{args.scope}: limit {_usd(limit)}, {mode}{extra}")
    return 0


def _row(v: ScopeView) -> list[str]:
    return [
        v.scope,
        _usd(v.limit_micros),
        _usd(v.spent_micros),
        _usd(v.reserved_micros),
        _usd(v.remaining_micros),
        _usd(v.debt_micros),
        "observe" if v.observe else "",
    ]


def _show(args: argparse.Namespace) -> int:
    view: ScopeView | None = asyncio.run(_with_conn(ledger.show, args.scope))
    if view is None:
        raise CliError(f"no budget scope {args.scope!r} (scopes appear on first use or `budget set`)")
    if fmt(args) != "table":
        emit_json(view.model_dump(mode="json"), fmt(args))
        return 0
    headers = ["scope", "limit", "spent", "reserved", "remaining", "debt", "mode"]
    money = ("limit", "spent", "reserved", "remaining", "debt")
    print_table(headers, [_row(view), *(_row(c) for c in view.children)], right=money)
    print(
        f"\neffective remaining (with ancestors): {_usd(view.effective_remaining_micros)}"
        + (f"; overdraft {_usd(view.overdraft_micros)}" if view.overdraft_micros else "")
        + (f"; OVER LIMIT by {_usd(view.over_limit_micros)}" if view.over_limit_micros else "")
    )
    return 0


def _history(args: argparse.Namespace) -> int:
    if args.limit <= 0:
        raise CliError("--limit must be a positive number")
    entries: list[HistoryEntry] = asyncio.run(_with_conn(ledger.history, args.scope, args.limit))
    if fmt(args) != "table":
        emit_json([e.model_dump(mode="json") for e in entries], fmt(args))
        return 0
    if not entries:
        print(f"no reservations charged {args.scope}")
        return 0
    rows = [
        [
            e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.key,
            e.kind,
            e.subject,
            e.decision.value + (f" (would {e.would_decision.value})" if e.would_decision else ""),
            e.status,
            _usd(e.amount_micros),
            "" if e.actual_micros is None else _usd(e.actual_micros),
            "OVER" if e.over_limit else "",
        ]
        for e in entries
    ]
    headers = ["created", "key", "kind", "subject", "decision", "status", "held", "actual", ""]
    print_table(headers, rows, right=("held", "actual"))
    if any(e.would_decision for e in entries):
        print("\n(would X): observe mode recorded a stricter decision X without enforcing it")
    return 0


def register(sub: Any) -> None:
    """Add ``budget set|show|history`` to the starter's subcommands."""
    p = sub.add_parser(
        "budget",
        help="budget ledger: limits, spend, reservations",
        description="Inspect and set hierarchical budget limits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python starter.py budget set acme 25\n"
        "  python starter.py budget show acme\n"
        "  python starter.py budget history acme --limit 20",
    )
    bsub = p.add_subparsers(dest="budget_command", metavar="ACTION")
    bsub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    s = bsub.add_parser(
        "set",
        help="set a scope's limit",
        formatter_class=fmt,
        description="Set (or remove, with 'unlimited') the USD limit of a scope.",
        epilog="scopes: acme, acme/ws:default, acme/ws:default/user:bob,\n"
        "        acme/tool:issue_refund, acme/model:openai:gpt-4o-mini\n"
        "example: python starter.py budget set acme 25 --overdraft 0.50\n"
        "         python starter.py budget set acme/tool:issue_refund 5 --observe",
    )
    s.add_argument("scope")
    s.add_argument("usd", help="limit in USD (up to 6 decimals), or 'unlimited'")
    s.add_argument(
        "--observe", action="store_true", help="dry-run: compute and record decisions but do not enforce them"
    )
    s.add_argument(
        "--overdraft", metavar="USD", help="how far commits may overrun the limit, recorded as debt"
    )
    s.add_argument("--new-tenant", action="store_true", help="allow a tenant the policy does not name (yet)")
    add_output(s)
    s.set_defaults(func=_set)

    sh = bsub.add_parser(
        "show",
        help="limit, spend and children of a scope",
        formatter_class=fmt,
        epilog="example: python starter.py budget show acme/ws:default",
    )
    sh.add_argument("scope")
    add_output(sh)
    sh.set_defaults(func=_show)

    h = bsub.add_parser(
        "history",
        help="recent reservations that charged a scope",
        formatter_class=fmt,
        epilog="example: python starter.py budget history acme --limit 20",
    )
    h.add_argument("scope")
    add_output(h)
    h.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    h.set_defaults(func=_history)
