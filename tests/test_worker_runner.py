"""The worker's workflow runner (``keel.worker.CompiledSandboxRunner``) is the SDK's sandbox
with each entry snippet compiled once: every golden history replays through it, and a run
compiles no snippet twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from keel.codec import data_converter, parse_keys
from keel.worker import CompiledSandboxRunner, _compiled
from keel.workflows.agent import AgentWorkflow
from tests.conftest import TEST_CODEC_KEYS

HISTORIES = Path(__file__).parent / "histories"
GOLDEN = sorted(p.name for p in HISTORIES.glob("*.json"))


def _replayer() -> Replayer:
    keys = parse_keys(TEST_CODEC_KEYS, "tests/histories/codec-test.keys")
    runner = CompiledSandboxRunner()
    return Replayer(workflows=[AgentWorkflow], data_converter=data_converter(keys), workflow_runner=runner)


@pytest.mark.parametrize("name", GOLDEN)
async def test_golden_histories_replay_through_the_worker_runner(name: str) -> None:
    history = WorkflowHistory.from_json(f"golden-{name}", (HISTORIES / name).read_text())
    await _replayer().replay_workflow(history)


async def test_each_snippet_is_compiled_once() -> None:
    history = WorkflowHistory.from_json("golden", (HISTORIES / "lean_demo_refund.json").read_text())
    await _replayer().replay_workflow(history)  # the snippets of this shape are cached now
    before = _compiled.cache_info()
    await _replayer().replay_workflow(history)
    after = _compiled.cache_info()
    assert after.misses == before.misses
    assert after.hits - before.hits > 20  # every activation and payload context, from the cache
