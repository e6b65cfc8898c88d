"""Secrets and PII planted in a request and in tool output reach no sink in the clear.

A security reviewer's test: an OpenAI-style key (``sk-live-...``), an AWS access key id, a
Luhn-valid card number and an e-mail address go into the request (through the real CLI) and
into tool output (a customer's e-mail in PostgreSQL, a tool echoing a note, an upstream
error naming a key). The planner is a real ``openai`` SDK call against a local server
speaking the wire format. Then every place Keel writes is searched for each planted value:
the raw bytes of the Temporal history, every summary and failure message decoded through
the codec, search attributes, the workflow's current details, the CLI's plain and JSON
output, ``tool_effects``, memory, the audit log, and the request bodies the provider
received. Expected hits: 0. Key rotation: a run started under key 1 finishes after key 2 is
added, and its history then holds payloads under both keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import secrets
import string
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from keel.activities.models import close_clients
from keel.client import connect
from keel.codec import KEY_ID_METADATA, data_converter, load_keyring, new_key_line, open_sealed
from keel.models import AgentResponse, Approval, StepState
from keel.settings import PROJECT_ROOT, Settings
from tests.doubles import tools as testing
from tests.doubles.models import step
from tests.helpers import make_order, request, running_worker
from tests.providers.fake_openai import FakeOpenAI, chat
from tests.providers.sloppy import Roles
from tests.scripted import plan, scripted_worker, start, wait_status, write_policy


def _card() -> str:
    digits = [4] + [random.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit makes the number Luhn-valid
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


@dataclasses.dataclass(frozen=True)
class Planted:
    openai: str
    aws: str
    card: str
    email: str

    @classmethod
    def fresh(cls, tag: str) -> Planted:
        alnum = string.ascii_letters + string.digits
        return cls(
            openai="sk-live-" + "".join(random.choice(alnum) for _ in range(32)),
            aws="AKIA" + "".join(random.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
            card=_card(),
            email=f"{tag}.{secrets.token_hex(4)}@victim.test",
        )

    def values(self) -> list[str]:
        return [self.openai, self.aws, self.card, self.email]

    def text(self) -> str:
        return f"key {self.openai} aws {self.aws} card {self.card} mail {self.email}"


def _hits(where: str, blob: str | bytes, *planted: Planted) -> list[str]:
    data = blob if isinstance(blob, bytes) else blob.encode()
    return [f"{where}: {v}" for p in planted for v in p.values() if v.encode() in data]


_ROLES = Roles()


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    # Plans by role; with a key set a run also makes judge and answer calls (defaults).
    server = FakeOpenAI(responder=_ROLES).start()
    _ROLES.plans.clear()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
async def _fresh_clients() -> AsyncIterator[None]:
    yield
    await close_clients()


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT_ROOT / "starter.py"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    return proc.returncode or 0, out.decode(), err.decode()


async def _history_sinks(client: Client, handle: WorkflowHandle[Any, Any]) -> dict[str, bytes | str]:
    """Everything Temporal keeps of a run: raw bytes, and what the codec decodes from them."""
    history = await handle.fetch_history()
    conv = client.data_converter
    sinks: dict[str, bytes | str] = {
        "history bytes": b"".join(e.SerializeToString() for e in history.events),
        "history json": history.to_json(),
    }
    decoded: list[str] = []
    for e in history.events:
        for attr in ("summary", "details"):
            meta = e.user_metadata
            if meta.HasField(attr):
                [text] = await conv.decode([getattr(meta, attr)], [str])
                decoded.append(text)
        for field in ("activity_task_failed_event_attributes", "workflow_execution_failed_event_attributes"):
            if e.HasField(field):
                failure = getattr(e, field).failure
                err = await conv.decode_failure(failure)
                decoded.append(f"{err} {err.__cause__ or ''}")
    sinks["summaries, details and failure messages (decoded)"] = "\n".join(decoded)
    desc = await handle.describe()
    sinks["static summary (describe)"] = f"{await desc.static_summary()} {await desc.static_details()}"
    sinks["search attributes"] = json.dumps(
        {p.key.name: str(p.value) for p in desc.typed_search_attributes}, default=str
    )
    with contextlib.suppress(Exception):  # current details live in the metadata query
        meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        sinks["current details"] = meta.current_details
    return sinks


def _nonempty(sinks: dict[str, Any], *names: str) -> None:
    """A sink that is empty proves nothing: the ones every run writes must hold something."""
    for name in names:
        value = sinks.get(name)
        assert value not in (None, "", b"", "[]", "[][]"), f"{name} is empty: the check would be vacuous"


async def _db_sinks(pool: AsyncConnectionPool, wid: str, session: str) -> dict[str, str]:
    async with pool.connection() as conn:

        async def rows(sql: str, *params: Any) -> str:
            return json.dumps(await (await conn.execute(sql, params)).fetchall(), default=str)

        return {
            "tool_effects": await rows(
                "select * from tool_effects where idempotency_key like %s", f"{wid}/%"
            ),
            "memory": await rows("select * from memory_turns where session=%s", session)
            + await rows("select * from memory_summaries where session=%s", session),
            "audit": await rows("select * from audit_log where workflow_id=%s", wid),
        }


def _plans(order: str, tool_text: str, fetch_key: str) -> list[Any]:
    first = {
        "steps": [
            {"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"},
            {"id": "s2", "tool": "test_effect", "args": {"note": tool_text}, "why": "echo the note"},
            {"id": "s3", "tool": "fragile_fetch", "args": {"key": fetch_key}, "why": "upstream"},
        ],
        "answer": "",
        "replan": True,
    }
    done = {"steps": [], "answer": "All checked.", "replan": False}
    return [chat(json.dumps(first)), chat(json.dumps(done))]


async def test_planted_secrets_reach_no_sink(
    openai_server: FakeOpenAI,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    test_env: dict[str, str],
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    req_json, req_plain, tool = Planted.fresh("req1"), Planted.fresh("req2"), Planted.fresh("tool")
    order = await make_order(db_pool, email=tool.email)  # PII in tool output: the customer
    for _ in range(2):
        _ROLES.plans.extend(_plans(order, tool.text(), tool.openai))
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    policy = write_policy(tmp_path)
    env = {**test_env, "KEEL_TASK_QUEUE": task_queue, "KEEL_POLICY_FILE": str(policy)}
    session = f"s-{secrets.token_hex(4)}"
    found: list[str] = []
    async with running_worker(client, db_pool, temporal_services, task_queue, policy_file=policy):
        code, out_json, err = await _cli(
            env, "run", f"Check order {order}. {req_json.text()}", "--json", "--session", session
        )
        assert code == 0, err
        resp = AgentResponse.model_validate_json(out_json)
        tools = [s.tool for s in resp.steps]
        assert tools[:3] == ["lookup_order", "test_effect", "fragile_fetch"], tools
        assert "cached_fetch" in tools and resp.steps[2].error  # failed, then the fallback ran
        code, out_plain, err_plain = await _cli(
            env, "run", f"Check order {order}. {req_plain.text()}", "--session", session
        )
        assert code == 0, err_plain
        _, status_plain, _ = await _cli(env, "status", resp.workflow_id)
        _, status_json, _ = await _cli(env, "status", resp.workflow_id, "--json")
        assert "lookup_order" in status_plain and json.loads(status_json)["steps"]
        cli = {
            "run --json": out_json + err,
            "run (plain)": out_plain + err_plain,
            "status (plain)": status_plain,
            "status --json": status_json,
        }
        for where, text in cli.items():
            found += _hits(f"CLI {where}", text, req_json, req_plain, tool)
        wids = [resp.workflow_id, out_plain.split()[1]]
        for wid in wids:
            handle = client.get_workflow_handle(wid)
            history = await _history_sinks(client, handle)
            _nonempty(
                history,
                "history bytes",
                "summaries, details and failure messages (decoded)",
                "static summary (describe)",
                "search attributes",
            )
            assert "fragile_fetch: upstream for [REDACTED:openai_key] is down" in str(history), wid
            assert "current details" in history  # the metadata query answered (Keel sets none)
            for where, blob in history.items():
                found += _hits(f"{wid} {where}", blob, req_json, req_plain, tool)
            db = await _db_sinks(db_pool, wid, session)
            _nonempty(db, "tool_effects", "memory", "audit")
            for where, text in db.items():
                found += _hits(f"{wid} {where}", text, req_json, req_plain, tool)
    bodies = json.dumps([r.body for r in openai_server.requests])
    found += _hits("provider request bodies", bodies, req_json, req_plain, tool)
    found += _hits("worker log", caplog.text, req_json, req_plain, tool)
    assert found == []
    # The search itself works: the test tool's own table holds the note as written.
    async with db_pool.connection() as conn:
        notes = await (
            await conn.execute(
                "select note from test_effects where idempotency_key like %s", (f"{wids[0]}/%",)
            )
        ).fetchall()
    assert _hits("test_effects", json.dumps(notes), tool) == [f"test_effects: {v}" for v in tool.values()]
    # ...and each kind was really planted, and shows as a typed placeholder where redacted.
    first_prompt = openai_server.requests[0].body["messages"][-1]["content"]
    for kind in ("openai_key", "aws_key", "card", "email"):
        assert f"[REDACTED:{kind}]" in first_prompt, (kind, first_prompt)
    assert "[REDACTED:email]" in json.dumps(json.loads(out_json)["steps"][0])
    # The sealed copy in tool_effects is exact: a replayed step returns what the tool said.
    async with db_pool.connection() as conn:
        row = await (
            await conn.execute(
                "select result from tool_effects where idempotency_key=%s", (f"{resp.workflow_id}/s2",)
            )
        ).fetchone()
    assert row is not None and "[REDACTED:openai_key]" in json.dumps(row[0]["data"])
    exact = open_sealed(load_keyring(temporal_services), row[0]["sealed"])
    assert exact["data"]["note"] == tool.text()


async def test_key_rotation_runs_started_under_key_1_finish_under_key_2(
    temporal_services: Settings,
    db_pool: AsyncConnectionPool,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key1, key2 = new_key_line("rot-1"), new_key_line("rot-2")
    old = dataclasses.replace(temporal_services, codec_keys=key1)
    new = dataclasses.replace(temporal_services, codec_keys=f"{key1},{key2}")
    policy = write_policy(tmp_path)
    steps = [
        step("s1", "test_effect", note="first"),
        step("s2", "test_effect", note="approve-me"),
    ]
    client1 = await connect(old)
    async with scripted_worker(
        client1, db_pool, old, task_queue, [plan(*steps)], policy_file=policy, monkeypatch=monkeypatch
    ):
        handle = await start(client1, task_queue, request("rotate while waiting"))
        await wait_status(handle, "s2", StepState.WAITING_APPROVAL)
    # Key 2 is added; workers restart with both keys. The run continues and finishes.
    client2 = await connect(new)
    assert load_keyring(new).newest == "rot-2"
    async with scripted_worker(
        client2, db_pool, new, task_queue, [plan(*steps)], policy_file=policy, monkeypatch=monkeypatch
    ):
        h2 = client2.get_workflow_handle(handle.id, result_type=AgentResponse)
        await h2.execute_update("approve", Approval(approve=True))
        resp = await h2.result()
    assert resp.outcome == "completed", resp.reason
    assert [s.state for s in resp.steps] == [StepState.SUCCEEDED, StepState.SUCCEEDED]
    history = await h2.fetch_history()
    ids = {
        p.metadata[KEY_ID_METADATA].decode()
        for e in history.events
        for p in (
            *e.activity_task_scheduled_event_attributes.input.payloads,
            *e.activity_task_completed_event_attributes.result.payloads,
        )
        if KEY_ID_METADATA in p.metadata
    }
    assert ids == {"rot-1", "rot-2"}
    # A process that only holds key 2 can no longer read the old half: named, not retried.
    only2 = data_converter(load_keyring(dataclasses.replace(new, codec_keys=key2)))
    started = history.events[0].workflow_execution_started_event_attributes.input.payloads
    with pytest.raises(Exception, match="unknown key id 'rot-1'"):
        await only2.decode(list(started))


async def test_temporal_cli_reads_runs_only_through_the_codec_server(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``temporal workflow show`` sees ciphertext; with ``--codec-endpoint`` (and the token)
    it sees the run; with a wrong token it is refused."""
    from keel.devservices import DevServices, temporal_binary

    marker = f"readable-{secrets.token_hex(4)}"
    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        [plan(step("s1", "test_effect", note=marker))],
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue, request(f"note {marker}"))
        assert (await handle.result()).outcome == "completed"
    services = DevServices(temporal_services)
    services.start_codec_server(env={"KEEL_CODEC_TOKEN": "cli-token"})
    try:

        async def show(*extra: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                str(temporal_binary()),
                "workflow",
                "show",
                "-w",
                handle.id,
                "--address",
                temporal_services.temporal_address,
                "-o",
                "json",
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
            return proc.returncode or 0, out.decode()

        endpoint = ["--codec-endpoint", temporal_services.codec_url]
        code, plain = await show()
        sealed = base64.b64encode(b"binary/encrypted").decode()  # metadata is base64 in JSON
        assert code == 0 and marker not in _payload_text(plain) and sealed in plain, plain[-500:]
        code, decoded = await show(*endpoint, "--codec-auth", "Bearer cli-token")
        assert code == 0 and marker in _payload_text(decoded)
        code, refused = await show(*endpoint, "--codec-auth", "Bearer wrong")
        # The CLI either fails or falls back to the raw (encrypted) payloads: never plaintext.
        assert marker not in refused, refused
        assert code != 0 or marker not in _payload_text(refused)
    finally:
        services.stop_codec_server()


def _payload_text(cli_json: str) -> str:
    """Every payload's data in ``temporal ... -o json`` output, base64-decoded, joined."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                found.append(base64.b64decode(node["data"]).decode(errors="replace"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(cli_json))
    return "\n".join(found)
