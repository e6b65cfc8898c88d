"""The database side of issue 17's boundary: policy versions, and cross-run sums for limits.

``record_policy`` stores each policy text a worker runs with once per content hash
(``policy_versions``, append-only, owned by ``keel_audit_owner``) and audits the change in
the ``_system`` chain: hash, who changed the file (its OS owner), when (its mtime), which
worker first loaded it. A text that reuses a recorded ``version`` string with different
content is flagged: the version no longer identifies the policy.

``prior_totals`` reads what cumulative limits add to before the run decides anything: the
refunds already issued on each order the request names, and the tenant's refunds today.
They are read once, at run start, into the run's snapshot (history), so the gate stays pure;
a concurrent run on the same order may read the same sum (see README, known limits), and
the refund tool's row lock still bounds the total by the order's value.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection

from keel.activities import audit
from keel.audit_models import AuditEntry
from keel.models import ToolInfo
from keel.policy import Policy

__all__ = ["SYSTEM_TENANT", "prior_totals", "queue_prior_totals", "record_policy", "request_keys"]

SYSTEM_TENANT = "_system"
"""Audit chain of decisions that belong to no tenant (policy changes)."""

_RECORDED: set[str] = set()  # hashes this process already recorded: one round trip per change


def _owner(path: Path) -> tuple[str, datetime]:
    st = path.stat()
    try:
        who = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        who = f"uid {st.st_uid}"
    return who, datetime.fromtimestamp(st.st_mtime, UTC)


async def record_policy(
    conn: AsyncConnection[Any], policy: Policy, text: str, digest: str, path: Path
) -> bool:
    """Record this policy text if it is new; returns True when this call recorded it."""
    if digest in _RECORDED:
        return False
    try:
        who, when = _owner(path)
    except OSError:
        who, when = "unknown", datetime.now(UTC)
    loader = f"{os.environ.get('USER') or pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}"
    row = await (
        await conn.execute(
            "select keel_policy_record(%s, %s, %s, %s, %s, %s, %s)",
            (digest, policy.version, str(path), who, when, f"{loader} pid {os.getpid()}", text),
        )
    ).fetchone()
    new = bool(row and row[0])
    if new:
        clash = await (
            await conn.execute(
                "select hash from policy_versions where version=%s and hash<>%s limit 1",
                (policy.version, digest),
            )
        ).fetchone()
        await audit.append(
            conn,
            AuditEntry(
                tenant=SYSTEM_TENANT,
                kind="policy",
                subject=policy.version,
                decision="flag" if clash else "changed",
                reason=(
                    f"policy {policy.version} changed WITHOUT a version bump (was {clash[0][:12]})"
                    if clash
                    else f"policy {policy.version} first used"
                )
                + f"; file {path} by {who} at {when:%Y-%m-%d %H:%M:%S} UTC",
                user=who,
                data={
                    "hash": digest,
                    "version": policy.version,
                    "changed_by": who,
                    "changed_at": when.isoformat(),
                    "loaded_by": loader,
                },
                idem_key=f"policy/{digest}",
            ),
        )
    _RECORDED.add(digest)
    return new


def request_keys(request: str, tool: ToolInfo, arg: str) -> list[str]:
    """Values in the request text that match ``arg``'s schema pattern (e.g. order ids)."""
    prop = (tool.args_schema or {}).get("properties", {}).get(arg, {})
    pattern = prop.get("pattern")
    if not isinstance(pattern, str):
        return []
    core = pattern.removeprefix("^").removesuffix("$")
    return sorted({m.group(0) for m in re.finditer(rf"(?<![\w-])(?:{core})(?![\w-])", request)})


async def prior_totals(
    conn: AsyncConnection[Any], tenant: str, policy: Policy, tools: tuple[ToolInfo, ...], request: str
) -> dict[str, float]:
    """``{"issue_refund|order|ORD-1": usd, "issue_refund|tenant_day": usd}`` for the policy's
    cumulative refund limits; other tools have no cross-run store and sum within the run."""
    return await (await queue_prior_totals(conn, tenant, policy, tools, request))()


async def queue_prior_totals(
    conn: AsyncConnection[Any], tenant: str, policy: Policy, tools: tuple[ToolInfo, ...], request: str
) -> Callable[[], Awaitable[dict[str, float]]]:
    """``prior_totals``' reads sent before any is read (in a pipeline they share the caller's
    round trip); the returned function reads them."""
    rule = policy.tools.get("issue_refund")
    if rule is None or not rule.cumulative:

        async def nothing() -> dict[str, float]:
            return {}

        return nothing
    info = next((t for t in tools if t.name == "issue_refund"), None)
    orders = sorted(
        {
            k
            for lim in rule.cumulative
            if lim.per == "order" and info
            for k in request_keys(request, info, lim.key or "")
        }
    )
    per_order = (
        await conn.execute(
            "select order_id, coalesce(sum(amount_micros), 0) from refunds "
            "where tenant=%s and order_id = any(%s) and status='issued' group by order_id",
            (tenant, orders),
        )
        if orders
        else None
    )
    per_day = (
        await conn.execute(
            "select coalesce(sum(amount_micros), 0) from refunds where tenant=%s and status='issued' "
            "and created_at >= date_trunc('day', now() at time zone 'UTC') at time zone 'UTC'",
            (tenant,),
        )
        if any(lim.per == "tenant_day" for lim in rule.cumulative)
        else None
    )

    async def read() -> dict[str, float]:
        out: dict[str, float] = {}
        if per_order is not None:
            sums = {o: s for o, s in await per_order.fetchall()}
            for o in orders:
                out[f"issue_refund|order|{o}"] = round(sums.get(o, 0) / 1_000_000, 6)
        if per_day is not None:
            row = await per_day.fetchone()
            out["issue_refund|tenant_day"] = round((row[0] if row else 0) / 1_000_000, 6)
        return out

    return read
