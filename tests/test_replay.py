"""Determinism: replay every workflow shape, fresh from the server and from golden histories.

``test_fresh_histories_replay`` runs one workflow of each shape (worker cache 0, so every
task already replays from history while it runs), fetches the histories and replays them
with ``Replayer``. ``test_golden_histories_replay`` replays the histories committed in
``tests/histories/``: a change to ``AgentWorkflow`` that would break runs in flight fails it.
Re-record deliberately (after an intentional, versioned change) with

    KEEL_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_replay.py -k fresh

``lean_<shape>.json`` are the same shapes recorded on the lean run of issue 23 (one patch
marker, prepare and a model-less finish as local activities, the rules' evaluation in the
workflow); the others were recorded before it and prove the old path still replays.
``begin_<shape>.json`` are recorded on the run that begins with ``begin_run`` (patch
``keel-23-begin-run``: preparation and first plan in one activity), plus ``begin_denied``
(a refused request: no plan at all). ``local_<shape>.json`` are recorded on the run that
asks the ``begin_local`` local activity first (patch ``keel-23-begin-local``: with only the
built-in offline model, preparation and first plan inside the first workflow task).
``tools_<shape>.json`` are recorded on the run whose quick in-process tools run as local
activities (patch ``keel-23-local-tools``). New runs take that shape, so it is the only one
that can still be recorded: ``KEEL_RECORD_HISTORIES=tools``. (``=1``, ``=lean``, ``=begin``
and ``=local`` recorded the older shapes before it; those files are kept as they are.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from keel.codec import ENCODING, KeyRing, UnknownKeyError, data_converter, new_key_line, parse_keys
from keel.models import Approval, StepState
from keel.settings import Settings
from keel.workflows.agent import AgentWorkflow
from tests.conftest import TEST_CODEC_KEYS
from tests.doubles.models import step
from tests.helpers import make_order, request
from tests.scripted import plan, scripted_worker, start, wait_status, write_policy

HISTORIES = Path(__file__).parent / "histories"
SHAPES = (
    "demo_refund",
    "approved",
    "rejected_compensated",
    "cancelled_mid_step",
    "deadline",
    "fallback",
    "error_cascade",
)
LEAN = tuple(f"lean_{shape}" for shape in SHAPES)
"""Golden histories of the issue-23 lean run (``keel.workflows.versions.LEAN_PATCH``)."""
FRESH = (*SHAPES, "denied")
"""Shapes a fresh run records: the golden ones, and a refused request."""
BEGIN = tuple(f"begin_{shape}" for shape in FRESH)
"""Golden histories of the run that begins with ``begin_run`` (``BEGIN_PATCH``)."""
LOCAL = tuple(f"local_{shape}" for shape in FRESH)
"""Golden histories of the run that begins in process (``LOCAL_BEGIN_PATCH``)."""
TOOLS = tuple(f"tools_{shape}" for shape in FRESH)
"""Golden histories of the run whose quick tools are local activities (``LOCAL_TOOLS_PATCH``)."""


ENCRYPTED_GOLDEN = HISTORIES / "encrypted_demo_refund.json"
"""A golden history recorded with the codec on (payloads sealed under the test key); the
others were recorded before payload encryption and replay through the codec's pass-through."""


def _replayer(keys: KeyRing | None = None) -> Replayer:
    keys = keys or parse_keys(TEST_CODEC_KEYS, "tests/histories/codec-test.keys")
    return Replayer(workflows=[AgentWorkflow], data_converter=data_converter(keys))


async def _record_shapes(
    client: Client,
    pool: AsyncConnectionPool,
    settings: Settings,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, WorkflowHistory]:
    order = await make_order(pool, total_usd=40.0)
    scripts = {
        "demo_refund": None,  # the real offline planner
        "approved": [plan(step("s1", "test_effect", note="approve-me"))],
        "rejected_compensated": [
            plan(step("s1", "test_effect", note="first"), step("s2", "test_effect", note="approve-me"))
        ],
        "cancelled_mid_step": [
            plan(step("s1", "test_effect", note="first"), step("s2", "slow_step", seconds=30))
        ],
        "deadline": [plan(step("s1", "slow_step", seconds=30))],
        "fallback": [plan(step("s1", "fragile_fetch", key="k"))],
        "error_cascade": [plan(*(step(f"s{i}", "always_fail", note=f"n{i}") for i in range(1, 5)))],
    }
    plans_by_message = {f"shape {name}": p for name, p in scripts.items() if p is not None}

    def script(inp):  # one planner for all shapes, chosen by the request's message
        return plans_by_message[inp.message][min(inp.iteration, 1) - 1]

    histories: dict[str, WorkflowHistory] = {}
    async with scripted_worker(
        client, pool, settings, task_queue, [], policy_file=write_policy(tmp_path), monkeypatch=monkeypatch
    ) as p:
        p._script = script
        for name in FRESH:
            if name == "denied":  # a user the policy does not know: refused before any plan
                req = request(f"shape {name}", request_id=f"replay-{name}-{os.getpid()}", user="mallory")
            elif name == "demo_refund":
                req = request(
                    f"Refund order {order} and e-mail the customer", request_id=f"replay-{name}-{os.getpid()}"
                )
            else:
                req = request(
                    f"shape {name}",
                    request_id=f"replay-{name}-{os.getpid()}",
                    deadline_seconds=2 if name == "deadline" else None,
                )
            if name == "demo_refund":  # route this one to the real planner
                p._script = _with_real(script)
            handle = await start(client, task_queue, req)
            if name in ("approved", "rejected_compensated"):
                sid = "s1" if name == "approved" else "s2"
                await wait_status(handle, sid, StepState.WAITING_APPROVAL)
                await handle.execute_update("approve", Approval(approve=name == "approved"))
            if name == "cancelled_mid_step":
                await wait_status(handle, "s2", StepState.RUNNING)
                await handle.execute_update("cancel", "replay test")
            resp = await handle.result()
            expected = {
                "demo_refund": "completed",
                "approved": "completed",
                "rejected_compensated": "rejected",
                "cancelled_mid_step": "cancelled",
                "deadline": "escape_hatch",
                "fallback": "completed",
                "error_cascade": "escape_hatch",
                "denied": "denied",
            }[name]
            assert resp.outcome == expected, (name, resp)
            histories[name] = await handle.fetch_history()
            p._script = script
    return histories


def _with_real(script):
    def both(inp):
        if inp.message.startswith("shape "):
            return script(inp)
        return None  # the real offline model plans it

    return both


async def test_fresh_histories_replay(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    histories = await _record_shapes(client, db_pool, temporal_services, task_queue, tmp_path, monkeypatch)
    replayer = _replayer()
    for history in histories.values():
        await replayer.replay_workflow(history)  # raises on any nondeterminism
    if os.environ.get("KEEL_RECORD_HISTORIES") == "tools":
        for name, history in histories.items():
            (HISTORIES / f"tools_{name}.json").write_text(history.to_json())
    _assert_tools(histories["demo_refund"])
    _assert_tools(histories["denied"], denied=True)


def _shape(history: WorkflowHistory) -> tuple[list[bytes], list[bytes], list[str]]:
    """A run's patch markers, its local activities' marker metadata and the activities it
    scheduled, in order."""
    patches: list[bytes] = []
    local: list[bytes] = []
    remote: list[str] = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            a = e.marker_recorded_event_attributes
            if a.marker_name == "core_patch":
                patches.append(a.details["patch-data"].payloads[0].data)
            elif a.marker_name == "core_local_activity":
                local.append(a.details["data"].payloads[0].data)
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            remote.append(e.activity_task_scheduled_event_attributes.activity_type.name)
    return patches, local, remote


def _assert_lean(history: WorkflowHistory) -> None:
    """The lean demo run: one patch marker, prepare and finish as local activities, the
    evaluation in the workflow; only the plan and the three tools are activities."""
    from keel.workflows.versions import LEAN_PATCH

    patches, local, remote = _shape(history)
    assert len(patches) == 1 and LEAN_PATCH.encode() in patches[0], patches
    assert any(b'"prepare_run"' in d for d in local) and any(b'"finish_run"' in d for d in local), local
    assert remote == [
        "plan",
        "run_tool",
        "run_tool",
        "run_tool",
    ], remote
    assert len(history.events) < 49, len(history.events)  # the peer's demo run: 49 events


def _assert_begin(history: WorkflowHistory, *, denied: bool = False) -> None:
    """The run since ``BEGIN_PATCH``: still ONE patch marker; the first workflow task runs no
    local activity (preparation and first plan are the one ``begin_run`` activity); the
    model-less finish is a local activity. A refused request schedules nothing but
    ``begin_run``, and the first plan's input (tools, snapshot) is nowhere in history."""
    from keel.workflows.versions import BEGIN_PATCH

    patches, local, remote = _shape(history)
    assert len(patches) == 1 and BEGIN_PATCH.encode() in patches[0], patches
    assert not any(b'"prepare_run"' in d for d in local) and any(b'"finish_run"' in d for d in local), local
    assert remote == (["begin_run"] if denied else ["begin_run", "run_tool", "run_tool", "run_tool"]), remote
    if not denied:
        lean = WorkflowHistory.from_json("lean", (HISTORIES / "lean_demo_refund.json").read_text())
        assert len(history.events) < len(lean.events), (len(history.events), len(lean.events))


async def test_encrypted_golden_history_replays_only_with_its_key(caplog: pytest.LogCaptureFixture) -> None:
    text = ENCRYPTED_GOLDEN.read_text()
    history = WorkflowHistory.from_json("golden-encrypted", text)
    sealed, plain = 0, []
    for event in history.events:
        for p in _payloads(event):
            if p.metadata.get("encoding") == ENCODING:
                sealed += 1
            else:
                plain.append((event.event_type, p.data))
    # The only plaintext: the SDK's own marker bookkeeping, local activities (seq, type,
    # times) and patches (``workflow.patched`` ids, constants of the code).
    assert sealed > 20 and all(
        t == EventType.EVENT_TYPE_MARKER_RECORDED and d.startswith((b'{"seq"', b'{"id"')) for t, d in plain
    )
    assert "ORD-" not in text and "acme/ws:default" not in text  # no plaintext in the file
    await _replayer().replay_workflow(history)
    stranger = parse_keys(new_key_line("stranger"), "test")
    result = await _replayer(stranger).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None  # without the key nothing decodes
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert any(isinstance(x, UnknownKeyError) and "'keel-test-1'" in x.message for x in errors), errors


def _payloads(event) -> list:
    """Every Payload inside one history event (inputs, results, failures, metadata)."""
    from google.protobuf.message import Message
    from temporalio.api.common.v1 import Payload

    found = []

    def walk(msg: Message) -> None:
        if isinstance(msg, Payload):
            found.append(msg)
            return
        for field, value in msg.ListFields():
            if field.type != field.TYPE_MESSAGE or field.name == "search_attributes":
                continue  # search attributes stay plaintext by design (they are indexed)
            if isinstance(value, Message):
                walk(value)
            else:  # a repeated field or a map of messages
                for v in value.values() if hasattr(value, "values") else value:
                    walk(v)

    walk(event)
    return found


def _assert_local(history: WorkflowHistory, *, denied: bool = False) -> None:
    """The run since ``LOCAL_BEGIN_PATCH`` with the offline model: ONE patch marker; the
    preparation and first plan are the ``begin_local`` local activity of the first workflow
    task, so the only activities are the tools (none for a refused request); six events
    fewer than the ``begin_run`` run of the same shape."""
    from keel.workflows.versions import LOCAL_BEGIN_PATCH

    patches, local, remote = _shape(history)
    assert len(patches) == 1 and LOCAL_BEGIN_PATCH.encode() in patches[0], patches
    assert b'"begin_local"' in local[0] and any(b'"finish_run"' in d for d in local), local
    assert remote == ([] if denied else ["run_tool", "run_tool", "run_tool"]), remote
    shape = "denied" if denied else "demo_refund"
    begun = WorkflowHistory.from_json("begin", (HISTORIES / f"begin_{shape}.json").read_text())
    assert len(history.events) <= len(begun.events) - 5, (len(history.events), len(begun.events))


def _assert_tools(history: WorkflowHistory, *, denied: bool = False) -> None:
    """The run since ``LOCAL_TOOLS_PATCH``: ONE patch marker; the first of the demo's three
    tools (quick, in-process) is an activity, which ends the workflow task that began the run
    (its plan is in history before any effect); the other two are local activities, after the
    plan's admission and before the finish, in the second and last workflow task."""
    from keel.workflows.versions import LOCAL_TOOLS_PATCH

    patches, local, remote = _shape(history)
    assert len(patches) == 1 and LOCAL_TOOLS_PATCH.encode() in patches[0], patches
    assert remote == ([] if denied else ["run_tool"]), remote
    kinds = [re.search(rb'"activity_type":"(\w+)"', d) for d in local]
    names = [m.group(1).decode() for m in kinds if m]
    tools = [] if denied else ["budget_admit", "run_tool", "run_tool"]
    assert names == ["begin_local", *tools, "finish_run"], names
    shape = "denied" if denied else "demo_refund"
    begun = WorkflowHistory.from_json("local", (HISTORIES / f"local_{shape}.json").read_text())
    if not denied:  # two activities (3 events each) and their two workflow tasks fewer
        assert len(history.events) <= len(begun.events) - 8, (len(history.events), len(begun.events))


@pytest.mark.parametrize("shape", SHAPES + LEAN + BEGIN + LOCAL + TOOLS)
async def test_golden_histories_replay(shape: str) -> None:
    path = HISTORIES / f"{shape}.json"
    assert path.exists(), f"missing golden history {path}; record it (see module docstring)"
    history = WorkflowHistory.from_json(f"golden-{shape}", path.read_text())
    await _replayer().replay_workflow(history)
    if shape == "lean_demo_refund":
        _assert_lean(history)
    if shape in ("begin_demo_refund", "begin_denied"):
        _assert_begin(history, denied=shape == "begin_denied")
    if shape in ("local_demo_refund", "local_denied"):
        _assert_local(history, denied=shape == "local_denied")
    if shape in ("tools_demo_refund", "tools_denied"):
        _assert_tools(history, denied=shape == "tools_denied")


def test_lean_run_subsumes_exactly_the_patches_made_before_it() -> None:
    """Every patch the workflow asks through ``RunState.versions`` was made before the lean
    run and is in ``SUBSUMED``; a patch missing there would record its marker again (two
    events) and one added later would be taken as applied by runs that never had it."""
    from keel.workflows import agent, planning, steps
    from keel.workflows.versions import LEAN_PATCH, SUBSUMED

    made_before = {
        planning.HOLDS_PATCH,
        agent.FLAGS_PATCH,
        steps.FLOW_PATCH,
        steps.APPROVAL_AUDIT_PATCH,
        "plan-admission",
        "keel-deadline-pauses-for-people",
        "keel-cancel-ends-canceled",
    }
    assert made_before == SUBSUMED and LEAN_PATCH not in SUBSUMED
    source = "".join(Path(m.__file__).read_text() for m in (agent, planning, steps) if m.__file__ is not None)
    direct = re.findall(r"workflow\.patched\(([^)]*)\)", source)
    names = {"HOLDS_PATCH", "FLAGS_PATCH", "FLOW_PATCH", "APPROVAL_AUDIT_PATCH"}
    # A subsumed patch asked directly would record its marker in every lean run.
    assert not [a for a in direct if a.strip("\"'") in SUBSUMED or a in names], direct
