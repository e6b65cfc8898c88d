"""Tampering with the audit trail, as the application's own database role and as a superuser.

The app role (``keel_app``, what production workers connect as) must be refused every way
of bending the trail: no session switch, no trigger toggling, no head rewrite, no direct
insert. A superuser can bend anything; then the signed checkpoint is what catches it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from keel.activities.audit import append_many, checkpoint, verify, verify_checkpoint
from keel.audit_models import AuditEntry

KEY = b"test-hmac-key-0123456789"
ROOT = Path(__file__).parent.parent


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _entries(tenant: str, n: int) -> list[AuditEntry]:
    return [
        AuditEntry(
            tenant=tenant,
            kind="approval",
            subject="issue_refund",
            decision="approve",
            reason=f"row {i}",
            data={"by": "carol", "amount": 250},
            idem_key=f"{tenant}/{i}",
        )
        for i in range(n)
    ]


def _as_app(pg_url: str) -> str:
    """Every test connects as the app role (tests/conftest.py); checked, not assumed."""
    assert pg_url.startswith("postgresql://keel_app@"), pg_url
    return pg_url


async def _fill(pool: AsyncConnectionPool, tenant: str, n: int = 4) -> None:
    async with pool.connection() as conn:
        await append_many(conn, _entries(tenant, n))


ATTEMPTS = [
    "set keel.audit_maintenance = 'on' ;; delete from audit_log where tenant = %(t)s",
    "set keel.audit_maintenance = 'on' ;; update audit_log set reason = 'nothing' where tenant = %(t)s",
    "update audit_heads set seq = seq - 1 where tenant = %(t)s",
    "delete from audit_heads where tenant = %(t)s",
    "alter table audit_log disable trigger user",
    "alter table audit_log disable trigger audit_log_append_only",
    "drop trigger audit_log_append_only on audit_log",
    "set session_replication_role = replica",
    "create or replace function keel_audit_append_only() returns trigger language plpgsql "
    "as $$ begin return coalesce(new, old); end $$",
    "truncate audit_log",
    "insert into audit_log (tenant, seq, ts, kind, decision, idem_key, prev_hash, hash) "
    "values (%(t)s, 99, now(), 'run', 'allow', 'forged-' || %(t)s, '', 'x')",
    "alter table audit_log owner to keel_app",
    "set role keel_audit_owner",
    "update policy_versions set body = '' ",
]


@pytest.mark.parametrize(
    "sql", ATTEMPTS, ids=[a.split(" ")[0] + "-" + str(i) for i, a in enumerate(ATTEMPTS)]
)
async def test_app_role_cannot_bend_the_trail(sql: str, db_pool: AsyncConnectionPool, pg_url: str) -> None:
    t = _tenant()
    await _fill(db_pool, t)
    with psycopg.connect(_as_app(pg_url), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            for part in sql.split(" ;; "):
                conn.execute(part, {"t": t})  # type: ignore[arg-type]
        assert isinstance(err.value, psycopg.errors.InsufficientPrivilege | psycopg.errors.RaiseException), (
            err
        )
    async with db_pool.connection() as conn:
        assert (await verify(conn, t)).ok


async def test_app_role_appends_and_reads_through_the_definer_function(pg_url: str) -> None:
    t = _tenant()
    async with await psycopg.AsyncConnection.connect(_as_app(pg_url), autocommit=True) as conn:
        rows = await append_many(conn, _entries(t, 3))
        assert [r.seq for r in rows] == [1, 2, 3]
        assert (await verify(conn, t)).ok


async def _superuser_truncates_newest(owner_pg_url: str, tenant: str, keep: int) -> None:
    """What a DBA (or an attacker with superuser) can do: drop the newest rows, fix the head.
    Explicitly the owner's connection (``owner_pg_url``): the app role cannot (see above)."""
    async with await psycopg.AsyncConnection.connect(owner_pg_url) as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute("delete from audit_log where tenant=%s and seq > %s", (tenant, keep))
        await conn.execute(
            "update audit_heads set seq=%s, hash=(select hash from audit_log where tenant=%s and seq=%s) "
            "where tenant=%s",
            (keep, tenant, keep, tenant),
        )


async def test_deleting_newest_rows_and_rewriting_the_head_is_caught_by_the_checkpoint(
    db_pool: AsyncConnectionPool, owner_pg_url: str
) -> None:
    t = _tenant()
    await _fill(db_pool, t, 5)
    async with db_pool.connection() as conn:
        signed = [c for c in await checkpoint(conn, KEY) if c["tenant"] == t]
    assert signed and signed[0]["seq"] == 5
    await _superuser_truncates_newest(owner_pg_url, t, 3)
    async with db_pool.connection() as conn:
        assert (await verify(conn, t)).ok  # the chain alone cannot tell
        found = await verify_checkpoint(conn, signed, KEY)
    assert not found.ok and "seq 5" in found.reason and "gone" in found.reason


async def test_a_forged_checkpoint_is_refused(db_pool: AsyncConnectionPool) -> None:
    t = _tenant()
    await _fill(db_pool, t, 2)
    async with db_pool.connection() as conn:
        signed = [c for c in await checkpoint(conn, KEY) if c["tenant"] == t]
        forged = [{**signed[0], "seq": 1}]
        assert not (await verify_checkpoint(conn, forged, KEY)).ok
        assert not (await verify_checkpoint(conn, signed, b"another-key-000000")).ok
        assert (await verify_checkpoint(conn, signed, KEY)).ok


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "starter.py", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=60
    )


async def test_cli_checkpoint_then_verify_detects_truncation(
    db_pool: AsyncConnectionPool, owner_pg_url: str, test_env: dict[str, str], tmp_path: Path
) -> None:
    t = _tenant()
    await _fill(db_pool, t, 4)
    env: dict[str, Any] = {**test_env, "KEEL_AUDIT_HMAC_KEY": KEY.decode()}
    env.pop("KEEL_AUDIT_CHECKPOINT_FILE", None)
    file = tmp_path / "heads.jsonl"
    no_key = {k: v for k, v in env.items() if k != "KEEL_AUDIT_HMAC_KEY"}
    refused = _cli(no_key, "audit", "checkpoint", "--file", str(file))
    assert refused.returncode != 0 and "KEEL_AUDIT_HMAC_KEY" in refused.stderr
    done = _cli(env, "audit", "checkpoint", "--file", str(file))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in file.read_text().splitlines()]
    assert any(x["tenant"] == t and x["seq"] == 4 for x in lines)
    ok = _cli(env, "audit", "verify", "--tenant", t, "--checkpoint", str(file))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    await _superuser_truncates_newest(owner_pg_url, t, 2)
    bad = _cli(env, "audit", "verify", "--tenant", t, "--checkpoint", str(file))
    assert bad.returncode == 1 and "TAMPERED" in bad.stdout and "gone" in bad.stdout, bad.stdout
    assert len(file.read_bytes()) > 0
