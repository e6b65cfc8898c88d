"""``audit verify``, ``audit show``, ``audit checkpoint``: check the hash chains, read one
run's trail, export signed chain heads.

``checkpoint`` appends one HMAC-signed line per tenant (its chain head) to a file; keep that
file where the database's users cannot rewrite it. ``verify --checkpoint FILE`` then also
checks the chains against the last line of each tenant, which catches what the chain alone
cannot: the newest rows deleted and ``audit_heads`` rewritten to match. The key comes from
``KEEL_AUDIT_HMAC_KEY`` (never from a flag: flags end up in shell history)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import psycopg

from keel.audit_models import AuditRow, VerifyResult
from keel.cli._output import CliError, add_output, emit_json, fmt
from keel.settings import load_settings

__all__ = ["register", "render_trail", "render_verify"]

_EXAMPLES = """examples:
  starter.py audit verify                      # every tenant's chain
  starter.py audit verify --tenant acme --json
  starter.py audit show agent/acme/req-42      # one run's decisions, oldest first
  starter.py audit show agent/acme/req-42 --json
  KEEL_AUDIT_HMAC_KEY=... starter.py audit checkpoint --file /var/lib/keel/audit-heads.jsonl
  KEEL_AUDIT_HMAC_KEY=... starter.py audit verify --checkpoint /var/lib/keel/audit-heads.jsonl"""

_KEY_ENV = "KEEL_AUDIT_HMAC_KEY"
_FILE_ENV = "KEEL_AUDIT_CHECKPOINT_FILE"


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
    add_output(v)
    v.add_argument(
        "--checkpoint",
        metavar="FILE",
        default=os.environ.get(_FILE_ENV) or None,
        help=f"also check against the last signed heads in FILE (default: ${_FILE_ENV}; key: ${_KEY_ENV})",
    )
    v.set_defaults(func=_verify)
    c = asub.add_parser(
        "checkpoint",
        help="append every tenant's signed chain head to a file (anchors the chain)",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "--file",
        metavar="FILE",
        default=os.environ.get(_FILE_ENV) or "audit-checkpoints.jsonl",
        help=f"append-only JSON-lines file (default: ${_FILE_ENV} or ./audit-checkpoints.jsonl)",
    )
    c.add_argument("--json", action="store_true", help="print the written lines as JSON")
    c.set_defaults(func=_checkpoint)
    s = asub.add_parser(
        "show",
        help="print a run's audit trail as a table",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("workflow_id", metavar="WORKFLOW_ID", help="e.g. agent/acme/req-42")
    add_output(s)
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


def _detail(r: AuditRow) -> str:
    """Who decided, on which rule, about how much, and whether the plan was trusted."""
    d = r.data
    parts = []
    rule = d.get("approval_rule") or d.get("rule")
    if rule:
        parts.append(f"rule={rule}")
    if d.get("by"):
        parts.append(f"by={d['by']}")
    if d.get("approved_by"):
        parts.append(f"approved_by={d['approved_by']}")
    if d.get("amount") is not None:
        parts.append(
            f"amount={d['amount']:g}" if isinstance(d["amount"], int | float) else f"amount={d['amount']}"
        )
    if d.get("provenance"):
        parts.append("untrusted" if str(d["provenance"]).startswith("untrusted") else "trusted")
    return " ".join(parts) or "-"


def render_trail(rows: list[AuditRow]) -> str:
    """A fixed-width table; long reasons are cut, ``--json`` has everything."""
    head = ("ID", "TIME (UTC)", "KIND", "STEP", "SUBJECT", "DECISION", "DETAIL", "REASON")
    body = [
        (
            str(r.id),
            r.ts.strftime("%H:%M:%S.%f")[:-3],
            r.kind,
            r.step_id or "-",
            r.subject or "-",
            r.decision,
            _detail(r),
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


def _key() -> bytes:
    key = os.environ.get(_KEY_ENV, "")
    if len(key) < 16:
        raise CliError(f"set {_KEY_ENV} to a secret of at least 16 characters to sign or check heads")
    return key.encode()


def _read_checkpoints(path: str) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CliError(f"{path}: cannot read checkpoint file: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise CliError(f"{path}: line {n} is not JSON") from None
    if not out:
        raise CliError(f"{path}: no checkpoint in the file (run `audit checkpoint` first)")
    return out


async def _verify(args: argparse.Namespace) -> int:
    from keel.activities.audit import verify, verify_checkpoint

    checkpoints = _read_checkpoints(args.checkpoint) if args.checkpoint else None
    key = _key() if checkpoints is not None else b""
    async with await _connect() as conn:
        result = await verify(conn, args.tenant)
        if result.ok and checkpoints is not None:
            if args.tenant:
                checkpoints = [c for c in checkpoints if c.get("tenant") == args.tenant]
            anchored = await verify_checkpoint(conn, checkpoints, key)
            if not anchored.ok:
                result = anchored.model_copy(update={"checked": result.checked})
    if fmt(args) != "table":
        emit_json(result.model_dump(mode="json"), fmt(args))
    else:
        print(render_verify(result))
    if result.ok and checkpoints is not None and fmt(args) == "table":
        print(f"checked against the last signed heads in {args.checkpoint}")
    return 0 if result.ok else 1


def _append_lines(path: str, lines: list[str]) -> None:
    """Append and fsync: earlier heads stay in the file as evidence."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CliError(f"{path}: cannot append checkpoint: {e.strerror or e}") from None


async def _checkpoint(args: argparse.Namespace) -> int:
    from keel.activities.audit import checkpoint

    key = _key()
    async with await _connect() as conn:
        heads = await checkpoint(conn, key)
    _append_lines(args.file, [json.dumps(h, sort_keys=True) for h in heads])
    if args.json:
        print(json.dumps(heads, indent=2))
    else:
        print(f"signed {len(heads)} chain head(s) into {args.file}")
    return 0


async def _show(args: argparse.Namespace) -> int:
    from keel.activities.audit import trail

    async with await _connect() as conn:
        rows = await trail(conn, args.workflow_id)
    if fmt(args) != "table":
        emit_json([r.model_dump(mode="json", exclude={"existing"}) for r in rows], fmt(args))
        return 0
    if not rows:
        raise CliError(f"no audit rows for workflow {args.workflow_id!r}")
    print(render_trail(rows))
    return 0
