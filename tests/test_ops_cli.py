"""Operators' view: the doctor with each service down, fast failure with no worker, ``dev status``.

The CLI runs as a subprocess against the session's real Temporal and PostgreSQL (and, where a
worker is needed, the real ``worker.py`` of ``tests/test_cli.py``'s ``cli_env``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from temporalio.client import Client

from keel.cli import CliError
from keel.cli._waits import NO_WORKER_GRACE, require_worker
from keel.devservices import free_port
from keel.settings import PROJECT_ROOT, Settings
from tests import test_cli
from tests.test_cli import _cli, _normalise, _snapshot

cli_env = test_cli.cli_env  # the real worker.py on its own queue, shared with test_cli


@pytest.fixture
async def ready_env(cli_env: dict[str, str], client: Client) -> dict[str, str]:
    """``cli_env`` once its worker polls (it needs a few seconds to import and connect)."""
    await require_worker(client, "default", cli_env["KEEL_TASK_QUEUE"], grace=60)
    return cli_env


def _doctor(env: dict[str, str]) -> tuple[int, dict[str, dict[str, object]]]:
    done = _cli(env, "doctor", "-o", "json")
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, {c["name"]: c for c in json.loads(done.stdout)}


def test_doctor_passes_with_services_and_a_worker(ready_env: dict[str, str]) -> None:
    code, checks = _doctor(ready_env)
    assert code == 0, [c for c in checks.values() if not c["ok"]]
    queue = ready_env["KEEL_TASK_QUEUE"]
    assert {"temporal", "search attributes", "postgres", "migrations", "policy", "prices"} <= set(checks)
    assert checks[f"worker: {queue} (workflow)"]["ok"] and checks[f"worker: {queue} (activity)"]["ok"]
    from keel.doctor import worker_queues
    from keel.settings import load_settings

    expected = {f"worker: {q} ({k})" for q, k in worker_queues(load_settings(ready_env))}
    assert expected == {n for n in checks if n.startswith("worker:")}  # rate-limited tools' queues too
    assert all(c["ok"] for c in checks.values())


def test_doctor_temporal_down(test_env: dict[str, str]) -> None:
    env = {**test_env, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    code, checks = _doctor(env)
    assert code == 1
    assert not checks["temporal"]["ok"] and "cannot reach 127.0.0.1:" in str(checks["temporal"]["detail"])
    assert not any(
        n.startswith("worker:") or n == "search attributes" for n in checks
    )  # skipped, not failed twice
    assert checks["postgres"]["ok"] and checks["migrations"]["ok"]
    text = _cli(env, "doctor")
    assert text.returncode == 1
    subs = {
        env["TEMPORAL_ADDRESS"]: "<address>",
        str(PROJECT_ROOT): "<root>",
        test_env["KEEL_PG_PORT"]: "<port>",
    }
    stable = re.sub(r"PostgreSQL [\d.]+", "PostgreSQL <version>", _normalise(text.stdout, subs))
    stable = re.sub(r"\d+ applied, latest \S+", "<n> applied, latest <migration>", stable)
    stable = re.sub(r"version [\d.-]+, \d+ tenant", "version <version>, <n> tenant", stable)
    _snapshot("doctor_temporal_down.txt", stable)


def test_doctor_postgres_down(test_env: dict[str, str], temporal_services: Settings) -> None:
    env = {**test_env, "KEEL_DATABASE_URL": f"postgresql://postgres:secret@127.0.0.1:{free_port()}/keel"}
    code, checks = _doctor(env)
    assert code == 1
    assert checks["temporal"]["ok"]
    assert not checks["postgres"]["ok"] and "migrations" not in checks
    assert "secret" not in str(checks["postgres"]) and "postgres:***@" in str(checks["postgres"]["detail"])


def test_doctor_no_worker_pending_migrations_bad_policy_unpriced_model(
    test_env: dict[str, str], temporal_services: Settings, tmp_path: Path
) -> None:
    db = f"doctor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(temporal_services.owner_url, autocommit=True) as conn:  # an operator's act
        conn.execute(f'create database "{db}"')
    bad_policy = tmp_path / "policy.yaml"
    bad_policy.write_text("version: 3\ntenants: {}\n")
    queue = f"doctor-{uuid.uuid4().hex[:8]}"
    env = {
        **test_env,
        "KEEL_TASK_QUEUE": queue,
        "KEEL_DATABASE_URL": temporal_services.database_url.rsplit("/", 1)[0] + f"/{db}",
        "KEEL_POLICY_FILE": str(bad_policy),
        "KEEL_MODEL_FAST": "openai:gpt-nonexistent",
    }
    code, checks = _doctor(env)
    assert code == 1
    assert checks["temporal"]["ok"] and checks["postgres"]["ok"] and checks["search attributes"]["ok"]
    worker = checks[f"worker: {queue} (workflow)"]
    assert not worker["ok"] and worker["detail"] == f"no worker is polling task queue {queue}"
    assert not checks["migrations"]["ok"] and "pending: 001_core.sql" in str(checks["migrations"]["detail"])
    assert not checks["policy"]["ok"] and str(bad_policy) in str(checks["policy"]["detail"])
    assert not checks["prices"]["ok"] and "fast=openai:gpt-nonexistent" in str(checks["prices"]["detail"])


def test_run_and_status_without_a_worker_say_so_at_once(
    test_env: dict[str, str], temporal_services: Settings
) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    env = {**test_env, "KEEL_TASK_QUEUE": queue}
    rid = f"nw-{uuid.uuid4().hex[:8]}"
    for args in (["run", "Is ORD-123 shipped?", "--request-id", rid], ["run", "hi", "--follow"]):
        t0 = time.monotonic()
        done = _cli(env, *args, timeout=30)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: no worker is polling task queue {queue} — start one"), (
            done.stderr
        )
        assert done.stderr.count("\n") == 1
        assert time.monotonic() - t0 < 15  # interpreter start included; the wait itself is bounded below
    queued = _cli(env, "run", "Is ORD-123 shipped?", "--no-wait", "--request-id", f"{rid}-q")
    assert queued.returncode == 0, queued.stderr
    status = _cli(env, "status", queued.stdout.strip(), timeout=30)
    assert status.returncode == 2
    assert status.stderr.startswith(f"error: no worker is polling task queue {queue}"), status.stderr
    assert (
        _cli(env, "status", f"agent/acme/support/{rid}").returncode != 0
    )  # the refused run was never started


async def test_require_worker_gives_up_within_the_grace(client: Client, task_queue: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(CliError, match=f"no worker is polling task queue {task_queue}"):
        await require_worker(client, "default", task_queue)
    assert NO_WORKER_GRACE <= time.monotonic() - t0 < NO_WORKER_GRACE + 1.5


def test_dev_status_exit_status(ready_env: dict[str, str], tmp_path: Path) -> None:
    up = _cli(ready_env, "dev", "status", "-o", "json")
    assert up.returncode == 0, up.stdout + up.stderr
    body = json.loads(up.stdout)
    assert body["down"] == [] and "1 polling task queue" in body["workers"]
    nothing = {
        **ready_env,
        "KEEL_STATE_DIR": str(tmp_path / "empty"),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KEEL_PG_PORT": str(free_port()),
    }
    nothing.pop("KEEL_DATABASE_URL")
    down = _cli(nothing, "dev", "status")
    assert down.returncode == 1
    assert "stopped" in down.stdout
    assert json.loads(_cli(nothing, "dev", "status", "--json").stdout)["down"] == [
        "temporal",
        "postgres",
        "workers",
    ]


# ---------------------------------------------------------------- output people expect


def test_budget_set_refuses_an_unknown_tenant_with_did_you_mean(
    test_env: dict[str, str], pg_url: str
) -> None:
    done = _cli(test_env, "budget", "set", "acmee", "5")
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown tenant 'acmee' in policy.yaml; did you mean 'acme'?"), (
        done.stderr
    )
    assert done.stderr.count("\n") == 1
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("select 1 from keel_budget_scopes where scope = 'acmee'").fetchone() is None
    far = _cli(test_env, "budget", "set", "zzz/ws:default", "5")
    assert far.returncode == 2 and "(known: acme, " in far.stderr, far.stderr


def test_a_closed_pipe_ends_quietly(test_env: dict[str, str]) -> None:
    """``starter.py … | head``: the reader is gone before the first write."""
    import subprocess
    import sys

    from tests.test_cli import PY, STARTER

    for args in (["doctor", "-o", "jsonl"], ["--help"], ["budget", "history", "acme", "-o", "jsonl"]):
        proc = subprocess.Popen(
            [PY, *STARTER, *args],
            cwd=PROJECT_ROOT,
            env=test_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        proc.wait(timeout=60)
        assert "BrokenPipe" not in err and "Traceback" not in err, (args, err)
        assert err == "", (args, err)
        assert proc.returncode in (0, 141), (args, proc.returncode, sys.platform)


def _on_a_terminal(env: dict[str, str], *args: str) -> str:
    """Run the CLI with stdout on a pseudo-terminal, as a person sees it."""
    import os
    import pty
    import subprocess

    from tests.test_cli import PY, STARTER

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [PY, *STARTER, *args], cwd=PROJECT_ROOT, env=env, stdout=follower, stderr=subprocess.DEVNULL
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_colour_on_a_terminal_unless_no_color(test_env: dict[str, str]) -> None:
    env = {**test_env, "TERM": "xterm-256color", "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    env.pop("NO_COLOR", None)
    coloured = _on_a_terminal(env, "doctor")
    assert "\x1b[" in coloured and "FAIL" in coloured
    plain = _on_a_terminal({**env, "NO_COLOR": "1"}, "doctor")
    assert "FAIL" in plain and "\x1b[" not in plain, plain


def test_every_command_takes_output_formats() -> None:
    import argparse

    from keel.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...]):  # type: ignore[no-untyped-def]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))

    mine = {
        ("run",), ("status",), ("list",), ("approve",), ("cancel",), ("breakers",), ("doctor",), ("dev",),
        ("budget", "set"), ("budget", "show"), ("budget", "history"), ("audit", "verify"), ("audit", "show"),
        ("approvals",), ("retry",),
    }  # fmt: skip
    found = dict(leaves(build_parser(), ()))
    for path in mine & set(found):
        opts = {o: a for a in found[path]._actions for o in a.option_strings}
        assert "-o" in opts and tuple(opts["-o"].choices) == ("table", "json", "jsonl"), path


def test_follow_as_json_lines_and_list_jsonl(ready_env: dict[str, str], pg_url: str) -> None:
    order = test_cli._order(pg_url)
    done = _cli(
        ready_env, "run", f"Check if order {order} is shipped and refund it if so", "--follow", "-o", "jsonl"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events and all(e["event"] == "status" for e in events[:-1]) and events[-1]["event"] == "result"
    assert events[-1]["outcome"] == "completed"
    assert "Refunded $42.50 on" in events[-1]["message"]  # two decimals, not $42.5
    assert done.stderr == ""
    listed = _cli(ready_env, "list", "-o", "jsonl", "--limit", "3")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert 1 <= len(rows) <= 3 and all("workflow_id" in r for r in rows)
    table = _cli(ready_env, "list", "--limit", "3").stdout
    assert "WORKFLOW ID" in table and re.search(r"\$\d+\.\d\d", table)


async def test_budget_history_shows_the_would_be_decision(test_env: dict[str, str], db_pool: object) -> None:
    from keel.activities import ledger
    from keel.budget import ReserveRequest, scope_path

    tenant = f"t{uuid.uuid4().hex[:8]}"
    async with db_pool.connection() as conn:  # type: ignore[attr-defined]
        await ledger.set_limit(conn, tenant, 100, observe=True)
        path = scope_path(tenant, "default", "bob", "run1")
        r = await ledger.reserve(conn, ReserveRequest(key=f"{tenant}/a", scopes=path, amount_micros=500_000))
    assert "micro-USD" not in r.reason
    done = _cli(test_env, "budget", "history", tenant)
    assert done.returncode == 0, done.stderr
    assert "ALLOW (would DENY)" in done.stdout and "$0.50" in done.stdout
    assert "observe mode recorded a stricter decision" in done.stdout


# ---------------------------------------------------------------- waits people can see


def _big_order(pg_url: str) -> str:
    """An order whose refund ($250.00) needs a person (policy rule refund-over-100)."""
    import random

    order = f"ORD-{random.randint(10**11, 10**12 - 1)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s, 'acme', 'alice@example.com', 'shipped', 'SKU-KEEL-1', 250000000)",
            (order,),
        )
    return order


def _start_waiting_run(env: dict[str, str], pg_url: str) -> tuple[Any, str, str]:
    import subprocess

    from tests.test_cli import PY, STARTER

    order = _big_order(pg_url)
    rid = f"wait-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [PY, *STARTER, "run", f"Check if order {order} is shipped and refund it if so", "--request-id", rid],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    told = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        told.append(line)
        if "answer with:" in line:
            break
    assert any(ln.startswith("waiting: approval of s2 (issue_refund)") for ln in told), told
    assert any(f"approve agent/acme/support/{rid}" in ln for ln in told), told
    return proc, f"agent/acme/support/{rid}", order


def test_run_says_it_waits_approvals_lists_it_approve_says_what(
    ready_env: dict[str, str], pg_url: str
) -> None:
    proc, wid, order = _start_waiting_run(ready_env, pg_url)
    try:
        rows = json.loads(_cli(ready_env, "approvals", "-o", "json").stdout)
        mine = [r for r in rows if r["workflow_id"] == wid]
        assert mine, rows
        row = mine[0]
        assert row["tenant"] == "acme" and row["requester"] == "alice" and row["step"] == "s2"
        assert f"issue_refund order_id={order}, amount_usd=$250.00" in row["asks"]
        assert "rule refund-over-100 (amount_usd > $100.00)" in row["asks"]
        assert re.fullmatch(r"\d+m\d\ds", row["age"])
        table = _cli(ready_env, "approvals").stdout
        assert wid in table and "AGE" in table
        approved = _cli(ready_env, "approve", wid)
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"{wid}: approved by "), approved.stdout
        assert "approval of s2 (issue_refund)" in approved.stdout  # what was decided
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and "Outcome  completed" in out, out
        assert f"Refunded $250.00 on {order}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cancel_ends_canceled_and_list_finds_it(ready_env: dict[str, str], pg_url: str) -> None:
    proc, wid, _ = _start_waiting_run(ready_env, pg_url)
    try:
        cancelled = _cli(ready_env, "cancel", wid, "--reason", "customer withdrew")
        assert cancelled.returncode == 0 and "ends Canceled" in cancelled.stdout, cancelled.stderr
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 3, out
        assert "Status   canceled · phase done · outcome cancelled" in out, out
        status = json.loads(_cli(ready_env, "status", wid, "-o", "json").stdout)
        assert status["temporal_status"] == "canceled" and status["outcome"] == "cancelled"
        listed = json.loads(
            _cli(ready_env, "list", "--status", "cancelled", "-o", "json", "--limit", "50").stdout
        )
        assert any(r["workflow_id"] == wid and r["outcome"] == "cancelled" for r in listed), listed
        again = _cli(ready_env, "cancel", wid)
        assert again.returncode == 2 and "already ended (canceled)" in again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def test_doctor_refuses_a_postgres_older_than_17(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's preparation and finish set ``transaction_timeout`` (PostgreSQL 17+): the doctor
    says so on an older server (here: the real 18 against a raised minimum), with the fix."""
    from keel import doctor

    ok = await doctor._postgres(settings)
    assert ok.ok and ok.detail.startswith("PostgreSQL 18"), ok
    monkeypatch.setattr(doctor, "MIN_POSTGRES_VERSION_NUM", 990000)
    old = await doctor._postgres(settings)
    assert not old.ok and "needs PostgreSQL 17 or later" in old.detail and old.hint, old
