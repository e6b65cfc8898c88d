"""The audit log against the real PostgreSQL: chaining, idempotency, concurrency, tampering.

Each test uses its own tenant (uuid) so chains do not interfere, and verifies that tenant's
chain; tampering needs a superuser session (``session_replication_role = replica``): the
app's role has no switch (see tests/test_audit_tamper.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import keel.cli.audit as audit_cli
from keel.activities.audit import append, append_many, trail, verify
from keel.audit_models import AuditEntry, audit_key
from keel.cli import CliError


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _entry(tenant: str, n: int, wf: str = "", **kw: object) -> AuditEntry:
    wf = wf or f"agent/{tenant}/r1"
    base = dict(
        tenant=tenant,
        user="alice",
        workflow_id=wf,
        step_id=f"s{n}",
        kind="permission",
        subject="issue_refund",
        decision="allow",
        reason=f"decision {n}",
        data={"rule": "allow", "amount_usd": 12.5, "n": n},
        idem_key=audit_key(wf, f"s{n}", "permission", "issue_refund"),
    )
    base.update(kw)
    return AuditEntry.model_validate(base)


async def _fill(pool: AsyncConnectionPool, tenant: str, n: int = 5) -> list[int]:
    wf = f"agent/{tenant}/r1"
    async with pool.connection() as conn:
        rows = await append_many(conn, [_entry(tenant, i, wf) for i in range(n)])
    return [r.id for r in rows]


async def _tamper(owner_pg_url: str, sql: str, params: tuple[object, ...]) -> None:
    # Only a superuser can switch triggers off (the app role every other test uses cannot):
    # a DBA-level tamper, so explicitly on the owner's connection.
    async with await psycopg.AsyncConnection.connect(owner_pg_url) as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(sql, params)  # type: ignore[arg-type]


async def test_chain_appends_and_verifies(db_pool: AsyncConnectionPool) -> None:
    t = _tenant()
    async with db_pool.connection() as conn:
        first = await append(conn, _entry(t, 0))
        second = await append(conn, _entry(t, 1))
        assert (first.seq, first.prev_hash) == (1, "")
        assert second.seq == 2 and second.prev_hash == first.hash and second.ts >= first.ts
        assert (await verify(conn, t)).ok
        rows = await trail(conn, f"agent/{t}/r1")
    assert [r.id for r in rows] == [first.id, second.id]


async def test_append_is_idempotent(db_pool: AsyncConnectionPool) -> None:
    t = _tenant()
    async with db_pool.connection() as conn:
        a = await append(conn, _entry(t, 0))
        b = await append(conn, _entry(t, 0, reason="a retry with different text"))
        assert b.existing and b.id == a.id and b.hash == a.hash and b.reason == "decision 0"
        batch = await append_many(conn, [_entry(t, 0), _entry(t, 1), _entry(t, 1)])
        assert next(r.id for r in batch) == a.id and batch[1].id == batch[2].id
        cur = await conn.execute("select count(*) from audit_log where tenant = %s", (t,))
        assert (await cur.fetchone()) == (2,)
        assert (await verify(conn, t)).ok


async def test_a_batch_acks_in_input_order_and_replays_idempotently(db_pool: AsyncConnectionPool) -> None:
    t = _tenant()
    batch = (_entry(t, 0), _entry(t, 1))
    async with db_pool.connection() as conn:
        first = await append_many(conn, batch)
        again = await append_many(conn, batch)
    assert [r.existing for r in first] == [False, False] and len({r.id for r in first}) == 2
    assert [r.id for r in again] == [r.id for r in first] and all(r.existing for r in again)


async def test_concurrent_appends_keep_a_valid_chain(db_pool: AsyncConnectionPool) -> None:
    t, other = _tenant(), _tenant()

    async def writer(w: int) -> None:
        for i in range(8):
            async with db_pool.connection() as conn:
                tenant = t if (w + i) % 3 else other
                await append(conn, _entry(tenant, w * 100 + i, wf=f"agent/{tenant}/w{w}"))

    await asyncio.gather(*(writer(w) for w in range(8)))
    async with db_pool.connection() as conn:
        for tenant in (t, other):
            cur = await conn.execute(
                "select array_agg(seq order by seq) from audit_log where tenant = %s", (tenant,)
            )
            seqs = (await cur.fetchone())[0]  # type: ignore[index]
            assert seqs == list(range(1, len(seqs) + 1))
            assert (await verify(conn, tenant)).ok
        assert (await verify(conn)).ok


async def test_secrets_never_stored(db_pool: AsyncConnectionPool) -> None:
    t = _tenant()
    async with db_pool.connection() as conn:
        row = await append(
            conn,
            _entry(
                t,
                0,
                reason="key sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAA leaked",
                data={"to": "mallory@evil.test", "nested": ["ghp_" + "x" * 36], "big": 1e20},
            ),
        )
        stored = await trail(conn, f"agent/{t}/r1")
    got = next(r for r in stored if r.id == row.id)
    assert "sk-ant" not in got.reason and "[REDACTED:anthropic_key]" in got.reason
    assert got.data["to"] == "[REDACTED:email]" and got.data["nested"] == ["[REDACTED:github_token]"]
    assert got.hash == row.hash


async def test_table_is_append_only(db_pool: AsyncConnectionPool, owner_pg_url: str) -> None:
    """The app role (every test's pool) has no UPDATE/DELETE grant at all; even the owner,
    who has, meets the append-only trigger (only switching triggers off gets past it)."""
    t = _tenant()
    ids = await _fill(db_pool, t, 2)
    async with db_pool.connection() as conn:
        with pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for table audit_log"
        ):
            await conn.execute("update audit_log set reason = 'x' where id = %s", (ids[0],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("delete from audit_log where id = %s", (ids[0],))
    async with await psycopg.AsyncConnection.connect(owner_pg_url, autocommit=True) as owner:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await owner.execute("update audit_log set reason = 'x' where id = %s", (ids[0],))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await owner.execute("delete from audit_log where id = %s", (ids[0],))


async def test_edit_detected(db_pool: AsyncConnectionPool, owner_pg_url: str) -> None:
    t = _tenant()
    ids = await _fill(db_pool, t)
    await _tamper(owner_pg_url, "update audit_log set reason = 'nothing to see' where id = %s", (ids[2],))
    async with db_pool.connection() as conn:
        res = await verify(conn, t)
        assert not res.ok and res.first_bad_id == ids[2] and "modified" in res.reason
        whole = await verify(conn)
        assert not whole.ok and whole.tenant == t


async def test_edit_of_data_detected(db_pool: AsyncConnectionPool, owner_pg_url: str) -> None:
    t = _tenant()
    ids = await _fill(db_pool, t)
    await _tamper(
        owner_pg_url,
        "update audit_log set data = data || '{\"amount_usd\": 1}' where id = %s",
        (ids[1],),
    )
    async with db_pool.connection() as conn:
        res = await verify(conn, t)
    assert not res.ok and res.first_bad_id == ids[1]


@pytest.mark.parametrize("which", ["middle", "last"])
async def test_delete_detected(db_pool: AsyncConnectionPool, which: str, owner_pg_url: str) -> None:
    t = _tenant()
    ids = await _fill(db_pool, t)
    victim = ids[2] if which == "middle" else ids[-1]
    await _tamper(owner_pg_url, "delete from audit_log where id = %s", (victim,))
    async with db_pool.connection() as conn:
        res = await verify(conn, t)
    assert not res.ok
    assert res.first_bad_id == (ids[3] if which == "middle" else ids[-2])
    assert ("rows removed" if which == "middle" else "newest rows removed") in res.reason


async def test_swap_detected(db_pool: AsyncConnectionPool, owner_pg_url: str) -> None:
    t = _tenant()
    ids = await _fill(db_pool, t)
    a, b = ids[1], ids[2]
    await _tamper(owner_pg_url, "update audit_log set id = -1 where id = %s", (a,))
    await _tamper(owner_pg_url, "update audit_log set id = %s where id = %s", (a, b))
    await _tamper(owner_pg_url, "update audit_log set id = %s where id = -1", (b,))
    async with db_pool.connection() as conn:
        res = await verify(conn, t)
    assert not res.ok and res.first_bad_id == a and "reordered" in res.reason


async def test_swapped_content_detected(db_pool: AsyncConnectionPool, owner_pg_url: str) -> None:
    """Rewriting two rows' content (but keeping seq and hashes) in swapped order is caught."""
    t = _tenant()
    ids = await _fill(db_pool, t)
    await _tamper(
        owner_pg_url,
        "update audit_log a set reason = b.reason, step_id = b.step_id "
        "from audit_log b where (a.id, b.id) in ((%s, %s), (%s, %s))",
        (ids[1], ids[3], ids[3], ids[1]),
    )
    async with db_pool.connection() as conn:
        res = await verify(conn, t)
    assert not res.ok and res.first_bad_id == ids[1]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="starter.py")
    audit_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


async def test_cli_show_and_verify(
    db_pool: AsyncConnectionPool,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    owner_pg_url: str,
) -> None:
    monkeypatch.setenv("KEEL_DATABASE_URL", pg_url)
    t = _tenant()
    ids = await _fill(db_pool, t, 3)
    args = _cli(["audit", "show", f"agent/{t}/r1"])
    assert await args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"Run agent/{t}/r1 · tenant {t}") and out[1].split()[0] == "ID"
    assert [line.split()[0] for line in out[2:]] == [str(i) for i in ids]
    args = _cli(["audit", "show", f"agent/{t}/r1", "--json"])
    assert await args.func(args) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ids

    args = _cli(["audit", "verify", "--tenant", t])
    assert await args.func(args) == 0
    assert capsys.readouterr().out.startswith(f"audit log OK: 3 row(s) verified (tenant {t})")
    await _tamper(owner_pg_url, "update audit_log set decision = 'allow!' where id = %s", (ids[1],))
    assert await args.func(args) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("audit log TAMPERED:") and f"first bad row id {ids[1]}" in line
    args = _cli(["audit", "verify", "--tenant", t, "--json"])
    assert await args.func(args) == 1
    assert json.loads(capsys.readouterr().out)["first_bad_id"] == ids[1]
    with pytest.raises(CliError, match="no audit rows"):
        args = _cli(["audit", "show", "agent/none/none"])
        await args.func(args)


async def test_append_joins_the_callers_transaction(db_pool: AsyncConnectionPool) -> None:
    """Callers audit a decision and act on it atomically: a rollback takes the row with it."""
    t = _tenant()

    class Boom(Exception):
        pass

    async with db_pool.connection() as conn:
        with pytest.raises(Boom):
            async with conn.transaction():
                await append(conn, _entry(t, 0))
                raise Boom
        async with conn.transaction():
            row = await append(conn, _entry(t, 1))
            await conn.execute("select 1")
        assert row.seq == 1 and (await verify(conn, t)).ok
        assert [r.step_id for r in await trail(conn, f"agent/{t}/r1")] == ["s1"]


def test_exports() -> None:
    import keel.activities.audit as audit_mod
    import keel.audit_models as models_mod

    assert set(audit_mod.__all__) == {
        "AuditError",
        "append",
        "append_many",
        "trail",
        "verify",
        "row_hash",
        "row_hash_v2",
        "append_statement",
        "Checkpoint",
        "checkpoint",
        "verify_checkpoint",
        "observed_entry",
        "budget_change_entry",
    }
    assert all(hasattr(models_mod, n) for n in models_mod.__all__)
    assert audit_cli.__all__ == ["register", "render_trail", "render_verify"]
