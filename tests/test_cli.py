"""The CLI as a user meets it: ``starter.py`` subprocesses against a ``worker.py`` subprocess.

Snapshots live in ``tests/snapshots/``; ids, order numbers and times are normalised first.
Refresh them after an intended change with ``KEEL_UPDATE_SNAPSHOTS=1 pytest tests/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keel.devservices import free_port
from keel.settings import PROJECT_ROOT, Settings

SNAPSHOTS = Path(__file__).parent / "snapshots"
PY = sys.executable
# temporalio/sdk-python#300: the SDK's Rust threads can abort interpreter finalization
# ("Fatal Python error: PyGILState_Release") after a client was used. starter.py must end
# with os._exit(); until it does, run the CLI through a shim that behaves like the fixed one.
_SHIM = (
    "import os, sys; from keel.cli import main; code = main(sys.argv[1:]); "
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)"
)
STARTER = ["starter.py"] if "os._exit" in (PROJECT_ROOT / "starter.py").read_text() else ["-c", _SHIM]


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, *STARTER, *args],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def cli_env(
    test_env: dict[str, str], temporal_services: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A real ``python worker.py`` on its own task queue; its log goes to a file."""
    env = {**test_env, "KEEL_TASK_QUEUE": f"cli-{uuid.uuid4().hex[:8]}", "PYTHONUNBUFFERED": "1"}
    for var in [k for k in env if k.startswith("OTEL_")]:
        env.pop(var)
    log = tmp_path_factory.mktemp("cli") / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [PY, "worker.py"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_polling(temporal_services, env["KEEL_TASK_QUEUE"], worker)
        yield env
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _wait_until_polling(settings: Settings, queue: str, worker: subprocess.Popen[bytes]) -> None:
    """A started worker needs a few seconds (imports, migrations) before it polls; ``run``
    says at once that nobody polls, so the tests wait for the worker as a person would."""
    import asyncio
    import time

    from keel.client import connect
    from keel.doctor import queue_pollers

    async def polling() -> bool:
        client = await connect(settings)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and worker.poll() is None:
            if await queue_pollers(client, settings.temporal_namespace, queue):
                return True
            await asyncio.sleep(0.2)
        return False

    assert asyncio.run(polling()), "worker.py did not start polling its task queue"


def _order(pg_url: str) -> str:
    """An order of our own with a fixed-width id, so token counts (and spend) are stable."""
    import psycopg

    order = f"ORD-{random.randint(10**11, 10**12 - 1)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, "
            "total_micros) values (%s, 'acme', 'alice@example.com', 'shipped', "
            "'SKU-KEEL-1', 42500000)",
            (order,),
        )
    return order


def _normalise(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: (
                "<float>"
                if k.endswith("latency_ms")
                else "<id>"
                if k.endswith("_id") and isinstance(v, int)
                else _normalise(v, subs)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_normalise(v, subs) for v in value]
    if isinstance(value, str):
        for old, new in subs.items():
            value = value.replace(old, new)
        value = re.sub(r"(refund_id=|refund #)\d+", r"\1<id>", value)
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[.\d]*(Z|[+-]\d\d:\d\d)?", "<ts>", value)
    return value


def _snapshot(name: str, actual: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("KEEL_UPDATE_SNAPSHOTS") or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual)
    assert actual == path.read_text(), f"{name} changed; see the diff above"


def test_run_json_and_status_snapshots(cli_env: dict[str, str], pg_url: str) -> None:
    order = _order(pg_url)
    rid = f"cli-{uuid.uuid4().hex[:8]}"
    done = _cli(
        cli_env,
        "run",
        f"Check if order {order} is shipped and refund it if so",
        "--request-id",
        rid,
        "--session",
        rid,
        "--budget",
        "0.50",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --json: stdout is the document, stderr stays quiet
    wid = f"agent/acme/support/{rid}"
    subs = {wid: "<workflow-id>", order: "<order>", rid: "<request-id>"}
    body = json.loads(done.stdout)
    assert body["outcome"] == "completed" and body["workflow_id"] == wid
    _snapshot("run.json", json.dumps(_normalise(body, subs), indent=2, sort_keys=True) + "\n")

    status = _cli(cli_env, "status", wid)
    assert status.returncode == 0, status.stderr
    text = _normalise(
        status.stdout, {**subs, wid.replace("/", "%2F"): "<workflow-id>", cli_env["KEEL_UI_PORT"]: "<port>"}
    )
    _snapshot("status.txt", text)

    as_json = json.loads(_cli(cli_env, "status", wid, "--json").stdout)
    assert as_json["temporal_status"] == "completed" and as_json["phase"] == "done"


def test_follow_shows_phases_and_steps(cli_env: dict[str, str], pg_url: str) -> None:
    order = _order(pg_url)
    done = _cli(
        cli_env,
        "run",
        f"Check if order {order} is shipped and refund it if so",
        "--follow",
        "--session",
        f"s-{uuid.uuid4().hex[:8]}",
    )
    assert done.returncode == 0, done.stderr
    progress = done.stderr  # polled: a fast run may skip phases, never repeat a line
    assert progress.startswith("▶ agent/acme/support/r-"), progress
    assert re.search(r"✓ s1 +lookup_order +succeeded", progress), progress
    assert re.search(r"✓ s2 +issue_refund +succeeded +\$0\.002 ", progress), progress
    assert re.search(r"done · completed · spent \$\d+\.\d{2,6} in 1 iteration", progress)
    lines = progress.splitlines()
    assert len(lines) == len(set(lines))
    assert "Outcome  completed" in done.stdout  # the answer still goes to stdout


def test_unknown_tenant_is_denied_with_a_reason(cli_env: dict[str, str]) -> None:
    done = _cli(cli_env, "run", "Is ORD-123 shipped?", "--tenant", "initech", "--json")
    assert done.returncode == 3
    body = json.loads(done.stdout)
    assert body["outcome"] == "denied"
    assert "initech" in body["reason"]
    assert body["steps"] == [] and body["spend"]["total_micros"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", ""], "error: message: message must not be empty"),
        (["run", "   "], "error: message: message must not be empty"),
        (["run", "hello", "--budget", "-1"], "error: --budget: budget must be a positive, finite number"),
        (["run", "hello", "--budget", "inf"], "error: --budget: budget must be a positive, finite number"),
        (["run", "hello", "--budget", "nan"], "error: --budget: budget must be a positive, finite number"),
        (["run", "hello", "--budget", "1e308"], "error: --budget: budget must be at most 10,000.00 USD"),
        (["run", "hello", "--deadline", str(10**19)], "error: --deadline: deadline must be between 1 and"),
        (["run", "hello", "--deadline", "0"], "error: --deadline: deadline must be between 1 and"),
        (["run", "hello", "--max-iterations", "0"], "error: --max-iterations must be at least 1"),
        (["run", "hello", "--max-iterations", "999"], "error: --max-iterations: max iterations must be"),
        (["run", b"bad \xff byte"], "error: message: message is not valid UTF-8"),
        (["run", "hello", "--request-id", "a b"], "error: --request-id: request id must be 1-128"),
        (["run", "hello", "--tenant", "no spaces"], "error: --tenant: must be 1-64 characters"),
        (["run", "hello", "--max-tier", "huge"], "error: unknown tier 'huge'"),
        (["breakers", "--events", "-2"], "error: --events must be 0 or more"),
    ],
)
def test_bad_arguments_are_one_line(cli_env: dict[str, str], args: list[str], expected: str) -> None:
    done = _cli(cli_env, *args)
    assert done.returncode == 2
    assert done.stderr.startswith(expected), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_services_down_is_one_line_and_nonzero(test_env: dict[str, str]) -> None:
    env = {
        **test_env,
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KEEL_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/keel",
    }
    for args in (["run", "hello"], ["status", "agent/acme/x"], ["breakers"]):
        done = _cli(env, *args)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: cannot reach "), done.stderr
        if args == ["status", "agent/acme/x"]:
            _snapshot(
                "error_temporal_down.txt", _normalise(done.stderr, {env["TEMPORAL_ADDRESS"]: "<address>"})
            )
        else:
            what = "PostgreSQL" if args == ["breakers"] else "Temporal"
            assert done.stderr.startswith(f"error: cannot reach {what}"), done.stderr


def test_every_command_explains_itself_with_an_example() -> None:
    """In-process (help is static): every command and group action has an example."""
    import argparse

    from keel.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[Any]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))

    found = dict(leaves(build_parser(), ()))
    assert {("run",), ("status",), ("list",), ("approve",), ("cancel",), ("breakers",), ("dev",)} <= set(
        found
    )
    for path, parser in found.items():
        text = parser.format_help()
        assert "example" in text, path
        assert "--json" in text or path in (("budget", "set"), ("completion",)), path


def test_breakers_json(cli_env: dict[str, str], pg_url: str) -> None:
    import psycopg

    scope = f"tool:cli_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "insert into circuit_breakers (scope, state, consecutive_failures, "
            "opened_until, last_error) values (%s, 'open', 5, now() + interval '1 "
            "minute', 'upstream 503')",
            (scope,),
        )
        conn.execute(
            "insert into breaker_events (scope, from_state, to_state, reason) "
            "values (%s, 'closed', 'open', '5 consecutive failures')",
            (scope,),
        )
    body = json.loads(_cli(cli_env, "breakers", "--json", "--events", "50").stdout)
    mine = [b for b in body["breakers"] if b["scope"] == scope]
    assert mine and mine[0]["state"] == "open" and mine[0]["last_error"] == "upstream 503"
    assert any(e["scope"] == scope and e["to_state"] == "open" for e in body["events"])
    text = _cli(cli_env, "breakers").stdout
    assert re.search(rf"{scope}\s+open\s+5\s+0x\s+\d\d:\d\d:\d\d \(\d+s\)\s+upstream 503", text)
