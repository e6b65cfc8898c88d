"""``audit verify`` and ``audit show``: check the hash chains, read one run's trail."""

from __future__ import annotations

import argparse
import json
from typing import Any

import psycopg

from keel.audit_models import AuditRow, VerifyResult
from keel.cli import CliError
from keel.settings import load_settings

__all__ = ["register", "render_trail", "render_verify"]

_EXAMPLES = """examples:
  starter.py audit verify                      # every tenant's chain
  starter.py audit verify --tenant acme --json
  starter.py audit show agent/acme/req-42      # one run's decisions, oldest first
  starter.py audit show agent/acme/req-42 --json"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "audit",
        help="verify the tamper-evident audit log or show a run's trail",
        description="Every permission, budget, approval, guardrail, compensation and tool "
        "decision is an append-only, hash-chained row in PostgreSQL.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    asub.required = True
    v = asub.add_parser(
        "verify",
        help="recompute the hash chains; exit 1 if any row was edited, removed or moved",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("--tenant", help="check only this tenant's chain (default: all)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=_verify)
    s = asub.add_parser(
        "show",
        help="print a run's audit trail as a table",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("workflow_id", metavar="WORKFLOW_ID", help="e.g. agent/acme/req-42")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.set_defaults(func=_show)


async def _connect() -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        load_settings().database_url, autocommit=True, connect_timeout=10
    )


def render_verify(r: VerifyResult) -> str:
    """One line: OK with the count, or TAMPERED naming the first bad row."""
    scope = f"tenant {r.tenant}" if r.tenant and r.ok else "all tenants"
    if r.ok:
        return f"audit log OK: {r.checked} row(s) verified ({scope})"
    row = f"first bad row id {r.first_bad_id}" if r.first_bad_id is not None else "no row to name"
    return f"audit log TAMPERED: {r.reason} [{row}, {r.checked} row(s) checked]"


def render_trail(rows: list[AuditRow]) -> str:
    """A fixed-width table; long reasons are cut, ``--json`` has everything."""
    head = ("ID", "TIME (UTC)", "KIND", "STEP", "SUBJECT", "DECISION", "REASON")
    body = [
        (
            str(r.id),
            r.ts.strftime("%H:%M:%S.%f")[:-3],
            r.kind,
            r.step_id or "-",
            r.subject or "-",
            r.decision,
            r.reason.replace("\n", " ")[:70],
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    first = rows[0]
    lines = [
        f"Run {first.workflow_id} · tenant {first.tenant} · user {first.user or '-'} · "
        f"{len(rows)} row(s) · {first.ts:%Y-%m-%d}",
        fmt.format(*head),
    ]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


async def _verify(args: argparse.Namespace) -> int:
    from activities.audit import verify

    async with await _connect() as conn:
        result = await verify(conn, args.tenant)
    print(result.model_dump_json(indent=2) if args.json else render_verify(result))
    return 0 if result.ok else 1


async def _show(args: argparse.Namespace) -> int:
    from activities.audit import trail

    async with await _connect() as conn:
        rows = await trail(conn, args.workflow_id)
    if args.json:
        print(json.dumps([r.model_dump(mode="json", exclude={"existing"}) for r in rows], indent=2))
        return 0
    if not rows:
        raise CliError(f"no audit rows for workflow {args.workflow_id!r}")
    print(render_trail(rows))
    return 0
