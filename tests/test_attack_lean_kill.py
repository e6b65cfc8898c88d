"""Attacks on the lean run shape (patch ``keel-23-lean-run``, and ``keel-23-begin-local`` that
new runs take): the model-less ``finish_run`` is a LOCAL activity, so it runs inside a
workflow task and leaves no activity events, and the run's preparation runs inside
``begin_local`` (a local activity too with the offline model these workers run; before its
first plan; ``where="begin_run"`` names the preparation, whichever activity holds it). A worker
SIGKILLed while one of them is inside its database transaction must leave nothing
half-done, and the next worker must run it again to the same end.

The worker is a real ``worker.py`` process (offline planner, real tools). The test pins the
moment: it holds a lock the transaction needs (the tenant's run-slot advisory lock for
``begin_run``'s preparation, the run's ``run_slots`` row for ``finish_run``), waits
until PostgreSQL shows that backend waiting on it, SIGKILLs the worker, lets go, and starts a
fresh worker. Checked from the database: the run ends ``completed``; no run slot is left;
exactly one authorization row and one finish row; one refund; the run's reported spend
equals the ledger's; the tenant's audit chain verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from temporalio.client import Client

from bench.bench_fault import crash_postgres
from bench.bench_recovery import start_worker, wait_polling, worker_environment
from keel.activities import audit, ledger
from keel.budget import scope_path
from keel.devservices import DevServices, free_port
from keel.models import AgentResponse
from keel.settings import Settings
from tests.helpers import request
from tests.scripted import start

SLOT_LOCK_CLASS = 7_345_005  # activities/concurrency.py _LOCK_CLASS


async def _wait_backend(
    url: str, condition: str, params: tuple[Any, ...], within: float, failure: str
) -> None:
    """Until a backend of the server other than this one matches ``condition`` (over
    ``pg_stat_activity a``); else ``AssertionError(failure)`` with what the backends were doing."""
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = await (
                await conn.execute(
                    "select count(*) from pg_stat_activity a where a.pid <> pg_backend_pid() and "
                    + condition,
                    params,
                )
            ).fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.05)
        seen = await (
            await conn.execute(
                "select state, wait_event, xact_start is not null, left(query, 80) from pg_stat_activity "
                "where backend_type = 'client backend' and pid <> pg_backend_pid()"
            )
        ).fetchall()
    raise AssertionError(f"{failure}: {seen}")


async def _wait_blocked(url: str, query_like: str, within: float = 60.0) -> None:
    """A backend waiting on a lock, in a statement like ``query_like``."""
    condition = "a.wait_event_type in ('Lock') and a.query ilike %s"
    await _wait_backend(url, condition, (query_like,), within, f"no backend ever waited on {query_like!r}")


async def _start_pinned(
    client: Client, queue: str, holder: Any, pg_url: str, where: str, order: str, tenant: str
) -> Any:
    """Start a refund run and pin it inside ``where``'s transaction: ``holder`` holds the lock
    that transaction needs (the tenant's slot lock for ``begin_run``, the run's ``run_slots``
    row for the finish), and this returns once PostgreSQL shows the run's backend waiting."""
    if where == "begin_run":
        await holder.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (SLOT_LOCK_CLASS, tenant))
        handle = await start(
            client, queue, request(f"Refund order {order} and e-mail the customer", tenant=tenant)
        )
        await _wait_blocked(pg_url, "%pg_advisory_xact_lock%")
        return handle
    handle = await start(
        client, queue, request(f"Refund order {order} and e-mail the customer", tenant=tenant)
    )
    deadline = time.monotonic() + 60
    while not await (
        await holder.execute("select 1 from run_slots where workflow_id=%s for update", (handle.id,))
    ).fetchone():
        await holder.rollback()
        assert time.monotonic() < deadline, "the run never took its slot"
        await asyncio.sleep(0.05)
    await _wait_blocked(pg_url, "%delete from run_slots%")
    return handle


async def _order(url: str, tenant: str) -> str:
    """A new shipped $12.50 order of ``tenant`` (its refunds need no approval)."""
    order = f"ORD-{uuid.uuid4().int % 10**11}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s,%s,'alice@example.com','shipped','SKU-KEEL-1',12500000)",
            (order, tenant),
        )
    return order


async def _checks(url: str, handle: Any, tenant: str) -> None:
    resp: AgentResponse = await asyncio.wait_for(handle.result(), timeout=120)
    wid = handle.id
    assert resp.outcome == "completed", (resp.outcome, resp.reason)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        slots = await (
            await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
        ).fetchone()
        rows = await (
            await conn.execute(
                "select idem_key from audit_log where workflow_id=%s and kind='run' order by seq", (wid,)
            )
        ).fetchall()
        refunds = await (
            await conn.execute("select count(*) from refunds where idempotency_key like %s", (wid + "/%",))
        ).fetchone()
        view = await ledger.show(conn, scope_path(tenant, "default", "alice", wid)[-1])
        verdict = await audit.verify(conn, tenant)
    assert slots == (0,)
    keys = [r[0] for r in rows]
    assert keys.count(f"{wid}/finish") == 1 and keys.count(f"{wid}/authorize") == 1, keys
    assert refunds == (1,)
    assert view is not None and view.spent_micros == resp.spend.total_micros and view.reserved_micros == 0, (
        view,
        resp.spend,
    )
    assert verdict.ok, verdict


# Suite budget: 12 s each (a worker start, a kill, a second start); the local-tools kill below
# stays in `make test`, these two run in `make test-slow` (the suite took 608 s in CI with them).
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["begin_run", "finish_run"])
async def test_sigkill_inside_a_local_activity_transaction(
    where: str,
    client: Client,
    temporal_services: Settings,
    pg_url: str,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tenant = "acme"  # the policy's tenant whose user alice may refund
    queue = f"lean-kill-{uuid.uuid4().hex[:8]}"
    env = worker_environment(temporal_services, queue, test_env)
    order = await _order(pg_url, tenant)
    first = start_worker(env, tmp_path, "first")
    second = None
    holder = await psycopg.AsyncConnection.connect(pg_url)
    try:
        await wait_polling(client, queue, first, within=90)
        handle = await _start_pinned(client, queue, holder, pg_url, where, order, tenant)
        first.kill()
        await holder.rollback()  # let go: the dead worker's transaction must roll back
        second = start_worker(env, tmp_path, "second")
        await wait_polling(client, queue, second, within=90)
        await _checks(pg_url, handle, tenant)
    finally:
        await holder.close()
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.timeout(240)
async def test_sigkill_after_local_tool_effects_committed_before_their_markers(
    client: Client,
    temporal_services: Settings,
    pg_url: str,
    owner_pg_url: str,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """The demo's tools are local activities (patch ``keel-23-local-tools``) but the first,
    ``lookup_order``, an activity that ends the task the run began in. ``issue_refund`` and
    ``send_email`` then run in one workflow task, and their results reach history only when
    it completes. The worker is SIGKILLed while ``send_email`` waits inside its effect
    transaction, AFTER ``issue_refund`` committed its effect and record but before its marker
    was written. The next worker runs that task again: the refund must be found under its
    key, not made twice; the e-mail sent once; the spend the run reports the ledger's."""
    tenant = "acme"
    queue = f"tools-kill-{uuid.uuid4().hex[:8]}"
    env = worker_environment(temporal_services, queue, test_env)
    order = await _order(pg_url, tenant)
    first = start_worker(env, tmp_path, "first")
    second = None
    holder = await psycopg.AsyncConnection.connect(owner_pg_url)
    try:
        await wait_polling(client, queue, first, within=90)
        # Inserts into the outbox wait behind this lock; the refund's tables do not.
        await holder.execute("lock table email_outbox in share row exclusive mode")
        handle = await start(
            client, queue, request(f"Refund order {order} and e-mail the customer", tenant=tenant)
        )
        await _wait_blocked(pg_url, "%insert into email_outbox%")
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            made = await (
                await conn.execute(
                    "select count(*) from refunds where idempotency_key like %s", (handle.id + "/%",)
                )
            ).fetchone()
        history = await handle.fetch_history()
        tools = [
            e
            for e in history.events
            if e.HasField("marker_recorded_event_attributes")
            and "data" in e.marker_recorded_event_attributes.details
            and b'"run_tool"' in e.marker_recorded_event_attributes.details["data"].payloads[0].data
        ]
        # The refund is made and recorded, but its task is still open: no local tool's marker
        # is in history (the lookup is an activity there, the beginning a marker).
        assert made == (1,) and tools == [], (made, len(tools))
        first.kill()
        await holder.rollback()
        second = start_worker(env, tmp_path, "second")
        await wait_polling(client, queue, second, within=90)
        await _checks(pg_url, handle, tenant)
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            sent = await (
                await conn.execute(
                    "select count(*) from email_outbox where idempotency_key like %s", (handle.id + "/%",)
                )
            ).fetchone()
        assert sent == (1,)
        resp: AgentResponse = await handle.result()
        replayed = [r.id for r in resp.steps if "(replayed)" in r.summary]
        refund = [r.id for r in resp.steps if r.tool == "issue_refund"]
        assert refund and refund[0] in replayed, [(r.id, r.summary) for r in resp.steps]
    finally:
        await holder.close()
        first.stop()
        if second is not None:
            second.stop()


@pytest.fixture
def own_pg(temporal_services: Settings) -> Iterator[DevServices]:
    """A PostgreSQL of this test's own (the session's must not crash), on the session's Temporal."""
    state = Path(tempfile.mkdtemp(prefix="keel-lean-pg-"))
    port = free_port()
    services = DevServices(
        dataclasses.replace(
            temporal_services,
            state_dir=state,
            pg_port=port,
            database_url=f"postgresql://keel_app@127.0.0.1:{port}/keel",
            database_owner_url=f"postgresql://postgres@127.0.0.1:{port}/keel",
        )
    )
    try:
        services.start_postgres()
        yield services
    finally:
        services.stop_postgres()
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow  # a 40 s outage, twice: `make test-slow`, not `make test`
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["begin_run", "finish_run"])
async def test_postgres_down_longer_than_the_local_activity_timeout(
    where: str, client: Client, own_pg: DevServices, test_env: dict[str, str], tmp_path: Path
) -> None:
    """PostgreSQL crashes (immediate shutdown) while the local activity waits inside its
    transaction and stays down 40 s, longer than the 30 s local-activity timeout: the run
    must still end (prepare may give up and fail the run; the ending waits the outage out),
    with no slot left, no second authorization or finish row, and the chain intact."""
    settings = own_pg.settings
    url = settings.database_url
    tenant = "acme"
    queue = f"lean-pg-{uuid.uuid4().hex[:8]}"
    env = worker_environment(settings, queue, test_env)
    worker = start_worker(env, tmp_path, "w")
    try:
        await wait_polling(client, queue, worker, within=90)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            order = f"ORD-{uuid.uuid4().int % 10**11}"
            await conn.execute(
                "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
                "values (%s,%s,'alice@example.com','shipped','SKU-KEEL-1',12500000)",
                (order, tenant),
            )
        holder = await psycopg.AsyncConnection.connect(url)
        handle = await _start_pinned(client, queue, holder, url, where, order, tenant)
        crash_postgres(own_pg)
        with contextlib.suppress(psycopg.Error):
            await holder.close()
        await asyncio.sleep(40)
        await asyncio.to_thread(own_pg.start_postgres)
        resp: AgentResponse = await asyncio.wait_for(handle.result(), timeout=180)
        print(f"\n{where}: outcome {resp.outcome}: {resp.reason}")  # shown with -s
        wid = handle.id
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            slots = await (
                await conn.execute("select count(*) from run_slots where workflow_id=%s", (wid,))
            ).fetchone()
            keys = [
                r[0]
                for r in await (
                    await conn.execute(
                        "select idem_key from audit_log where workflow_id=%s and kind='run'", (wid,)
                    )
                ).fetchall()
            ]
            refunds = await (
                await conn.execute(
                    "select count(*) from refunds where idempotency_key like %s", (wid + "/%",)
                )
            ).fetchone()
            verdict = await audit.verify(conn, tenant)
        assert slots == (0,), resp
        assert keys.count(f"{wid}/authorize") <= 1 and keys.count(f"{wid}/finish") <= 1, keys
        if where == "finish_run":
            assert resp.outcome == "completed", (resp.outcome, resp.reason)
            assert keys.count(f"{wid}/finish") == 1 and refunds == (1,), (keys, refunds)
        else:
            assert refunds in ((0,), (1,)), refunds
            assert resp.outcome in ("completed", "failed"), (resp.outcome, resp.reason)
        assert verdict.ok, verdict
    finally:
        worker.stop()


async def _wait_frozen_in_transaction(url: str, where: str, within: float = 5.0) -> None:
    """The frozen worker's backend, inside its transaction and waiting on its client (``idle in
    transaction`` after a sync; ``active`` on ``ClientRead`` in the middle of a pipeline),
    holding what the next attempt needs: the tenant's slot lock (``begin_run``), or a row it
    deleted (the finish: its transaction has an id)."""
    waiting = (
        "a.backend_type = 'client backend' and a.xact_start is not null and a.wait_event = 'ClientRead' and "
    )
    if where == "begin_run":
        holds = (
            "exists (select 1 from pg_locks l where l.pid = a.pid and l.locktype = 'advisory' "
            "and l.granted and l.classid = %s)"
        )
        params: tuple[Any, ...] = (SLOT_LOCK_CLASS,)
    else:
        holds, params = "a.backend_xid is not null", ()
    await _wait_backend(
        url, waiting + holds, params, within, "the frozen worker never held a transaction open"
    )


@pytest.mark.slow  # waits out the transaction bound and worker starts: `make test-slow`
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["begin_run", "finish_run", "finish_run_baseline"])
async def test_a_frozen_worker_inside_a_run_transaction_does_not_hold_the_tenant(
    where: str,
    client: Client,
    temporal_services: Settings,
    pg_url: str,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A worker frozen (SIGSTOP, a paused VM) inside the preparation's transaction, with the
    tenant's slot lock, or inside the finish's, with the run's slot row and the tenant's
    audit head, must not hold them for as long as it stays frozen: every run of the tenant
    would wait on it. The server ends such a session ``TRANSACTION_BOUND_MS`` after it took
    them (``transaction_timeout``); the next worker's attempt goes on, and the run and a
    second run of the tenant end ``completed`` while the first worker is still frozen.

    ``begin_run`` and ``finish_run_baseline`` freeze the worker between two round trips of
    one transaction (the preparation's slot count; the finish's baseline read, forced with
    ``KEEL_FLAG_COST_MIN_MICROS=1``), so the test first sees the frozen backend inside its
    transaction, waiting on its client. ``finish_run`` (a run no baseline can flag) sends its
    whole transaction, ``COMMIT`` included, in one round trip: the server commits it without
    the client.
    """
    tenant = "acme"
    queue = f"lean-freeze-{uuid.uuid4().hex[:8]}"
    env = worker_environment(temporal_services, queue, test_env)
    if where == "finish_run_baseline":
        env["KEEL_FLAG_COST_MIN_MICROS"] = "1"
    order = await _order(pg_url, tenant)
    first = start_worker(env, tmp_path, "first")
    second = None
    holder = await psycopg.AsyncConnection.connect(pg_url)
    frozen = False
    try:
        await wait_polling(client, queue, first, within=90)
        handle = await _start_pinned(client, queue, holder, pg_url, where, order, tenant)
        os.kill(first.proc.pid, signal.SIGSTOP)
        frozen = True
        await holder.rollback()  # the frozen worker's statement now runs and takes the lock
        if where != "finish_run":
            await _wait_frozen_in_transaction(pg_url, where)
        second = start_worker(env, tmp_path, "second")
        await wait_polling(client, queue, second, within=90)
        # While the first worker stays frozen, the run must end, and so must a new one.
        await _checks(pg_url, handle, tenant)
        again = await start(
            client, queue, request(f"Refund order {await _order(pg_url, tenant)} and e-mail the customer")
        )
        await _checks(pg_url, again, tenant)
        assert first.proc.poll() is None, "the first worker was frozen, not gone"
    finally:
        if frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first.proc.pid, signal.SIGCONT)
        await holder.close()
        first.stop()
        if second is not None:
            second.stop()
