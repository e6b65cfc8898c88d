"""Batched ledger operations: the set-based engine equals the one-by-one reference, and the
worker-side batcher coalesces calls while keeping every caller's answer and refusal its own."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from keel.activities import ledger
from keel.activities.ledger_batch import LedgerBatcher
from keel.budget import (
    CommitRequest,
    IdempotencyConflict,
    InvalidLedgerRequest,
    ReleaseRequest,
    ReservationClosed,
    ReservationNotFound,
    ReserveRequest,
    scope_path,
)
from keel.models import Decision

_STATE_COLS = "spent_micros, reserved_micros, debt_micros, over_limit_micros"


def _program(rng: random.Random, n_ops: int) -> list[list[dict[str, Any]]]:
    """Random batches over tenant ``T``: reservations (some partial, some on observe or
    overdraft scopes), commits under/over the hold, releases, replays, conflicting reuse,
    unknown keys, settlements of closed holds. Scopes and keys are written with ``T`` so the
    same program can run on two fresh tenants."""
    keys: list[str] = []
    batches: list[list[dict[str, Any]]] = []
    for _ in range(n_ops // 4):
        batch: list[dict[str, Any]] = []
        used: set[str] = set()
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if roll < 0.45 or not keys:
                key = f"T/k{len(keys)}"
                keys.append(key)
                user = rng.choice(["a", "b"])
                scopes = [f"T/ws:w/user:{user}/run:r{rng.randint(0, 2)}", f"T/model:m{rng.randint(0, 1)}"]
                amount = rng.choice([100, 400, 900, 2500])
                req = ReserveRequest(
                    key=key,
                    scopes=tuple(scopes),
                    amount_micros=amount,
                    min_micros=rng.choice([0, amount // 4]),
                    max_tokens=rng.choice([None, 1000]),
                )
            else:
                key = rng.choice(keys)
                kind = rng.random()
                lost = rng.choice([(), (f"T/ws:w/user:{rng.choice(['a', 'b'])}/run:r1", "T/model:m1")])
                if kind < 0.45:  # with or without the hold's scopes: only a lost hold uses them
                    req = CommitRequest(
                        key=key, actual_micros=rng.choice([0, 50, 300, 900, 3000]), scopes=lost and scopes
                    )
                elif kind < 0.75:
                    req = ReleaseRequest(key=key, reason="test")
                elif kind < 0.9:  # replay or conflicting reuse of a reserve key
                    req = ReserveRequest(key=key, scopes=("T/ws:w/user:a/run:r0",), amount_micros=100)
                else:  # unknown key: refused, or (naming scopes) a hold the database lost
                    req = CommitRequest(
                        key=f"T/missing{rng.randint(0, 9)}", actual_micros=rng.choice([1, 700]), scopes=lost
                    )
            if req.key in used:
                continue  # keep keys distinct within a batch: the engine's own path
            used.add(req.key)
            batch.append(ledger.batch_op(req))
        batches.append(batch)
    return batches


def _bind(batches: list[list[dict[str, Any]]], tenant: str) -> list[list[dict[str, Any]]]:
    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("T/", f"{tenant}/").replace("T", tenant) if v.startswith("T") else v
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    # Hashes cover scopes, which differ per tenant: recompute through the request models.
    out = []
    for batch in batches:
        bound = []
        for op in batch:
            op = {k: sub(v) for k, v in op.items()}
            if op["op"] == "reserve":
                req = ReserveRequest(
                    key=op["key"],
                    scopes=tuple(op["scopes"]),
                    amount_micros=op["amount"],
                    min_micros=op["min"],
                    max_tokens=op["max_tokens"],
                )
                op = ledger.batch_op(req)
            bound.append(op)
        out.append(bound)
    return out


def _unbind(value: Any, tenant: str) -> Any:
    if isinstance(value, str):
        return value.replace(tenant, "T")
    if isinstance(value, list):
        return [_unbind(v, tenant) for v in value]
    if isinstance(value, dict):
        return {k: _unbind(v, tenant) for k, v in value.items()}
    return value


def _setup(c: psycopg.Connection[Any], tenant: str) -> None:
    c.execute("select keel_budget_set_limit(%s, 6000, false, 1500)", (tenant,))
    c.execute("select keel_budget_set_limit(%s, 3000, false, null)", (f"{tenant}/ws:w/user:a",))
    c.execute("select keel_budget_set_limit(%s, 2000, true, null)", (f"{tenant}/model:m1",))
    c.execute("select keel_budget_set_limit(%s, 1500, false, 300)", (f"{tenant}/ws:w/user:b/run:r1",))


def _state(c: psycopg.Connection[Any], tenant: str) -> dict[str, Any]:
    scopes = c.execute(
        f"select scope, {_STATE_COLS} from keel_budget_scopes where scope = %s or scope like %s order by 1",
        (tenant, f"{tenant}/%"),
    ).fetchall()
    res = c.execute(
        "select key, status, amount_micros, actual_micros, overrun_micros, debt_micros, over_limit,"
        " late, decision, caps, reason from keel_budget_reservations where scopes[1] = %s order by key",
        (tenant,),
    ).fetchall()
    return _unbind({"scopes": [list(r) for r in scopes], "reservations": [list(r) for r in res]}, tenant)


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 10_000), n_ops=st.integers(8, 60))
def test_batch_engine_equals_one_by_one(pg_url: str, seed: int, n_ops: int) -> None:
    program = _program(random.Random(seed), n_ops)
    fast, slow = (f"q{uuid.uuid4().hex[:10]}" for _ in range(2))
    with psycopg.connect(pg_url, autocommit=True) as c:
        _setup(c, fast)
        _setup(c, slow)
        for batch_fast, batch_slow in zip(_bind(program, fast), _bind(program, slow), strict=True):
            (a,) = c.execute("select keel_budget_batch(%s)", (Jsonb(batch_fast),)).fetchone() or (None,)
            cur = c.execute("select keel_budget_batch_serial(%s)", (Jsonb(batch_slow),))
            (b,) = cur.fetchone() or (None,)
            assert _unbind(a, fast) == _unbind(b, slow), (batch_fast, a, b)
        assert _state(c, fast) == _state(c, slow)
        rows = c.execute("select * from keel_check_invariant()").fetchall()
        bad = [r[0] for r in rows if fast in r[0] or slow in r[0]]
        assert bad == []


@pytest.fixture
def tenant() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


async def test_concurrent_calls_share_transactions(db_pool: AsyncConnectionPool, tenant: str) -> None:
    batcher = LedgerBatcher(db_pool, max_in_flight=1)
    async with db_pool.connection() as c:
        await ledger.set_limit(c, tenant, 20_000)
    scopes = scope_path(tenant, "w", "u", "r")
    reqs = [ReserveRequest(key=f"{tenant}/k{i}", scopes=scopes, amount_micros=1_000) for i in range(30)]
    answers = await asyncio.gather(*(batcher.reserve(r) for r in reqs))
    assert batcher.operations == 30 and batcher.batches < 30  # coalesced
    granted = [a.granted_micros for a in answers]
    # In submission order, as if one by one: 20 full grants, then the limit bites.
    assert sum(granted) <= 20_000
    assert [a.decision for a in answers].count(Decision.DENY) == 10
    assert [a.key for a in answers] == [r.key for r in reqs]
    commits = await asyncio.gather(
        *(batcher.commit(CommitRequest(key=r.key, actual_micros=600)) for r in reqs[:20])
    )
    assert {c.refunded_micros for c in commits} == {400}
    async with db_pool.connection() as c:
        assert [v for v in await ledger.check_invariant(c) if tenant in v] == []
        view = await ledger.show(c, tenant)
    assert view is not None and view.spent_micros == 12_000 and view.reserved_micros == 0


async def test_each_caller_gets_its_own_refusal(db_pool: AsyncConnectionPool, tenant: str) -> None:
    batcher = LedgerBatcher(db_pool, max_in_flight=1)
    scopes = (tenant,)
    await batcher.reserve(ReserveRequest(key=f"{tenant}/a", scopes=scopes, amount_micros=10))
    await batcher.reserve(ReserveRequest(key=f"{tenant}/b", scopes=scopes, amount_micros=10))
    await batcher.release(ReleaseRequest(key=f"{tenant}/b"))
    results = await asyncio.gather(
        batcher.reserve(ReserveRequest(key=f"{tenant}/a", scopes=scopes, amount_micros=99)),  # reuse
        batcher.commit(CommitRequest(key=f"{tenant}/nope", actual_micros=1)),
        batcher.commit(CommitRequest(key=f"{tenant}/b", actual_micros=1)),  # released
        batcher.commit(CommitRequest(key=f"{tenant}/a", actual_micros=7)),
        batcher.reserve(ReserveRequest(key=f"{tenant}/c", scopes=scopes, amount_micros=5)),
        return_exceptions=True,
    )
    assert [type(r) for r in results[:3]] == [IdempotencyConflict, ReservationNotFound, ReservationClosed]
    assert results[3].committed_micros == 7  # type: ignore[union-attr]
    assert results[4].granted_micros == 5  # type: ignore[union-attr]


async def test_a_failing_batch_is_rerun_one_by_one(db_pool: AsyncConnectionPool, tenant: str) -> None:
    """A malformed scope aborts the whole batch transaction in the database; the batcher
    re-runs each operation alone, so only the bad one fails (and nothing is applied twice)."""
    batcher = LedgerBatcher(db_pool, max_in_flight=1)
    good = [ReserveRequest(key=f"{tenant}/g{i}", scopes=(tenant,), amount_micros=10) for i in range(4)]
    bad = ReserveRequest(key=f"{tenant}/bad", scopes=(f"{tenant}//x",), amount_micros=10)
    calls = (batcher.reserve(r) for r in [*good[:2], bad, *good[2:]])
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], InvalidLedgerRequest), results[2]
    assert all(r.granted_micros == 10 for i, r in enumerate(results) if i != 2)  # type: ignore[union-attr]
    async with db_pool.connection() as c:
        view = await ledger.show(c, tenant)
        assert [v for v in await ledger.check_invariant(c) if tenant in v] == []
    assert view is not None and view.reserved_micros == 40


async def test_direct_and_batched_calls_are_the_same_operation(
    db_pool: AsyncConnectionPool, tenant: str
) -> None:
    """Same key and payload hash either way: a retry that takes the other path replays."""
    batcher = LedgerBatcher(db_pool)
    req = ReserveRequest(key=f"{tenant}/x", scopes=(tenant,), amount_micros=30)
    first = await batcher.reserve(req)
    async with db_pool.connection() as c:
        again = await ledger.reserve(c, req)
        done = await ledger.commit(c, CommitRequest(key=req.key, actual_micros=20))
    assert again.replayed and again.granted_micros == first.granted_micros
    replay = await asyncio.gather(
        batcher.commit(CommitRequest(key=req.key, actual_micros=20)),
        batcher.reserve(ReserveRequest(key=f"{tenant}/y", scopes=(tenant,), amount_micros=1)),
    )
    assert replay[0].replayed and replay[0].committed_micros == done.committed_micros


async def test_lone_calls_go_out_alone_and_survive_cancellation(
    db_pool: AsyncConnectionPool, tenant: str
) -> None:
    """A call with nothing in flight goes out alone, one transaction each. A caller cancelled
    mid-call may or may not have had its operation applied; its retry with the same key
    settles which, and nothing is held twice."""
    batcher = LedgerBatcher(db_pool)
    for i in range(3):
        await batcher.reserve(ReserveRequest(key=f"{tenant}/s{i}", scopes=(tenant,), amount_micros=5))
    assert (batcher.operations, batcher.batches) == (3, 3)

    reqs = [ReserveRequest(key=f"{tenant}/c{i}", scopes=(tenant,), amount_micros=7) for i in range(40)]
    cancelled = 0
    for i, req in enumerate(reqs):
        try:  # cancel at varying points of the round trip
            await asyncio.wait_for(batcher.reserve(req), timeout=0.0002 * (i % 8))
        except TimeoutError:
            cancelled += 1
    assert cancelled > 0
    answers = [await batcher.reserve(r) for r in reqs]  # the retries
    assert all(a.granted_micros == 7 for a in answers)
    async with db_pool.connection() as c:
        assert [v for v in await ledger.check_invariant(c) if tenant in v] == []
        view = await ledger.show(c, tenant)
    assert view is not None and view.reserved_micros == 15 + 40 * 7


async def test_falling_back_to_serial_for_a_lost_hold_cannot_deadlock(pg_url: str, tenant: str) -> None:
    """T2 runs serially (a key twice) and holds E's key lock waiting for R's; T1 commits E and a
    lost hold M, so it falls back to the serial path after locking E's row. Had T1 taken E's key
    lock only then (a key lock after a row lock), T1 and T2 would deadlock once R is free."""
    path = (tenant, f"{tenant}/ws:w")
    e, m, r = f"{tenant}/a-E", f"{tenant}/b-M", f"{tenant}/c-R"  # sorted: E < M < R

    def reserve(key: str) -> dict[str, Any]:
        return ledger.batch_op(ReserveRequest(key=key, scopes=path, amount_micros=100))

    commit_e = ledger.batch_op(CommitRequest(key=e, actual_micros=50, scopes=path))
    commit_m = ledger.batch_op(CommitRequest(key=m, actual_micros=70, scopes=path))
    release_r = ledger.batch_op(ReleaseRequest(key=r))
    conns = [await psycopg.AsyncConnection.connect(pg_url, autocommit=True) for _ in range(3)]
    t1, t2, t3 = conns
    try:
        await t3.execute("select keel_budget_batch(%s)", (Jsonb([reserve(e)]),))
        await t3.execute("begin")
        await t3.execute("select keel_budget_batch(%s)", (Jsonb([reserve(r)]),))  # holds R
        second = asyncio.create_task(
            t2.execute("select keel_budget_batch(%s)", (Jsonb([commit_e, reserve(r), release_r]),))
        )
        await asyncio.sleep(0.5)
        batch = "select keel_budget_batch(%s)"
        first = asyncio.create_task(t1.execute(batch, (Jsonb([commit_e, commit_m]),)))
        await asyncio.sleep(0.5)
        await t3.execute("commit")
        answers = [(await (await task).fetchone() or [None])[0] for task in (first, second)]
    finally:
        for c in conns:
            await c.close()
    assert answers[0][1]["lost_hold"] and answers[0][1]["committed_micros"] == 70
    assert {answers[0][0]["committed_micros"], answers[1][0]["committed_micros"]} == {50}
