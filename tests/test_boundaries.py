"""Request boundaries, tried as a careless operator (CLI) and a hostile client (raw SDK) would.

Promise (issue 15, item 3): money, deadlines and iteration caps are finite and within their
documented ranges; strings carry no NUL and are valid UTF-8. The CLI refuses a bad request
with one line and starts nothing; a client that goes around the CLI and hands Temporal a bad
payload gets a run that fails at once with one line ``invalid request: ...`` — it never
loops on workflow-task failures, is charged nothing, holds no run slot and writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from keel.agents import workflow_id
from keel.models import MAX_DEADLINE_SECONDS, MAX_ITERATIONS, MAX_RUN_BUDGET_USD, AgentRequest
from keel.settings import Settings
from tests.ending import assert_nothing_started, history_counts
from tests.helpers import running_worker
from tests.test_cli import _cli, cli_env  # noqa: F401  (the CLI fixture: a real worker.py)

GOOD: dict[str, Any] = {"tenant": "acme", "user": "alice", "message": "Is ORD-123 shipped?"}


# ---------------------------------------------------------------- the model's ranges, exactly
@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("max_budget_usd", [MAX_RUN_BUDGET_USD, 0.01, 1e-6], [MAX_RUN_BUDGET_USD + 0.01, 0.0, -0.0, -1.0]),
        ("deadline_seconds", [1, MAX_DEADLINE_SECONDS], [0, -1, MAX_DEADLINE_SECONDS + 1, 10**19]),
        ("max_iterations", [1, MAX_ITERATIONS], [0, -1, MAX_ITERATIONS + 1, 10**400]),
    ],
)
def test_ranges_are_inclusive_and_exact(field: str, ok: list[Any], bad: list[Any]) -> None:
    for v in ok:
        assert getattr(AgentRequest(**GOOD, **{field: v}), field) == v
    for v in bad:
        with pytest.raises(ValidationError):
            AgentRequest(**GOOD, **{field: v})


@pytest.mark.parametrize("v", [math.inf, -math.inf, math.nan, 1e308, None, "1", True, [1.0]])
def test_budget_must_be_a_finite_number(v: Any) -> None:
    # "1" and True are coerced by pydantic's lax mode; both are in range, so they may pass,
    # but nothing non-finite, missing or huge may.
    if v in ("1", True):
        assert AgentRequest(**GOOD, max_budget_usd=v).max_budget_usd == 1.0
        return
    with pytest.raises(ValidationError):
        AgentRequest(**GOOD, max_budget_usd=v)


@pytest.mark.parametrize("field", ["message", "tenant", "user", "session", "workspace", "request_id"])
@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b", "\udcff"])
def test_no_string_field_carries_nul_or_a_lone_surrogate(field: str, text: str) -> None:
    with pytest.raises(ValidationError):
        AgentRequest(**{**GOOD, field: text})


def test_permissions_carry_no_nul() -> None:
    with pytest.raises(ValidationError):
        AgentRequest(**GOOD, permissions=("orders:read\x00",))


# ---------------------------------------------------------------- through the CLI
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budget=-inf"], "error: --budget: budget must be a positive, finite number"),
        (["--budget", "infinity"], "error: --budget: budget must be a positive, finite number"),
        (["--budget", "1e309"], "error: --budget: budget must be a positive, finite number"),
        (["--budget", "0"], "error: --budget: budget must be a positive, finite number"),
        (["--budget", "10000.01"], "error: --budget: budget must be at most 10,000.00 USD"),
        (["--deadline=-5"], "error: --deadline: deadline must be between 1 and"),
        (["--deadline", str(MAX_DEADLINE_SECONDS + 1)], "error: --deadline: deadline must be between 1 and"),
        (["--deadline", "1" + "0" * 400], "error: --deadline: deadline must be between 1 and"),
        (["--max-iterations", str(MAX_ITERATIONS + 1)], "error: --max-iterations: max iterations must be"),
        (["--max-iterations", "1" + "0" * 400], "error: --max-iterations: max iterations must be"),
        (["--session", "s\udcffs"], "error: --session: must be 1-64 characters"),
        (["--tenant", "ac\udcffme"], "error: --tenant: must be 1-64 characters"),
        (["--perm", "orders:\udcff"], "error: --perm: permission"),
        (["--request-id", "x" * 129], "error: --request-id: request id must be 1-128"),
        (["--request-id", "caf\u00e9"], "error: --request-id: request id must be 1-128"),
    ],
)
def test_cli_refuses_each_boundary_with_one_line_and_starts_nothing(
    cli_env: dict[str, str],  # noqa: F811
    args: list[str],
    expected: str,
) -> None:
    rid = f"bnd-{uuid.uuid4().hex[:10]}"
    with_id = args if "--request-id" in args else [*args, "--request-id", rid]
    done = _cli(cli_env, "run", "hello", *with_id, "--no-wait")
    assert done.returncode == 2, done
    assert done.stderr.startswith(expected), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    if "--request-id" not in args:  # the id was ours: Temporal never heard of it
        status = _cli(cli_env, "status", workflow_id("acme", "support", rid))
        assert status.returncode != 0 and status.stderr.startswith("error: no run"), status


def test_cli_message_with_a_nul_cannot_even_be_passed() -> None:
    """argv cannot carry a NUL (execve refuses it): the only way in is the SDK, tested below."""
    import subprocess
    import sys

    with pytest.raises(ValueError, match="null byte"):
        subprocess.run([sys.executable, "-c", "pass", "a\x00b"], check=False)


# ---------------------------------------------------------------- through the SDK
@pytest.fixture(scope="module")
async def sdk_queue(
    client: Client, db_pool: AsyncConnectionPool, temporal_services: Settings
) -> AsyncIterator[str]:
    """One real worker for every SDK case (cache 0: every task replays from history)."""
    queue = f"bnd-{uuid.uuid4()}"
    async with running_worker(client, db_pool, temporal_services, queue):
        yield queue


def _json_payload(text: bytes) -> RawValue:
    """A payload exactly as a hostile or buggy client in any language could write it."""
    return RawValue(Payload(metadata={"encoding": b"json/plain"}, data=text))


_SDK_CASES: dict[str, Any] = {
    "budget inf": {**GOOD, "max_budget_usd": math.inf},
    "budget -inf": {**GOOD, "max_budget_usd": -math.inf},
    "budget nan": {**GOOD, "max_budget_usd": math.nan},
    "budget null": {**GOOD, "max_budget_usd": None},
    "budget 1e308": {**GOOD, "max_budget_usd": 1e308},
    "budget zero": {**GOOD, "max_budget_usd": 0},
    "budget a word": {**GOOD, "max_budget_usd": "lots"},
    "budget huge int": {**GOOD, "max_budget_usd": 10**400},
    "deadline 10**19": {**GOOD, "deadline_seconds": 10**19},
    "deadline 0": {**GOOD, "deadline_seconds": 0},
    "deadline fraction": {**GOOD, "deadline_seconds": 1.5},
    "iterations 0": {**GOOD, "max_iterations": 0},
    "iterations huge": {**GOOD, "max_iterations": 10**400},
    "escalations huge": {**GOOD, "model_policy": {"max_escalations": 10**19}},
    "unknown tier": {**GOOD, "model_policy": {"max_tier": "godlike"}},
    "message NUL": {**GOOD, "message": "refund\x00 ORD-123"},
    "message empty": {**GOOD, "message": ""},
    "message too long": {**GOOD, "message": "x" * 8001},
    "message a list": {**GOOD, "message": ["Is", "ORD-123", "shipped?"]},
    "message a dict": {**GOOD, "message": {"text": "hi"}},
    "tenant a list": {**GOOD, "tenant": ["acme"]},
    "tenant NUL": {**GOOD, "tenant": "ac\x00me"},
    "user missing": {"tenant": "acme", "message": "hi"},
    "permissions a string": {**GOOD, "permissions": "orders:read"},
    "permission NUL": {**GOOD, "permissions": ["orders:\x00read"]},
    "request id slash": {**GOOD, "request_id": "a/b"},
    "not an object": "please refund ORD-123",
    "null": None,
    "a list": [GOOD],
    "lone surrogate (raw JSON)": _json_payload(
        b'{"tenant":"acme","user":"alice","message":"refund \\ud800 ORD-123"}'
    ),
    "lone surrogate in tenant (raw JSON)": _json_payload(
        b'{"tenant":"ac\\udc00me","user":"alice","message":"hi"}'
    ),
    "invalid UTF-8 bytes (raw)": _json_payload(b'{"tenant":"acme","user":"alice","message":"\xff\xfe"}'),
    "broken JSON (raw)": _json_payload(b'{"tenant":"acme",'),
    "Infinity literal (raw)": _json_payload(
        b'{"tenant":"acme","user":"alice","message":"hi","max_budget_usd":Infinity}'
    ),
    "unknown encoding (raw)": RawValue(Payload(metadata={"encoding": b"binary/protobuf"}, data=b"\x08\x01")),
}


@pytest.mark.parametrize("case", list(_SDK_CASES))
async def test_sdk_bad_request_fails_at_once_with_one_line(
    case: str, client: Client, db_pool: AsyncConnectionPool, sdk_queue: str
) -> None:
    wid = f"agent/acme/bnd-{uuid.uuid4().hex[:10]}"
    began = time.monotonic()
    handle = await client.start_workflow("AgentWorkflow", _SDK_CASES[case], id=wid, task_queue=sdk_queue)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), timeout=30)
    elapsed = time.monotonic() - began
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == "InvalidRequest", (cause.type, cause.message)
    assert cause.message.startswith("invalid request: "), cause.message
    assert "\n" not in cause.message and len(cause.message) < 500, cause.message
    assert elapsed < 15, f"{case}: took {elapsed:.1f} s to fail"
    counts = await history_counts(handle)
    assert counts.get("WORKFLOW_TASK_FAILED", 0) == 0, counts  # no task-failure loop
    assert counts.get("ACTIVITY_TASK_SCHEDULED", 0) == 0 and counts.get("MARKER_RECORDED", 0) == 0, counts
    assert counts.get("WORKFLOW_EXECUTION_FAILED") == 1, counts
    await assert_nothing_started(db_pool, wid)


async def test_sdk_start_without_an_argument_fails_at_once(
    client: Client, db_pool: AsyncConnectionPool, sdk_queue: str
) -> None:
    """A client that forgets the request entirely must not wedge the run either."""
    wid = f"agent/acme/bnd-{uuid.uuid4().hex[:10]}"
    handle = await client.start_workflow("AgentWorkflow", id=wid, task_queue=sdk_queue)
    await _fails_without_a_task_loop(handle)
    await assert_nothing_started(db_pool, wid)


async def test_sdk_start_with_two_arguments_fails_at_once(
    client: Client, db_pool: AsyncConnectionPool, sdk_queue: str
) -> None:
    wid = f"agent/acme/bnd-{uuid.uuid4().hex[:10]}"
    handle = await client.start_workflow("AgentWorkflow", args=[GOOD, GOOD], id=wid, task_queue=sdk_queue)
    await _fails_without_a_task_loop(handle)
    await assert_nothing_started(db_pool, wid)


async def _fails_without_a_task_loop(handle: Any) -> None:
    try:
        await asyncio.wait_for(handle.result(), timeout=15)
    except WorkflowFailureError as e:
        assert isinstance(e.cause, ApplicationError) and "\n" not in e.cause.message, e.cause
    except TimeoutError:
        counts = await history_counts(handle)
        await handle.terminate("test: wedged")
        raise AssertionError(f"the run neither failed nor completed; history: {counts}") from None
    counts = await history_counts(handle)
    assert counts.get("WORKFLOW_TASK_FAILED", 0) == 0, counts


async def test_sdk_good_request_at_the_limits_runs(
    client: Client, db_pool: AsyncConnectionPool, sdk_queue: str
) -> None:
    """The control case: the largest legal values start a run that ends normally (so the
    refusals above are the boundaries, not a workflow that refuses everything)."""
    wid = f"agent/acme/bnd-{uuid.uuid4().hex[:10]}"
    body = {
        **GOOD,
        "request_id": wid.rsplit("/", 1)[1],
        "session": wid.rsplit("/", 1)[1],
        "max_budget_usd": MAX_RUN_BUDGET_USD,
        "deadline_seconds": MAX_DEADLINE_SECONDS,
        "max_iterations": MAX_ITERATIONS,
    }
    handle = await client.start_workflow("AgentWorkflow", body, id=wid, task_queue=sdk_queue)
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result["outcome"] == "completed", result
    # the run freed its slot and its holds
    from tests.ending import ledger_facts

    facts = await ledger_facts(db_pool, wid)
    assert facts["slot"] == 0 and facts["held"] == 0 and facts["finish"] == "completed", facts
    assert json.loads(json.dumps(result))["spend"]["total_micros"] == facts["committed_micros"]


async def test_sdk_client_refuses_to_encode_a_lone_surrogate(client: Client, sdk_queue: str) -> None:
    """The SDK's own encoder stops a lone surrogate before anything is started."""
    wid = f"agent/acme/bnd-{uuid.uuid4().hex[:10]}"
    with pytest.raises(Exception, match="surrogates not allowed"):
        await client.start_workflow(
            "AgentWorkflow", {**GOOD, "message": "\ud800"}, id=wid, task_queue=sdk_queue
        )
    with pytest.raises(RPCError) as missing:
        await client.get_workflow_handle(wid).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND


async def test_hostile_update_payloads_are_refused_without_a_task_loop(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Updates are inputs too: a raw client answering an approval with garbage must be refused
    per update, and the run must go on waiting for a real answer."""
    from temporalio.client import WorkflowUpdateFailedError

    from keel.models import StepState
    from tests.doubles.models import step
    from tests.ending import assert_one_exit
    from tests.scripted import plan, scripted_worker, start, wait_status, write_policy

    async with scripted_worker(
        client,
        db_pool,
        temporal_services,
        task_queue,
        [plan(step("s1", "test_effect", note="approve-me"))],
        policy_file=write_policy(tmp_path),
        monkeypatch=monkeypatch,
    ):
        handle = await start(client, task_queue)
        await wait_status(handle, "s1", StepState.WAITING_APPROVAL)
        hostile: list[tuple[str, Any]] = [
            ("approve", {"approve": "maybe"}),
            ("approve", [1, 2]),
            ("approve", {"step_id": "nope"}),
            ("approve", _json_payload(b"{not json")),
            ("cancel", {"reason": 1}),
        ]
        for name, arg in hostile:
            with pytest.raises((WorkflowUpdateFailedError, RPCError)):
                await asyncio.wait_for(handle.execute_update(name, arg), timeout=10)
        status = await wait_status(handle, "s1", StepState.WAITING_APPROVAL)
        assert status.phase == "waiting_approval"
        await handle.execute_update("approve", {"approve": False, "reason": "no\x00thanks"})
        resp = await asyncio.wait_for(handle.result(), timeout=30)
    assert resp.outcome == "rejected", (resp.outcome, resp.reason)
    await assert_one_exit(db_pool, handle, resp)
