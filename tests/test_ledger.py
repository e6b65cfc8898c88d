"""Budget ledger behaviour on the real PostgreSQL (one unique tenant per test)."""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import keel.activities.budget as budget_activities
import keel.activities.ledger as ledger_module
import keel.budget as budget_module
from keel.activities import ledger
from keel.activities.budget import BudgetActivities
from keel.budget import (
    CommitRequest,
    ExtendRequest,
    IdempotencyConflict,
    OpenRunRequest,
    ReleaseRequest,
    ReservationClosed,
    ReservationNotFound,
    ReserveRequest,
    parent_scope,
    scope_path,
    tool_scope,
)
from keel.models import Decision

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def conn(db_pool: AsyncConnectionPool) -> AsyncIterator[Conn]:
    async with db_pool.connection() as c:
        yield c


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _req(key: str, scopes: tuple[str, ...], amount: int, **kw: Any) -> ReserveRequest:
    return ReserveRequest(key=key, scopes=scopes, amount_micros=amount, **kw)


async def _scope(conn: Conn, scope: str) -> tuple[int, int, int, int]:
    cur = await conn.execute(
        "select spent_micros, reserved_micros, debt_micros,"
        " over_limit_micros from keel_budget_scopes where scope = %s",
        (scope,),
    )
    row = await cur.fetchone()
    assert row is not None, scope
    return row


async def _violations(conn: Conn, tenant: str) -> list[str]:
    # Filtered to this test's tenant: other teams' tests share the session database.
    return [v for v in await ledger.check_invariant(conn) if tenant in v]


def test_public_surface() -> None:
    for mod in (budget_module, ledger_module, budget_activities):
        assert all(hasattr(mod, name) for name in mod.__all__)
    assert {"reserve", "commit", "release", "extend", "run_sweeper"} <= set(ledger_module.__all__)


async def test_scope_naming_matches_sql(conn: Conn) -> None:
    path = scope_path("acme", "default", "bob", "agent/acme/req-1")
    assert path == (
        "acme",
        "acme/ws:default",
        "acme/ws:default/user:bob",
        "acme/ws:default/user:bob/run:agent/acme/req-1",
    )
    assert tool_scope("acme", "issue_refund") == "acme/tool:issue_refund"
    names = [*path, "acme/tool:issue_refund", "acme/model:openai:gpt-4o-mini"]
    cur = await conn.execute("select s, keel_scope_parent(s) from unnest(%s::text[]) s", (names,))
    for scope, parent in await cur.fetchall():
        assert parent == parent_scope(scope)
    assert parent_scope(path[-1]) == path[2]
    with pytest.raises(ValueError):
        scope_path("ac/me", "default", "bob", "r")


async def test_hierarchy_all_or_nothing(conn: Conn, tenant: str) -> None:
    path = scope_path(tenant, "default", "bob", "run1")
    await ledger.set_limit(conn, tenant, 1_000)
    await ledger.set_limit(conn, path[2], 300)
    # Only the run scope is named: the database adds every ancestor.
    denied = await ledger.reserve(conn, _req(f"{tenant}/a", path[-1:], 400))
    assert denied.decision is Decision.DENY and denied.granted_micros == 0
    assert path[2] in denied.reason
    for scope in path:
        assert (await _scope(conn, scope))[1] == 0, "a denial must touch no scope"
    ok = await ledger.reserve(conn, _req(f"{tenant}/b", path[-1:], 200))
    assert ok.decision is Decision.ALLOW and ok.remaining_micros == 100
    for scope in path:
        assert (await _scope(conn, scope))[1] == 200
    assert await _violations(conn, tenant) == []


async def test_retries_return_the_original_answer(conn: Conn, tenant: str) -> None:
    scopes = (tenant,)
    await ledger.set_limit(conn, tenant, 1_000)
    first = await ledger.reserve(conn, _req(f"{tenant}/k", scopes, 600))
    await ledger.set_limit(conn, tenant, 0)  # the world changed; the answer must not
    again = await ledger.reserve(conn, _req(f"{tenant}/k", scopes, 600))
    assert again.replayed and again.model_copy(update={"replayed": False}) == first
    c1 = await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=550))
    c2 = await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=550))
    assert c2.replayed and c2.model_copy(update={"replayed": False}) == c1
    assert c1.refunded_micros == 50
    r = await ledger.release(conn, ReleaseRequest(key=f"{tenant}/k", reason="cleanup"))
    assert r.status == "committed" and r.released_micros == 0
    assert (await _scope(conn, tenant))[:2] == (550, 0)


async def test_key_reuse_with_other_payload_is_refused(conn: Conn, tenant: str) -> None:
    await ledger.reserve(conn, _req(f"{tenant}/k", (tenant,), 100))
    with pytest.raises(IdempotencyConflict, match="different"):
        await ledger.reserve(conn, _req(f"{tenant}/k", (tenant,), 101))
    await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=90))
    with pytest.raises(IdempotencyConflict):
        await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=91))
    with pytest.raises(ReservationNotFound):
        await ledger.commit(conn, CommitRequest(key=f"{tenant}/nope", actual_micros=1))


async def test_caps_follow_headroom(conn: Conn, tenant: str) -> None:
    s = (tenant,)
    await ledger.set_limit(conn, tenant, 1_000)
    plenty = await ledger.reserve(conn, _req(f"{tenant}/1", s, 700, max_tokens=1000))
    assert plenty.decision is Decision.ALLOW and plenty.caps.max_tier is None
    # 150 left afterwards, below the 200 low-water mark (20%): cheaper, shorter, no extras.
    low = await ledger.reserve(conn, _req(f"{tenant}/2", s, 150, max_tokens=1000))
    assert low.decision is Decision.ALLOW_WITH_CAPS and low.granted_micros == 150
    assert low.caps.max_tier == "fast" and low.caps.disable_optional
    assert low.caps.max_tokens == 750 and tenant in low.reason
    # 150 left; 500 does not fit but the 100 minimum does: grant what fits, tokens pro rata.
    part = await ledger.reserve(conn, _req(f"{tenant}/3", s, 500, min_micros=100, max_tokens=1000))
    assert part.decision is Decision.ALLOW_WITH_CAPS
    assert (part.granted_micros, part.caps.max_tokens, part.remaining_micros) == (150, 300, 0)
    deny = await ledger.reserve(conn, _req(f"{tenant}/4", s, 100, min_micros=1))
    assert deny.decision is Decision.DENY and tenant in deny.reason
    assert deny.remaining_micros == 0


async def test_overrun_goes_to_debt_then_flags_over_limit(conn: Conn, tenant: str) -> None:
    s = (tenant,)
    await ledger.set_limit(conn, tenant, 1_000, overdraft_micros=100)
    await ledger.reserve(conn, _req(f"{tenant}/a", s, 500))
    await ledger.reserve(conn, _req(f"{tenant}/b", s, 500))
    a = await ledger.commit(conn, CommitRequest(key=f"{tenant}/a", actual_micros=560))
    assert (a.overrun_micros, a.debt_micros, a.over_limit) == (60, 60, False)
    b = await ledger.commit(conn, CommitRequest(key=f"{tenant}/b", actual_micros=560))
    assert (b.overrun_micros, b.debt_micros, b.over_limit) == (60, 40, True)
    assert await _scope(conn, tenant) == (1_120, 0, 100, 20)  # the truth, never dropped
    deny = await ledger.reserve(conn, _req(f"{tenant}/c", s, 1))
    assert deny.decision is Decision.DENY
    assert await _violations(conn, tenant) == []
    # Raising the limit forgives the debt that now fits under it.
    await ledger.set_limit(conn, tenant, 2_000)
    assert (await _scope(conn, tenant))[2] == 0


async def test_observe_mode_records_but_does_not_enforce(conn: Conn, tenant: str) -> None:
    path = scope_path(tenant, "default", "bob", "run1")
    await ledger.set_limit(conn, tenant, 100, observe=True)
    r = await ledger.reserve(conn, _req(f"{tenant}/a", path, 500))
    assert r.decision is Decision.ALLOW and r.granted_micros == 500
    assert r.observed and r.would_decision is Decision.DENY and "would be DENY" in r.reason
    [entry] = await ledger.history(conn, tenant)
    assert entry.would_decision is Decision.DENY and entry.decision is Decision.ALLOW
    # An enforced scope on the same path still decides.
    await ledger.set_limit(conn, path[1], 800)
    denied = await ledger.reserve(conn, _req(f"{tenant}/b", path, 400))
    assert denied.decision is Decision.DENY and path[1] in denied.reason
    assert await _violations(conn, tenant) == []


async def _expire(conn: Conn, key: str) -> None:
    """Move a lease into the past on the database clock (instead of sleeping through it)."""
    await conn.execute(
        "update keel_budget_reservations set expires_at = now() - interval '1s' where key = %s", (key,)
    )


async def test_ttl_expiry_by_sweep_and_late_commit(conn: Conn, tenant: str) -> None:
    s = (tenant,)
    await ledger.set_limit(conn, tenant, 1_000)
    await ledger.reserve(conn, _req(f"{tenant}/dead", s, 400, ttl_seconds=60))
    await ledger.reserve(conn, _req(f"{tenant}/alive", s, 300, ttl_seconds=60))
    await _expire(conn, f"{tenant}/dead")
    await _expire(conn, f"{tenant}/alive")
    ext = await ledger.extend(conn, ExtendRequest(key=f"{tenant}/alive", ttl_seconds=60))
    assert ext.extended and ext.status == "held"
    assert await ledger.sweep_expired(conn) >= 1
    assert (await _scope(conn, tenant))[1] == 300
    rel = await ledger.release(conn, ReleaseRequest(key=f"{tenant}/dead"))
    assert rel.status == "expired" and rel.released_micros == 0
    # The call did happen after all: its cost is charged truthfully as late new spend.
    late = await ledger.commit(conn, CommitRequest(key=f"{tenant}/dead", actual_micros=250))
    assert late.late and late.overrun_micros == 250 and not late.over_limit and not late.lost_hold
    assert await _scope(conn, tenant) == (250, 300, 0, 0)
    assert await _violations(conn, tenant) == []


async def test_commit_of_a_lost_hold_records_the_spend(conn: Conn, tenant: str) -> None:
    """A hold the database lost (a lease, before its flush) still has its spend recorded by
    the commit that names its scopes, on every scope of the path (rows created if the crash
    took them too), by the overrun rules; without scopes it is refused as before."""
    path = scope_path(tenant, "w", "u", "r1")
    await ledger.set_limit(conn, tenant, 1_000, overdraft_micros=100)
    with pytest.raises(ReservationNotFound):
        await ledger.commit(conn, CommitRequest(key=f"{tenant}/gone", actual_micros=5))
    lost = CommitRequest(key=f"{tenant}/gone", actual_micros=300, scopes=path[2:], kind="tool")
    done = await ledger.commit(conn, lost)
    assert done.late and done.lost_hold and done.committed_micros == 300 and done.overrun_micros == 300
    assert not done.replayed and not done.over_limit
    for scope in path:  # the closure: tenant, workspace and user rows were created
        assert await _scope(conn, scope) == (300, 0, 0, 0), scope
    again = await ledger.commit(conn, lost)
    assert again.replayed and again.committed_micros == 300 and again.late and again.lost_hold
    with pytest.raises(IdempotencyConflict):
        await ledger.commit(conn, lost.model_copy(update={"actual_micros": 301}))
    # Beyond the limit: booked into the overdraft, then flagged over limit; never dropped.
    big = await ledger.commit(conn, CommitRequest(key=f"{tenant}/gone2", actual_micros=900, scopes=(tenant,)))
    assert big.late and big.debt_micros == 100 and big.over_limit
    assert await _scope(conn, tenant) == (1_200, 0, 100, 100)
    cur = await conn.execute(
        "select status, kind, amount_micros, actual_micros from keel_budget_reservations where key = %s",
        (f"{tenant}/gone",),
    )
    assert await cur.fetchone() == ("committed", "tool", 0, 300)
    assert await _violations(conn, tenant) == []


async def test_a_lease_reserve_refuses_to_join_a_transaction(conn: Conn, tenant: str) -> None:
    op = ledger.batch_op(_req(f"{tenant}/k", (tenant,), 10))
    async with conn.transaction():
        with pytest.raises(psycopg.ProgrammingError, match="own transaction"):
            await ledger.run_op(conn, op, lease=True)
    assert (await ledger.run_op(conn, op, lease=True))["decision"] == "ALLOW"
    cur = await conn.execute("show synchronous_commit")
    assert await cur.fetchone() == ("on",), "SET LOCAL ended with the lease's own transaction"


async def test_commit_after_release_loses(conn: Conn, tenant: str) -> None:
    await ledger.reserve(conn, _req(f"{tenant}/k", (tenant,), 100))
    rel = await ledger.release(conn, ReleaseRequest(key=f"{tenant}/k", reason="cancelled"))
    assert rel.released_micros == 100
    with pytest.raises(ReservationClosed):
        await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=100))
    assert (await _scope(conn, tenant))[:2] == (0, 0)


async def test_commit_joins_the_callers_transaction(conn: Conn, tenant: str) -> None:
    await ledger.reserve(conn, _req(f"{tenant}/k", (tenant,), 100))
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=80))
            raise RuntimeError("tool effect failed")
    assert (await _scope(conn, tenant))[:2] == (0, 100), "commit rolled back with the effect"
    async with conn.transaction():
        done = await ledger.commit(conn, CommitRequest(key=f"{tenant}/k", actual_micros=80))
    assert not done.replayed and (await _scope(conn, tenant))[:2] == (80, 0)


async def test_open_run_first_limit_wins(conn: Conn, tenant: str) -> None:
    path = scope_path(tenant, "default", "bob", "agent/x/1")
    one = await ledger.open_run(conn, OpenRunRequest(scopes=path, run_limit_micros=500))
    two = await ledger.open_run(conn, OpenRunRequest(scopes=path, run_limit_micros=900))
    assert one.scope == two.scope == path[-1] and two.limit_micros == 500
    view = await ledger.show(conn, path[2])
    assert view is not None and [c.scope for c in view.children] == [path[-1]]
    assert view.effective_remaining_micros is None  # children do not constrain a parent
    run = await ledger.show(conn, path[-1])
    assert run is not None and run.effective_remaining_micros == 500


async def test_invariant_detects_corruption(conn: Conn, tenant: str) -> None:
    await ledger.reserve(conn, _req(f"{tenant}/k", (tenant,), 100))
    assert await _violations(conn, tenant) == []
    await conn.execute(
        "update keel_budget_scopes set reserved_micros = reserved_micros + 7,"
        " spent_micros = spent_micros + 1 where scope = %s",
        (tenant,),
    )
    found = await _violations(conn, tenant)
    assert any("reserved 107" in v for v in found) and any("spent 1 " in v for v in found)
    await conn.execute(
        "update keel_budget_scopes set reserved_micros = reserved_micros - 7,"
        " spent_micros = spent_micros - 1 where scope = %s",
        (tenant,),
    )


async def test_activities_map_refusals_to_non_retryable(db_pool: AsyncConnectionPool, tenant: str) -> None:
    acts = BudgetActivities(db_pool)
    r = await acts.reserve(_req(f"{tenant}/k", (tenant,), 10))
    assert r.decision is Decision.ALLOW
    with pytest.raises(ApplicationError) as info:
        await acts.reserve(_req(f"{tenant}/k", (tenant,), 11))
    assert info.value.non_retryable and info.value.type == "IdempotencyConflict"
    done = await acts.commit(CommitRequest(key=f"{tenant}/k", actual_micros=10))
    assert done.committed_micros == 10


async def test_activities_on_a_lost_hold(
    db_pool: AsyncConnectionPool, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hold lost as a lease: the workflow's release finds nothing held (not a failure), and
    its commit records the spend and warns."""
    acts, env = BudgetActivities(db_pool), ActivityEnvironment()
    with caplog.at_level(logging.WARNING):
        rel = await env.run(acts.release, ReleaseRequest(key=f"{tenant}/gone"))
        assert rel.status == "missing" and rel.released_micros == 0
        lost = CommitRequest(key=f"{tenant}/gone2", actual_micros=40, scopes=(tenant,))
        done = await env.run(acts.commit, lost)
    assert done.lost_hold and done.late and done.committed_micros == 40
    assert f"{tenant}/gone2 was not found at commit" in caplog.text
    assert f"{tenant}/gone was not found at release" in caplog.text
    with pytest.raises(ApplicationError, match="different payload"):
        await env.run(acts.commit, lost.model_copy(update={"actual_micros": 41}))


def test_cli_set_show_history(
    pg_url: str, tenant: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from keel.cli import CliError
    from keel.cli import budget as cli

    monkeypatch.setenv("KEEL_DATABASE_URL", pg_url)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(["budget", *argv])
        return int(args.func(args))

    assert run("set", tenant, "2.5", "--overdraft", "0.1", "--new-tenant") == 0
    assert run("show", tenant) == 0
    out = capsys.readouterr().out
    assert "$2.50" in out and "overdraft $0.10" in out
    assert run("history", tenant, "--json") == 0
    assert capsys.readouterr().out.strip() == "[]"
    for bad in ("-1", "nan", "inf", "1.0000001", "abc"):
        with pytest.raises(CliError):
            run("set", tenant, bad, "--new-tenant")
    assert cli.parse_usd("0.000001") == 1
    assert cli.parse_usd("unlimited", allow_unlimited=True) is None
