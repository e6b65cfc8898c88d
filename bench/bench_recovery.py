"""Recovery benchmark: SIGKILL the worker that holds a run mid-step; the run ends elsewhere.

Each round starts a refund run ("Refund order ORD-n and e-mail the customer": lookup_order,
issue_refund, send_email; the real offline planner, the real tools) on worker process A, and
holds the order's row lock so ``issue_refund`` is caught mid-step: its activity is running on
A, heartbeating, inside its transaction. Then worker B starts, A is killed with SIGKILL, the
lock is released, and we measure

* ``kill_to_step_s`` — SIGKILL until the refund step's effect is committed by B (Temporal
  noticed the missing heartbeats, retried the activity on B, B ran it exactly once);
* ``kill_to_done_s`` — SIGKILL until the run's result (the rest of the run on B, after the
  sticky-queue timeout moves the workflow task off the dead worker).

Every round checks what the tests check: one refund, one e-mail, one effect row per key, the
retried attempt ran on B, and the ledger invariant holds. B is the next round's A, so K rounds
cost K+1 worker processes. Workers are ``python worker.py`` processes, logging to files.

    python bench/bench_recovery.py [--k 10] [--smoke]     # own services on free ports
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from temporalio.api.enums.v1 import EventType, TaskQueueType  # noqa: E402
from temporalio.api.taskqueue.v1 import TaskQueue  # noqa: E402
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest  # noqa: E402
from temporalio.client import Client  # noqa: E402

from keel.settings import PROJECT_ROOT, Settings, offline_env  # noqa: E402

__all__ = ["WorkerProcess", "kill_round", "relevant_violations", "run", "worker_environment"]


@dataclass
class WorkerProcess:
    """A ``python worker.py`` child; its Temporal identity is the SDK default ``pid@host``."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def identity(self) -> str:
        return f"{self.proc.pid}@{socket.gethostname()}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


def worker_environment(
    settings: Settings, task_queue: str, base: dict[str, str] | None = None
) -> dict[str, str]:
    """``worker.py`` pointed at ``settings`` on ``task_queue``, demo policy and tools."""
    return offline_env(
        settings,
        base,
        KEEL_TASK_QUEUE=task_queue,
        KEEL_POLICY_FILE=str(PROJECT_ROOT / "config" / "policy.yaml"),
    )


def start_worker(env: dict[str, str], log_dir: Path, name: str) -> WorkerProcess:
    log = log_dir / f"worker-{name}.log"
    with open(log, "ab") as out:  # never a pipe: an unread pipe freezes the worker
        proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "worker.py")],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return WorkerProcess(proc=proc, log=log)


async def _until(what: str, check: Any, within: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every)
    raise TimeoutError(f"{what} did not happen within {within} s")


async def wait_polling(client: Client, task_queue: str, worker: WorkerProcess, within: float = 60.0) -> None:
    """Until ``worker`` polls both the workflow and the activity side of ``task_queue``."""

    async def polling() -> bool:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}; see {worker.log}")
        for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
            resp = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace, task_queue=TaskQueue(name=task_queue), task_queue_type=kind
                )
            )
            if worker.identity not in {p.identity for p in resp.pollers}:
                return False
        return True

    await _until(f"worker {worker.identity} polling", polling, within, every=0.1)


async def _effect_exists(url: str, key: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute("select 1 from tool_effects where idempotency_key=%s", (key,))
        ).fetchone()
    return row is not None


async def _refund_waits(url: str) -> bool:
    """A backend waits on the order row's lock: the refund step is inside its transaction.
    The refund is a local activity (``keel-23-local-tools``; the run's first tool, the lookup,
    is an activity): no pending activity shows where it runs, so the only worker started yet
    is the one running it."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and query ilike %s",
                ("%from orders where id%for update%",),
            )
        ).fetchone()
    return bool(row and row[0])


def relevant_violations(violations: list[str], workflow_ids: list[str], tenant: str = "acme") -> list[str]:
    """Ledger-invariant violations on the scopes these runs charged.

    ``check_invariant`` looks at the whole database, which other tests share (some set limits
    below spend on purpose); a run can only break the scopes it charges: its own run scope,
    its ancestors and the tenant's tool and model scopes.
    """
    from keel.budget import scope_path

    ours = {sc for w in workflow_ids for sc in scope_path(tenant, "default", "alice", w)}
    out = []
    for v in violations:
        scope = v[len("scope ") :].split(": ", 1)[0] if v.startswith("scope ") else ""
        if (
            scope in ours
            or scope.startswith((f"{tenant}/tool:", f"{tenant}/model:"))
            or any(w in v for w in workflow_ids)
        ):
            out.append(v)
    return out


async def kill_round(
    client: Client, settings: Settings, task_queue: str, holder: WorkerProcess, spare: Any
) -> tuple[dict[str, Any], WorkerProcess]:
    """One round; ``spare()`` starts the next worker. Returns figures and the new holder."""
    from keel.activities.ledger import check_invariant
    from keel.models import AgentResponse, StepState
    from keel.workflows.agent import TENANT, USER

    url = settings.database_url
    order = f"ORD-{uuid.uuid4().int % 10**11}"
    rid = f"kill-{uuid.uuid4().hex[:10]}"
    wid = f"agent/acme/{rid}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s,'acme','alice@example.com','shipped','SKU-KEEL-1',42500000)",
            (order,),
        )
    lock = await psycopg.AsyncConnection.connect(url)  # holds the order row: refund blocks
    try:
        await lock.execute("select 1 from orders where id=%s for update", (order,))
        from temporalio.common import SearchAttributePair, TypedSearchAttributes

        from keel.models import AgentRequest

        req = AgentRequest(
            tenant="acme",
            user="alice",
            request_id=rid,
            max_budget_usd=0.5,
            message=f"Refund order {order} and e-mail the customer",
        )
        handle = await client.start_workflow(
            "AgentWorkflow",
            req,
            id=wid,
            task_queue=task_queue,
            result_type=AgentResponse,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(TENANT, "acme"), SearchAttributePair(USER, "alice")]
            ),
        )
        await _until("refund step running on the holder", lambda: _refund_waits(url), 30.0, every=0.1)
        nxt = spare()
        await wait_polling(client, task_queue, nxt)
        t_kill = time.monotonic()
        holder.kill()
    finally:
        await lock.rollback()
        await lock.close()
    await _until(
        "refund effect committed elsewhere", lambda: _effect_exists(url, f"{wid}/s2"), 60.0, every=0.02
    )
    t_step = time.monotonic()
    resp = await asyncio.wait_for(handle.result(), 60.0)
    t_done = time.monotonic()

    assert resp.outcome == "completed", resp
    assert [(s.tool, s.state) for s in resp.steps] == [
        ("lookup_order", StepState.SUCCEEDED),
        ("issue_refund", StepState.SUCCEEDED),
        ("send_email", StepState.SUCCEEDED),
    ], resp.steps
    events = [e async for e in handle.fetch_history_events()]
    tools = [
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "run_tool"
    ]
    if len(tools) == 3:  # the activity path: the refund's activity ran again, on the next worker
        started = next(  # run_tool is scheduled for s1, s2, s3 in that order
            e.activity_task_started_event_attributes
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and e.activity_task_started_event_attributes.scheduled_event_id == tools[1]
        )
        attempt, identity = started.attempt, started.identity
    else:  # local tools: the dead worker's workflow task timed out and the next one ran it all
        lost = sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT for e in events)
        done = [
            e.workflow_task_completed_event_attributes.identity
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
        ]
        attempt, identity = lost + 1, done[-1]
    assert identity == nxt.identity, (identity, nxt.identity)
    assert attempt >= 2
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        refunds = await (
            await conn.execute(
                "select amount_micros, status from refunds where idempotency_key like %s", (f"{wid}/%",)
            )
        ).fetchall()
        emails = await (
            await conn.execute(
                "select count(*) from email_outbox where idempotency_key like %s", (f"{wid}/%",)
            )
        ).fetchone()
        effects = await (
            await conn.execute(
                "select tool, count(*) from tool_effects where idempotency_key like %s "
                "group by tool order by tool",
                (f"{wid}/%",),
            )
        ).fetchall()
        violations = relevant_violations(await check_invariant(conn), [wid])
    assert refunds == [(42_500_000, "issued")], refunds
    assert emails == (1,), emails
    assert effects == [("issue_refund", 1), ("lookup_order", 1), ("send_email", 1)], effects
    assert violations == [], violations
    return (
        {
            "workflow_id": wid,
            "kill_to_step_s": round(t_step - t_kill, 3),
            "kill_to_done_s": round(t_done - t_kill, 3),
            "refund_attempt": attempt,
        },
        nxt,
    )


async def kill_rounds(
    client: Client, settings: Settings, *, k: int, log_dir: Path, base_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """K kill rounds on a fresh task queue; every worker started here is stopped here."""
    queue = f"recovery-{uuid.uuid4().hex[:8]}"
    env = worker_environment(settings, queue, base_env)
    started: list[WorkerProcess] = []

    def spare() -> WorkerProcess:
        w = start_worker(env, log_dir, str(len(started)))
        started.append(w)
        return w

    rounds: list[dict[str, Any]] = []
    try:
        holder = spare()
        await wait_polling(client, queue, holder)
        for _ in range(k):
            figures, holder = await kill_round(client, settings, queue, holder, spare)
            rounds.append(figures)
    finally:
        for w in started:
            w.stop()
    return rounds


def _summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"p50": round(statistics.median(s), 3), "min": s[0], "max": s[-1], "n": len(s)}


async def run(
    settings: Settings, client: Client | None = None, *, k: int = 10, smoke: bool = False
) -> dict[str, Any]:
    """K rounds (3 when ``smoke``) against ``settings``' services; returns the figures."""
    from keel.client import connect

    client = client or await connect(settings)
    k = 3 if smoke else k
    with tempfile.TemporaryDirectory(prefix="keel-recovery-") as logs:
        t0 = time.monotonic()
        rounds = await kill_rounds(client, settings, k=k, log_dir=Path(logs))
        total = time.monotonic() - t0
    from keel.worker import STICKY_TIMEOUT
    from keel.workflows.agent import TOOL_HEARTBEAT

    return {
        "k": k,
        "kill_to_step_s": _summary([r["kill_to_step_s"] for r in rounds]),
        "kill_to_done_s": _summary([r["kill_to_done_s"] for r in rounds]),
        "heartbeat_timeout_s": TOOL_HEARTBEAT.total_seconds(),
        "sticky_timeout_s": STICKY_TIMEOUT.total_seconds(),
        "side_effects_duplicated": 0,
        "ledger_violations": 0,
        "wall_s": round(total, 1),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from bench.common import own_services

    with own_services(policy_file=PROJECT_ROOT / "config" / "policy.yaml") as settings:
        result = asyncio.run(run(settings, k=args.k, smoke=args.smoke))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
