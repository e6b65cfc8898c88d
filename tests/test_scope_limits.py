"""Per-tool and per-model budget scopes are charged on every hold, and a limit set there with
``budget set`` binds the next run (offline model, real ledger, the real CLI)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.settings import PROJECT_ROOT, Settings
from tests.helpers import make_order, request, run_agent, running_worker

_CLI = "import sys; from keel.cli import main; sys.exit(main(sys.argv[1:]))"


def _budget(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI, "budget", *args],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def limited(test_env: dict[str, str]) -> Iterator[list[str]]:
    """Scopes a test limits; set back to unlimited afterwards (the session's ledger is shared)."""
    scopes: list[str] = []
    yield scopes
    for scope in scopes:
        _budget(test_env, "set", scope, "unlimited")


async def _spent(pool: AsyncConnectionPool, scope: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("select spent_micros from keel_budget_scopes where scope = %s", (scope,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_every_scope_on_the_path_is_charged(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings, task_queue: str
) -> None:
    order = await make_order(db_pool)
    before = (await _spent(db_pool, "acme/tool:lookup_order"), await _spent(db_pool, "acme/model:offline"))
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    assert resp.outcome == "completed", resp.reason
    tool = await _spent(db_pool, "acme/tool:lookup_order") - before[0]
    model = await _spent(db_pool, "acme/model:offline") - before[1]
    assert tool == resp.spend.by_tool["lookup_order"] > 0
    assert model == resp.spend.by_model["offline"] > 0


@pytest.mark.parametrize(
    ("scope", "stopped_by"),
    [("acme/tool:lookup_order", "lookup_order"), ("acme/model:offline", "planning stopped")],
)
async def test_a_limit_set_with_budget_set_binds(
    scope: str,
    stopped_by: str,
    limited: list[str],
    test_env: dict[str, str],
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    limited.append(scope)
    # Tiny, but above what is already spent there: the limit binds on the next hold.
    spent = await _spent(db_pool, scope)
    usd = f"{(spent + 10) / 1_000_000:.6f}"
    done = await asyncio.to_thread(_budget, test_env, "set", scope, usd)
    assert done.returncode == 0, done.stderr
    order = await make_order(db_pool)
    async with running_worker(client, db_pool, temporal_services, task_queue):
        resp = await run_agent(client, task_queue, request(f"Where is order {order}?"))
    assert resp.outcome == "budget_exhausted", resp.reason
    assert stopped_by in resp.reason and "\n" not in resp.reason
    assert not any(s.state.value == "succeeded" for s in resp.steps)
    assert await _spent(db_pool, scope) <= spent + 10


async def test_a_pricing_error_mid_flight_fails_fast_in_one_line(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker checked prices at start; a prices file broken afterwards is configuration,
    not luck: non-retryable, never ten tracebacks of retries."""
    bad = tmp_path / "prices.json"
    bad.write_text("{not json")
    async with running_worker(client, db_pool, temporal_services, task_queue):
        monkeypatch.setenv("KEEL_PRICES_FILE", str(bad))
        started = time.monotonic()
        resp = await run_agent(client, task_queue, request("Where is order ORD-1?"))
    assert resp.outcome == "failed" and "KEEL_PRICES_FILE" in resp.reason and "\n" not in resp.reason
    assert time.monotonic() - started < 10  # one attempt, not ten with backoff
