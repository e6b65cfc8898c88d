"""Fault benchmark: many refund runs on one tenant budget while the infrastructure dies under them.

N concurrent runs ("Refund order ORD-n and e-mail the customer": lookup_order, issue_refund,
send_email; the real offline planner, the real tools) on one tenant whose budget is set so
that only part of them fit, spread over W ``python worker.py`` processes. While they run,
workers are SIGKILLed and restarted, PostgreSQL is crashed (SIGQUIT to the postmaster: an
immediate shutdown, no checkpoint) and restarted, and optionally the Temporal dev server is
SIGKILLed and restarted. After every run has ended, the promise of issue 15 is checked from
the outside, against the database:

* every ``tool_effects`` row with ``ok`` of these runs belongs to a step the run reports
  ``succeeded`` or ``compensated`` (step id = the key's suffix), a compensation's row to a
  step reported ``compensated``; every step reported ``succeeded``/``compensated`` has its row;
* every refund row matches its step (``issued`` = succeeded, ``voided`` = compensated) and no
  order is refunded past its total; every e-mail in the outbox belongs to a succeeded step;
* run-reported spend (``AgentResponse.spend.total_micros``) equals the ledger's ``spent`` of
  the run's scope;
* the ledger invariant holds on the scopes these runs charged; ``audit verify`` passes for the
  tenant; no run slot is left taken.

A check that fails raises ``FaultBroken`` with every finding (run id, step, rows), so the
test prints exactly what broke. The test (``tests/test_fault.py``) runs this at 36 runs and 2
workers on the session's dev server; the benchmark at 150 runs and 3 workers with its own
services, the dev server killed too.

    python bench/bench_fault.py [--runs 150] [--workers 3] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from temporalio.client import Client, WorkflowFailureError  # noqa: E402

from bench.bench_recovery import (  # noqa: E402
    WorkerProcess,
    relevant_violations,
    start_worker,
    wait_polling,
    worker_environment,
)
from keel.devservices import DevServices  # noqa: E402
from keel.settings import Settings  # noqa: E402

__all__ = ["FaultBroken", "crash_postgres", "fault_run", "run"]

TENANT, USER = "acme", "alice"
MESSAGE = "Refund order {order} and e-mail the customer"
ORDER_MICROS = 12_500_000
"""Each run refunds what is left on its own order: $12.50, far below the approval rule."""


class FaultBroken(AssertionError):
    """The promise broke; the message lists every finding."""


# ---------------------------------------------------------------------------- faults
def crash_postgres(pg: DevServices) -> None:
    """Immediate shutdown (SIGQUIT to the postmaster): no checkpoint, backends killed at once."""
    pid = int((pg.pg_data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise RuntimeError("postmaster did not exit after SIGQUIT")


def kill_temporal(temporal: DevServices) -> None:
    """SIGKILL the dev server's process group (no graceful stop), then wait for it to go."""
    pid = int((temporal.state / "temporal.pid").read_text().split()[0])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while temporal.temporal_running() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the run
@dataclasses.dataclass
class _Fleet:
    """The worker processes of one fault run; every one started here is stopped here."""

    env: dict[str, str]
    log_dir: Path
    started: list[WorkerProcess] = dataclasses.field(default_factory=list)
    live: list[WorkerProcess] = dataclasses.field(default_factory=list)
    frozen: list[WorkerProcess] = dataclasses.field(default_factory=list)

    def spawn(self) -> WorkerProcess:
        w = start_worker(self.env, self.log_dir, str(len(self.started)))
        self.started.append(w)
        self.live.append(w)
        return w

    async def replace(self, client: Client, queue: str) -> WorkerProcess:
        """Start a worker and wait until it polls; one that exits at start (its migration
        met a database that was going down) is started again, as a supervisor would."""
        for _ in range(3):
            w = self.spawn()
            try:
                await wait_polling(client, queue, w, within=90)
                return w
            except RuntimeError:
                self.live.remove(w)
        raise RuntimeError(f"no worker would start; see {self.log_dir}")

    def kill(self, i: int) -> WorkerProcess:
        w = self.live.pop(i % len(self.live))
        w.kill()
        return w

    def freeze(self, w: WorkerProcess) -> None:
        os.kill(w.proc.pid, signal.SIGSTOP)
        self.frozen.append(w)

    def thaw(self, w: WorkerProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.proc.pid, signal.SIGCONT)
        self.frozen.remove(w)

    def stop_all(self) -> None:
        for w in list(self.frozen):  # a stopped process would sit on its SIGTERM
            self.thaw(w)
        for w in self.started:
            w.stop()


async def _count_effects(url: str, prefix: str, tool: str) -> int:
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=3) as conn:
            row = await (
                await conn.execute(
                    "select count(*) from tool_effects where ok and tool=%s and idempotency_key like %s",
                    (tool, prefix + "%"),
                )
            ).fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


async def _until(check: Callable[[], Awaitable[bool]], within: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every)
    return False


async def fault_run(
    client: Client,
    settings: Settings,
    pg: DevServices,
    *,
    runs: int,
    workers: int,
    log_dir: Path,
    admit_share: float = 0.6,
    temporal: DevServices | None = None,
    kill_every_s: float = 0.0,
    within_s: float = 120.0,
    base_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One fault run; returns its figures, or raises ``FaultBroken`` listing what broke.

    ``settings`` names the Temporal server (``client``'s) and the PostgreSQL ``pg`` runs,
    which is crashed. ``admit_share`` is the share of runs the tenant's budget is set to
    afford. With ``temporal`` the dev server is SIGKILLed too; with ``kill_every_s`` a worker
    is SIGKILLed (and replaced) that often until every run has ended, besides the two fixed
    kills around the database crash.
    """
    from keel.db import apply_migrations
    from keel.models import AgentRequest, AgentResponse
    from keel.submit import start_or_attach

    url = settings.database_url
    batch = uuid.uuid4().hex[:8]
    prefix = f"agent/{TENANT}/%/fault-{batch}-"  # a LIKE pattern: the id carries the agent
    queue = f"fault-{batch}"
    await asyncio.to_thread(apply_migrations, settings.owner_url)  # the owner migrates
    orders = await _orders(url, runs + 1)

    fleet = _Fleet(worker_environment(settings, queue, base_env), log_dir)
    faults: list[str] = []
    t0 = time.monotonic()

    async def start(i: int, order: str) -> Any:
        req = AgentRequest(
            tenant=TENANT,
            user=USER,
            request_id=f"fault-{batch}-{i:03d}",
            message=MESSAGE.format(order=order),
            max_budget_usd=0.5,
        )
        handle, _ = await start_or_attach(client, req, task_queue=queue)
        return handle

    try:
        for _ in range(workers):
            fleet.spawn()
        for w in fleet.live:
            await wait_polling(client, queue, w, within=90)
        # A probe run, undisturbed and unlimited, measures what one run spends; the tenant's
        # limit is derived from it, so the share that fits does not hang on the day's prices.
        probe = await _outcome(await start(0, orders[0]))
        if not isinstance(probe[1], AgentResponse) or probe[1].outcome != "completed":
            raise RuntimeError(f"the probe run did not complete: {_outcome_of(probe[1])}")
        per_run = probe[1].spend.total_micros
        limit = await _set_limit(url, per_run, runs, admit_share)
        # A sixth of the orders each is pinned for the zombie and for the database crash.
        pins = (await _pin(url, orders[1::6]), await _pin(url, orders[4::6]))
        t_start = time.monotonic()
        handles = list(await asyncio.gather(*(start(i, order) for i, order in enumerate(orders[1:], 1))))
        results = asyncio.gather(*(_outcome(h) for h in handles))
        chaos = asyncio.create_task(
            _chaos(
                client,
                settings,
                pg,
                fleet,
                queue,
                prefix,
                runs,
                pins,
                temporal,
                kill_every_s,
                faults,
                t_start,
            )
        )
        try:
            ended = await asyncio.wait_for(results, within_s)
        finally:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
            for pin in pins:
                with contextlib.suppress(Exception):
                    await pin.close()
        wall = time.monotonic() - t_start
    finally:
        fleet.stop_all()
        if not pg.postgres_running():  # never leave the database down for the checks (or others)
            pg.start_postgres()
    figures = await _check(url, [probe, *ended])
    figures["tool_attempts_retried"] = await _retried(handles)
    return {
        "runs": runs,
        "workers": workers,
        "worker_processes": len(fleet.started),
        "tenant_limit_usd": limit / 1e6,
        "per_run_usd": per_run / 1e6,
        **figures,
        "faults": faults,
        "wall_s": round(wall, 1),
        "total_s": round(time.monotonic() - t0, 1),
    }


async def _set_limit(url: str, per_run: int, runs: int, admit_share: float) -> int:
    """Limit the tenant to what it spent so far plus ``admit_share`` of ``runs`` more runs."""
    from keel.activities import ledger

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        view = await ledger.show(conn, TENANT)
        limit = (view.spent_micros if view else 0) + round(per_run * runs * admit_share)
        await ledger.set_limit(conn, TENANT, limit)
    return limit


async def _orders(url: str, n: int) -> list[str]:
    ids = [f"ORD-{random.randint(10**9, 10**12 - 1)}" for _ in range(n)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(
                "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
                "values (%s,%s,'alice@example.com','shipped','SKU-KEEL-1',%s)",
                [(o, TENANT, ORDER_MICROS) for o in ids],
            )
    return ids


async def _retried(handles: list[Any]) -> int:
    """``run_tool`` attempts that were retries (attempt >= 2), from the runs' histories: the
    faults really hit steps, not only the gaps between them. The demo's tools are local
    activities (``keel-23-local-tools``): a worker lost inside one leaves a workflow task that
    timed out or failed, and the next worker runs its tools again; those count too."""
    from temporalio.api.enums.v1 import EventType

    n = 0
    for h in handles:
        events = [e async for e in h.fetch_history_events()]
        n += sum(
            e.event_type
            in (EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
            for e in events
        )
        tools = {
            e.event_id
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == "run_tool"
        }
        n += sum(
            1
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and e.activity_task_started_event_attributes.scheduled_event_id in tools
            and e.activity_task_started_event_attributes.attempt >= 2
        )
    return n


async def _outcome(handle: Any) -> tuple[str, Any]:
    """(workflow id, AgentResponse) — or the failure when the workflow itself failed."""
    from temporalio.service import RPCError

    while True:
        try:
            return handle.id, await handle.result()
        except WorkflowFailureError as e:
            return handle.id, e
        except RPCError:  # the dev server is being killed and restarted: ask again
            await asyncio.sleep(0.5)


async def _waiting_refunds(url: str) -> int:
    """Refund attempts blocked inside their effect's transaction (on a pinned order row)."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=3) as conn:
            row = await (
                await conn.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                    " and query ilike '%from orders where id=%for update%'"
                )
            ).fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


async def _pin(url: str, orders: list[str]) -> psycopg.AsyncConnection[Any]:
    """Hold ``orders``' rows: their refunds block inside the effect's transaction (having
    taken the key's advisory lock) until this transaction ends — or the database dies."""
    conn = await psycopg.AsyncConnection.connect(url)
    await conn.execute("select 1 from orders where id = any(%s) for update", (orders,))
    return conn


async def _chaos(
    client: Client,
    settings: Settings,
    pg: DevServices,
    fleet: _Fleet,
    queue: str,
    prefix: str,
    runs: int,
    pins: tuple[psycopg.AsyncConnection[Any], psycopg.AsyncConnection[Any]],
    temporal: DevServices | None,
    kill_every_s: float,
    faults: list[str],
    t0: float,
) -> None:
    """The faults, at peak load, each where it hurts most:

    1. a zombie: with refunds blocked inside their transactions, a worker is frozen
       (SIGSTOP) past the tool's heartbeat timeout, so the server retries its attempts
       elsewhere; the blocked rows are freed and the frozen worker thawed, so its stale
       attempts and their retries race for the same keys;
    2. a worker SIGKILLed and replaced;
    3. PostgreSQL crashed (immediate shutdown) while more refunds are blocked inside their
       transactions, and restarted; another worker SIGKILLed and replaced (with
       ``temporal``, the dev server SIGKILLed and restarted too);
    4. with ``kill_every_s``, a worker SIGKILLed and replaced that often until the end.
    """
    from keel.workflows.options import TOOL_HEARTBEAT

    url = settings.database_url
    zombie_pin, crash_pin = pins

    def note(what: str) -> None:
        faults.append(f"{time.monotonic() - t0:5.1f}s {what}")

    async def refunds_reach(n: int) -> bool:
        return await _count_effects(url, prefix, "issue_refund") >= n

    async def blocked(n: int) -> bool:
        return await _waiting_refunds(url) >= n

    await _until(lambda: blocked(max(2, runs // 12)), 60)
    zombie = fleet.live[-1]
    blocked_now = await _waiting_refunds(url)
    note(f"SIGSTOP worker {zombie.identity}, {blocked_now} refunds blocked in their transactions")
    fleet.freeze(zombie)
    await asyncio.sleep(TOOL_HEARTBEAT.total_seconds() + 2.0)
    await zombie_pin.rollback()
    note("pinned rows of the zombie set released")
    await asyncio.sleep(0.3)
    fleet.thaw(zombie)
    note(f"SIGCONT worker {zombie.identity}")
    await asyncio.sleep(1.0)
    note(f"SIGKILL worker {fleet.kill(0).identity}")
    await fleet.replace(client, queue)  # started while the database is up: it migrates first
    note("worker replaced")
    await _until(lambda: refunds_reach(max(2, runs // 4)), 20)
    waiting = await _waiting_refunds(url)
    crash_postgres(pg)
    note(f"PostgreSQL immediate shutdown (SIGQUIT), {waiting} refunds blocked in their transactions")
    with contextlib.suppress(Exception):
        await crash_pin.close()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(pg.start_postgres)
    note("PostgreSQL restarted (crash recovery)")
    note(f"SIGKILL worker {fleet.kill(0).identity}")
    if temporal is not None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(kill_temporal, temporal)
        note("Temporal dev server SIGKILL")
        await asyncio.to_thread(temporal.start_temporal)
        note("Temporal dev server restarted")
    await fleet.replace(client, queue)
    note("worker replaced")
    while kill_every_s > 0:
        await asyncio.sleep(kill_every_s)
        note(f"SIGKILL worker {fleet.kill(random.randrange(len(fleet.live))).identity}")
        await fleet.replace(client, queue)


# ---------------------------------------------------------------------------- the checks
async def _check(url: str, ended: list[tuple[str, Any]]) -> dict[str, Any]:
    """Every check of the module docstring over ``ended`` (the probe run first); the figures."""
    from keel.activities import audit, concurrency, ledger
    from keel.budget import scope_path
    from keel.models import AgentResponse, StepState

    wids = [w for w, _ in ended]
    by_wid: dict[str, Any] = dict(ended)
    broken: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        effects = await (
            await conn.execute(
                "select idempotency_key, tool, ok from tool_effects where idempotency_key = any(%s)"
                " or idempotency_key like any(%s) order by idempotency_key",
                (wids, [f"{w}/%" for w in wids]),
            )
        ).fetchall()
        refunds = await (
            await conn.execute(
                "select idempotency_key, order_id, amount_micros, status from refunds"
                " where idempotency_key like any(%s)",
                ([f"{w}/%" for w in wids],),
            )
        ).fetchall()
        emails = await (
            await conn.execute(
                "select idempotency_key from email_outbox where idempotency_key like any(%s)",
                ([f"{w}/%" for w in wids],),
            )
        ).fetchall()
        spent = {}
        for w in wids:
            view = await ledger.show(conn, scope_path(TENANT, "default", USER, w)[-1])
            spent[w] = (view.spent_micros, view.reserved_micros) if view else (0, 0)
        tenant = await ledger.show(conn, TENANT)
        violations = relevant_violations(await ledger.check_invariant(conn), wids, TENANT)
        verified = await audit.verify(conn, TENANT)
        slots = await concurrency.in_flight(conn, TENANT)

    def steps_of(wid: str) -> dict[str, Any]:
        resp = by_wid[wid]
        return {s.id: s for s in resp.steps} if isinstance(resp, AgentResponse) else {}

    ok_keys = set()
    for key, tool, ok in effects:
        if not ok:
            continue
        ok_keys.add(key)
        if key.endswith("/compensate"):
            wid, step_id = key.removesuffix("/compensate").rsplit("/", 1)
            want = {StepState.COMPENSATED}
        else:
            wid, step_id = key.rsplit("/", 1)
            want = {StepState.SUCCEEDED, StepState.COMPENSATED}
        step = steps_of(wid).get(step_id)
        if step is None or step.state not in want:
            broken.append(
                f"effect {key} ({tool}) is recorded ok, but {wid} reports step {step_id} as "
                f"{step.state.value if step else 'absent'}"
                + (f" ({step.error[:160]})" if step and step.error else "")
                + f"; run outcome {_outcome_of(by_wid[wid])}"
            )
    for wid, resp in ended:
        for s in steps_of(wid).values():
            if s.state in (StepState.SUCCEEDED, StepState.COMPENSATED) and f"{wid}/{s.id}" not in ok_keys:
                broken.append(f"{wid} reports step {s.id} ({s.tool}) {s.state.value} with no effect recorded")
            if s.state == StepState.COMPENSATED and f"{wid}/{s.id}/compensate" not in ok_keys:
                broken.append(f"{wid} reports step {s.id} compensated with no compensation recorded")
        if isinstance(resp, AgentResponse):
            got, (led, held) = resp.spend.total_micros, spent[wid]
            if got != led:
                broken.append(
                    f"{wid} reports spend {got} micro-USD, the ledger's run scope says spent {led} "
                    f"(reserved {held}); outcome {resp.outcome}, steps "
                    + ", ".join(f"{s.id}:{s.tool}:{s.state.value}" for s in resp.steps)
                )
        else:
            broken.append(f"{wid} FAILED as a workflow: {_outcome_of(resp)}")
    for wid, resp in ended:  # a plan the budget refused must not have acted at all
        if isinstance(resp, AgentResponse) and "admission_refused" in resp.flags:
            acted = sorted(k for k in ok_keys if k.startswith(f"{wid}/"))
            if acted:
                broken.append(f"{wid} was refused at admission but has effects: {', '.join(acted)}")
    per_order: Counter[str] = Counter()
    for key, order, amount, status in refunds:
        wid, step_id = key.rsplit("/", 1)
        step = steps_of(wid).get(step_id)
        want = {"issued": StepState.SUCCEEDED, "voided": StepState.COMPENSATED}.get(status)
        if step is None or step.state != want:
            broken.append(
                f"refund {order} ${amount / 1e6:.2f} is {status} but {wid} reports step {step_id} as "
                f"{step.state.value if step else 'absent'}"
            )
        if status == "issued":
            per_order[order] += amount
    broken += [
        f"order {o} refunded ${m / 1e6:.2f} of $12.50" for o, m in per_order.items() if m > ORDER_MICROS
    ]
    for (key,) in emails:
        wid, step_id = key.rsplit("/", 1)
        step = steps_of(wid).get(step_id)
        if step is None or step.state != StepState.SUCCEEDED:
            broken.append(
                f"e-mail {key} is in the outbox but {wid} reports {step.state.value if step else 'no step'}"
            )
    broken += [f"ledger invariant: {v}" for v in violations]
    if not verified.ok:
        broken.append(f"audit verify: {verified.reason}")
    if slots:
        broken.append(f"{slots} run slot(s) of {TENANT} still taken")
    if broken:
        raise FaultBroken(f"{len(broken)} finding(s):\n" + "\n".join(broken))

    # The figures count the burst; the probe run was checked above like every other.
    counted = ended[1:]
    responses = [r for _, r in counted if isinstance(r, AgentResponse)]
    burst = {w for w, _ in counted}
    voided = {k.rsplit("/", 1)[0] for k, _, _, status in refunds if status == "voided"} & burst
    outcomes = Counter(r.outcome for r in responses)
    if len(counted) > len(responses):
        outcomes["workflow_failed"] = len(counted) - len(responses)
    return {
        "completed": outcomes.get("completed", 0),
        "refused_at_admission": sum("admission_refused" in r.flags for r in responses),
        "refused_at_model_call": sum(
            r.outcome == "budget_exhausted"
            and "admission_refused" not in r.flags
            and not any(s.state in (StepState.SUCCEEDED, StepState.COMPENSATED) for s in r.steps)
            for r in responses
        ),
        "budget_reasons": dict(
            Counter(r.reason.split(":", 1)[0] for r in responses if r.outcome == "budget_exhausted")
        ),
        "stopped_mid_plan": len(voided),
        "failed": outcomes.get("failed", 0) + outcomes.get("workflow_failed", 0),
        "outcomes": dict(sorted(outcomes.items())),
        "not_completed": [
            f"{r.workflow_id}: {r.outcome} ({r.reason[:120]}); "
            + ", ".join(
                f"{s.id}:{s.tool}:{s.state.value}" + (f" [{s.error[:100]}]" if s.error else "")
                for s in r.steps
            )
            for r in responses
            if r.outcome not in ("completed", "budget_exhausted")
        ],
        "effects_recovered": sum("effect_recovered" in r.flags for r in responses),
        "refunds_issued": sum(1 for k, *_, s in refunds if s == "issued" and k.rsplit("/", 1)[0] in burst),
        "refunds_voided": len(voided),
        "emails": sum(1 for (k,) in emails if k.rsplit("/", 1)[0] in burst),
        "tenant_spent_usd": tenant.spent_micros / 1e6 if tenant else 0.0,
        "tenant_over_limit_usd": (tenant.over_limit_micros or 0) / 1e6 if tenant else 0.0,
        "ledger_violations": 0,
        "audit_rows_verified": verified.checked,
    }


def _outcome_of(resp: Any) -> str:
    from keel.models import AgentResponse

    if isinstance(resp, AgentResponse):
        return f"{resp.outcome} ({resp.reason[:160]})"
    cause = getattr(resp, "cause", None)
    return f"workflow failed: {cause or resp}"[:300]


# ---------------------------------------------------------------------------- bench
async def run(
    settings: Settings,
    client: Client | None = None,
    *,
    runs: int = 150,
    workers: int = 3,
    smoke: bool = False,
    log_dir: str = "",
) -> dict[str, Any]:
    """The big variant against ``settings``' own services (both are killed)."""
    from keel.client import connect

    client = client or await connect(settings)
    services = DevServices(settings)
    if smoke:
        runs, workers = 30, 2
    with tempfile.TemporaryDirectory(prefix="keel-fault-") as tmp:
        logs = Path(log_dir or tmp)  # main() creates --logs
        return await fault_run(
            client,
            settings,
            services,
            runs=runs,
            workers=workers,
            log_dir=logs,
            temporal=services,
            kill_every_s=2.0,
            within_s=600.0,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--logs", default="", help="keep the worker logs in this folder")
    args = parser.parse_args()
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
    from bench.common import own_services

    with own_services(policy_file=ROOT / "config" / "policy.yaml") as settings:
        result = asyncio.run(
            run(settings, runs=args.runs, workers=args.workers, smoke=args.smoke, log_dir=args.logs)
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
