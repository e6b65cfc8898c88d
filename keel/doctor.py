"""What an operator checks first when a run misbehaves, as code: ``keel doctor``.

Each check answers one question ("is a worker polling the queue?", "are the migrations
applied?") with a one-line detail and, when it fails, what to do. The checks never change
anything: the doctor may run against production. ``queue_pollers`` is also what makes
``run``/``status``/``--follow`` say at once that no worker is listening instead of hanging.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from keel.client import connect
from keel.codec import load_keyring
from keel.db import MIGRATIONS_DIR
from keel.policy import load_policy
from keel.pricing import load_prices, price_for
from keel.settings import SEARCH_ATTRIBUTES, Settings
from keel.tiers import resolve_tiers

__all__ = ["Check", "POLLER_FRESH", "queue_pollers", "run_checks", "worker_queues"]

POLLER_FRESH = timedelta(seconds=90)
"""A poller counts as alive if it polled this recently: a worker re-polls at least every
~70 s (the long-poll timeout), and the server remembers a dead one for minutes."""

RPC_TIMEOUT = timedelta(seconds=2)
"""Every question the doctor (or the fast-failure path) asks Temporal gets at most this long."""


@dataclass(frozen=True)
class Check:
    """One answered question."""

    name: str
    ok: bool
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def queue_pollers(client: Any, namespace: str, queue: str, kind: str = "workflow") -> list[str]:
    """Identities of workers that polled ``queue`` for ``kind`` (workflow|activity) tasks lately."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    qtype = (
        TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
        if kind == "workflow"
        else TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
    )
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=namespace, task_queue=TaskQueue(name=queue), task_queue_type=qtype
        ),
        timeout=RPC_TIMEOUT,
    )
    now = datetime.now(UTC)
    alive = []
    for p in resp.pollers:
        seen = p.last_access_time.ToDatetime(tzinfo=UTC) if p.HasField("last_access_time") else now
        if now - seen <= POLLER_FRESH:
            alive.append(p.identity or "?")
    return alive


def worker_queues(settings: Settings) -> list[tuple[str, str]]:
    """(queue, kind) pairs a complete worker polls: the main queue for workflow and activity
    tasks, plus one activity queue per rate-limited tool."""
    # Imported here for start-up speed only: loading the tool catalogue imports every tool
    # module (the MCP SDK among them, seconds), and `keel run` reaches this module through
    # queue_pollers without needing it.
    from keel.activities.tools import catalog

    queues = [(settings.task_queue, "workflow"), (settings.task_queue, "activity")]
    queues += [
        (f"{settings.task_queue}-{getattr(t, 'queue', '') or f'tool-{t.name}'}", "activity")
        for t in catalog(include_hidden=True)
        if t.rate_limit_per_second
    ]
    return list(dict.fromkeys(queues))  # tools may share a queue


async def run_checks(settings: Settings, env: Mapping[str, str]) -> list[Check]:
    """Every check, in the order a person would look; a failed service skips what needs it."""
    checks: list[Check] = []
    client = await _check_temporal(settings, checks)
    if client is not None:
        await _guard(checks, "search attributes", lambda: _search_attributes(client, settings))
        for queue, kind in worker_queues(settings):
            await _guard(
                checks,
                f"worker: {queue} ({kind})",
                functools.partial(_pollers, client, settings, queue, kind),
            )
    if await _guard(
        checks, "postgres", lambda: _postgres(settings), down=f"cannot reach {_redact(settings.database_url)}"
    ):
        await _guard(checks, "migrations", lambda: _migrations(settings))
    await _guard(checks, "policy", lambda: _policy(settings))
    await _guard(checks, "prices", lambda: _prices(env))
    await _guard(checks, "codec keys", lambda: _codec(settings))
    return checks


async def _guard(
    checks: list[Check], name: str, fn: Callable[[], Awaitable[Check]], *, down: str = ""
) -> bool:
    try:
        check = await fn()
    except Exception as e:  # a check that breaks is a failed check, said in one line
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if down and type(e).__name__ == "OperationalError":
            check = Check(name, False, down, "start it with 'starter.py dev up' (or set KEEL_DATABASE_URL)")
        else:
            check = Check(name, False, f"{type(e).__name__}: {text}")
    checks.append(Check(name, check.ok, check.detail, check.hint))
    return check.ok


async def _check_temporal(settings: Settings, checks: list[Check]) -> Any:
    where = f"{settings.temporal_address} namespace {settings.temporal_namespace}"
    try:
        client = await asyncio.wait_for(connect(settings), timeout=5)
        await client.workflow_service.get_system_info(_system_info_request(), timeout=RPC_TIMEOUT)
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = "" if "connect" in text.lower() or isinstance(e, TimeoutError) else f" ({text[:100]})"
        checks.append(
            Check("temporal", False, f"cannot reach {where}{why}", "start it with 'starter.py dev up'")
        )
        return None
    checks.append(Check("temporal", True, f"reachable at {where}"))
    return client


def _system_info_request() -> Any:
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

    return GetSystemInfoRequest()


async def _search_attributes(client: Any, settings: Settings) -> Check:
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

    resp = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=settings.temporal_namespace), timeout=RPC_TIMEOUT
    )
    have = {
        k: IndexedValueType.Name(v).removeprefix("INDEXED_VALUE_TYPE_").replace("_", "").lower()
        for k, v in resp.custom_attributes.items()
    }
    wrong = [
        f"{name} ({'missing' if name not in have else have[name]}, want {kind.lower()})"
        for name, kind in SEARCH_ATTRIBUTES.items()
        if have.get(name) != kind.lower()
    ]
    if wrong:
        create = " ".join(f"--name {n} --type {k}" for n, k in SEARCH_ATTRIBUTES.items())
        return Check(
            "search attributes",
            False,
            "; ".join(wrong),
            f"temporal operator search-attribute create {create}",
        )
    return Check("search attributes", True, ", ".join(SEARCH_ATTRIBUTES))


async def _pollers(client: Any, settings: Settings, queue: str, kind: str) -> Check:
    alive = await queue_pollers(client, settings.temporal_namespace, queue, kind)
    name = f"worker: {queue} ({kind})"
    if not alive:
        return Check(
            name,
            False,
            f"no worker is polling task queue {queue}",
            "start one: 'python worker.py' or 'starter.py dev up --workers 1'",
        )
    return Check(name, True, f"{len(alive)} poller(s): {', '.join(sorted(set(alive)))[:100]}")


MIN_POSTGRES_VERSION_NUM = 170000
"""``transaction_timeout`` (the bound on the run's preparation and finish) is PostgreSQL 17's."""


async def _postgres(settings: Settings) -> Check:
    import psycopg

    async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=3) as conn:
        row = await (
            await conn.execute(
                "select current_setting('server_version'), current_setting('server_version_num')::int"
            )
        ).fetchone()
    version, num = (row[0], row[1]) if row else ("?", 0)
    where = f"PostgreSQL {version} at {_redact(settings.database_url)}"
    if num < MIN_POSTGRES_VERSION_NUM:
        # The run's preparation and finish bound their transactions with transaction_timeout
        # (keel.activities.concurrency), which PostgreSQL 17 added: older servers refuse it.
        return Check("postgres", False, f"{where}: Keel needs PostgreSQL 17 or later", "upgrade to 17 or 18")
    return Check("postgres", True, where)


async def _migrations(settings: Settings) -> Check:
    import psycopg

    files = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
    async with await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=3) as conn:
        exists = await (await conn.execute("select to_regclass('keel_migrations') is not null")).fetchone()
        done: set[str] = set()
        if exists and exists[0]:
            done = {r[0] for r in await (await conn.execute("select name from keel_migrations")).fetchall()}
    pending = [f for f in files if f not in done]
    if pending:
        return Check(
            "migrations",
            False,
            f"{len(pending)} of {len(files)} pending: {', '.join(pending)}",
            "a starting worker applies them, or 'starter.py dev up'",
        )
    return Check("migrations", True, f"{len(files)} applied, latest {files[-1] if files else '-'}")


async def _policy(settings: Settings) -> Check:
    p = load_policy(settings.policy_file)
    return Check("policy", True, f"{settings.policy_file}: version {p.version}, {len(p.tenants)} tenant(s)")


async def _prices(env: Mapping[str, str]) -> Check:
    tiers = resolve_tiers(env)
    table = load_prices()
    missing = []
    for tier, model in tiers.items():
        try:
            price_for(model, table)
        except ValueError:
            missing.append(f"{tier}={model}")
    if missing:
        return Check(
            "prices",
            False,
            f"no price for {', '.join(missing)}",
            "add them to the prices override file (KEEL_PRICES_FILE, default config/prices.yaml; "
            "USD per million tokens)",
        )
    return Check("prices", True, ", ".join(f"{t}={m}" for t, m in tiers.items()))


async def _codec(settings: Settings) -> Check:
    """The payload encryption keys load (never printed: only their ids and where they are)."""
    try:
        ring = load_keyring(settings)
    except ValueError as e:
        return Check("codec keys", False, str(e).splitlines()[0], "see README: payload encryption")
    return Check("codec keys", True, f"{len(ring.ids)} key(s), newest {ring.newest!r}, from {ring.source}")


def _redact(url: str) -> str:
    """A database URL without its password (the doctor's output is pasted into tickets)."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, cred = head.partition("//")
    return f"{scheme}//{cred.split(':', 1)[0]}:***@{tail}"
