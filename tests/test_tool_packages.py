"""Tools from the user's own package: discovery, refusal of broken or clashing modules, and
an out-of-tree HTTP tool (``tests/pkgs/acme_tools``, installed into the test venv by
``make install``) that books exactly one shipment with a real HTTP carrier fake, whatever
is lost in transit, is compensated on abort, and falls back when the carrier is down."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.models import StepState
from keel.settings import PROJECT_ROOT, Settings
from tests.carrier import running_carrier
from tests.doubles.models import step
from tests.scripted import plan, scripted_worker, start

KEEL = Path(sys.executable).parent / "keel"
BAD = PROJECT_ROOT / "tests" / "pkgs" / "bad_tools"


@pytest.fixture(scope="module", autouse=True)
def acme_installed() -> None:
    """The package must be installed the way a user installs one (make install does it)."""
    try:
        metadata.distribution("acme-tools")
    except metadata.PackageNotFoundError:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(PROJECT_ROOT / "tests" / "pkgs" / "acme_tools"),
            ],
            check=True,
        )
        metadata.distribution("acme-tools")


def _policy(tmp_path: Path) -> Path:
    from tests.doubles import tools as testing

    text = testing.policy_yaml().replace("tester: [test:run,", "tester: [shipments:write, test:run,")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_tools_list_shows_the_package_tool_and_where_it_comes_from(test_env: dict[str, str]) -> None:
    out = subprocess.run(
        [str(KEEL), "tools", "list", "--json"],
        env=test_env,
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["create_shipment"]["module"] == "acme_tools"
    assert rows["create_shipment"]["source"] == "entry point 'acme' of acme-tools 0.1.0"
    assert rows["create_shipment"]["compensation"] == "cancel_shipment"
    assert rows["cancel_shipment"]["hidden"] is True
    assert rows["lookup_order"]["source"] == "built-in"
    table = subprocess.run(
        [str(KEEL), "tools", "list"], env=test_env, cwd="/tmp", capture_output=True, text=True, timeout=60
    ).stdout
    assert "create_shipment" in table and "acme-tools 0.1.0" in table


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("broken_tools", "ModuleNotFoundError: No module named 'keel_no_such_dependency'"),
        (
            "dupe_tools",
            "tool 'lookup_order' is declared twice (in keel.activities.tools.demo and in dupe_tools)",
        ),
    ],
)
def test_a_bad_tool_module_stops_the_worker_with_one_line(
    test_env: dict[str, str], module: str, says: str
) -> None:
    env = {**test_env, "KEEL_TOOL_MODULES": f" {module} ", "PYTHONPATH": str(BAD)}
    worker = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "worker.py")],
        env=env,
        cwd="/tmp",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 1
    lines = worker.stderr.strip().splitlines()
    assert len(lines) == 1, worker.stderr
    assert lines[0].startswith(f"worker: tool module {module!r} (KEEL_TOOL_MODULES) failed to load: ")
    assert says in lines[0]
    listing = subprocess.run(
        [str(KEEL), "tools", "list"], env=env, cwd="/tmp", capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 2 and listing.stderr.startswith(f"error: tool module {module!r}")


async def test_package_tool_books_exactly_once_when_the_response_is_lost(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_carrier(lose_first_response=True) as carrier:
        monkeypatch.setenv("ACME_CARRIER_URL", carrier.url)
        plans = [plan(step("s1", "create_shipment", order_id="ORD-123", address="1 Keel Street"))]
        async with scripted_worker(
            client,
            db_pool,
            temporal_services,
            task_queue,
            plans,
            policy_file=_policy(tmp_path),
            monkeypatch=monkeypatch,
        ):
            handle = await start(client, task_queue)
            resp = await handle.result()
    assert resp.outcome == "completed", resp
    (s1,) = resp.steps
    assert s1.state == StepState.SUCCEEDED and s1.result is not None
    # Two HTTP attempts (the first answer was lost), one shipment, one key.
    key = f"{handle.id}/s1"
    assert carrier.requests == [("POST", "/v1/shipments", key)] * 2
    assert list(carrier.shipments) == [s1.result["shipment_id"]] == ["shp_1"]
    async with db_pool.connection() as conn:
        rows = await (
            await conn.execute("select tool from tool_effects where idempotency_key=%s", (key,))
        ).fetchall()
    assert rows == [("create_shipment",)]


async def test_package_tool_is_compensated_and_falls_back(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = _policy(tmp_path)
    with running_carrier() as carrier:
        monkeypatch.setenv("ACME_CARRIER_URL", carrier.url)
        plans = [
            plan(
                step("s1", "create_shipment", order_id="ORD-124", address="2 Keel Street"),
                step("s2", "echo", note="NOT ALLOWED"),  # denied by policy: the run aborts
            )
        ]
        async with scripted_worker(
            client, db_pool, temporal_services, task_queue, plans, policy_file=policy, monkeypatch=monkeypatch
        ):
            handle = await start(client, task_queue)
            resp = await handle.result()
    assert resp.outcome == "denied" and resp.compensated == ("s1",), resp
    assert carrier.shipments["shp_1"]["status"] == "cancelled"
    assert carrier.requests[-1] == ("POST", "/v1/shipments/shp_1/cancel", f"{handle.id}/s1/compensate")

    with running_carrier(down=True) as carrier:
        monkeypatch.setenv("ACME_CARRIER_URL", carrier.url)
        plans = [plan(step("s1", "create_shipment", order_id="ORD-125", address="3 Keel Street"))]
        async with scripted_worker(
            client,
            db_pool,
            temporal_services,
            task_queue + "-down",
            plans,
            policy_file=policy,
            monkeypatch=monkeypatch,
        ):
            resp = await (await start(client, task_queue + "-down")).result()
    states = {s.id: (s.tool, s.state) for s in resp.steps}
    assert states["s1"] == ("create_shipment", StepState.FAILED)
    assert states["s1f"] == ("queue_shipment", StepState.SUCCEEDED)
    assert "fallback:create_shipment->queue_shipment" in resp.flags
    assert len(carrier.requests) == 4 and not carrier.shipments  # max_attempts, nothing booked


@pytest.mark.parametrize("kind", ["rate_limited", "sandboxed"])
def test_a_tool_that_cannot_be_quick_and_in_process_refuses_local(kind: str) -> None:
    """``local=True`` runs the tool inside its workflow task and on the run's own queue: a
    rate-limited tool (its own task queue) or a sandboxed one (a confined program, seconds)
    is refused at declaration, with one line naming it, and nothing is registered."""
    from pydantic import BaseModel

    from keel.activities.sandbox import SandboxSpec
    from keel.activities.tools.registry import REGISTRY, tool

    class Args(BaseModel):
        pass

    name = f"local_{kind}"
    extra = (
        {"rate_limit_per_second": 1.0}
        if kind == "rate_limited"
        else {"sandbox": SandboxSpec(executables=("/bin/true",))}
    )
    with pytest.raises(ValueError, match=f"tool '{name}': a sandboxed or rate-limited tool cannot be local"):
        tool(name, description="x", args=Args, local=True, **extra)(_nothing)  # type: ignore[arg-type]
    assert name not in REGISTRY


async def _nothing(ctx: object, a: object) -> dict[str, object]:
    return {}
