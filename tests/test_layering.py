"""The layering ``make lint`` proves (README "Layering") breaks where it should.

A contract that is always kept proves nothing, so each case below stages the sources as they
install (``tests.import_contracts.stage``), plants one violation a hurried change would make,
and runs the real ``lint-imports`` with the project's own ``pyproject.toml``: the named
contract must break, and the untouched tree must keep every contract.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

from tests.import_contracts import ROOT, lint, stage

CONFIG = ROOT / "pyproject.toml"
LAYERS = "assembly > workflows | activities > core, and every module of keel is in one room"
INDEPENDENT = "keel.workflows and keel.activities do not import each other, even indirectly"
SIBLINGS = "no import cycle between sibling modules anywhere in keel"
MODULES = "no import cycle between any two modules of keel, a package's __init__ included"
NAMESPACE = "nothing imports the old top-level names (workflows, activities, worker, starter)"


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _run(staged: Path) -> tuple[int, str]:
    done = lint(staged, CONFIG, capture=True)
    return done.returncode, done.stdout + done.stderr


def test_the_tree_as_it_is_keeps_every_contract(tmp_path: Path) -> None:
    code, out = _run(stage(ROOT, tmp_path / "src"))
    assert code == 0, out
    flat = _squash(out)
    for name in (LAYERS, INDEPENDENT, SIBLINGS, MODULES, NAMESPACE):
        assert _squash(name) + "KEPT" in flat, out
    # The staged copy is the installed layout: the workflow and activity modules are in the graph.
    assert re.search(r"Analyzed (\d+) files", out) and int(re.search(r"Analyzed (\d+)", out)[1]) > 150, out


CASES = {
    # file (staged path), code appended, contracts that must break
    "an activity imports the workflow": (
        "keel/activities/memory.py",
        "from keel.workflows import options\n",
        [LAYERS, INDEPENDENT],
    ),
    "a workflow imports an activity inside a function": (
        "keel/workflows/saga.py",
        "def _hidden():\n    from keel.activities import ledger\n",
        [LAYERS, INDEPENDENT],
    ),
    "the core imports the activities inside a function": (
        "keel/gate.py",
        "def _hidden():\n    from keel.activities.tools.loader import catalog\n",
        [LAYERS],
    ),
    "the core imports the assembly": (
        "keel/models.py",
        "def _hidden():\n    from keel.worker import build_workers\n",
        [LAYERS],
    ),
    "the activities import the assembly": (
        "keel/activities/ledger.py",
        "def _hidden():\n    from keel.client import Client\n",
        [LAYERS],
    ),
    "two core modules import each other": (
        "keel/labels.py",
        "def _hidden():\n    from keel import gate\n",
        [SIBLINGS, MODULES],
    ),
    "a package's __init__ imports a module that imports it back": (
        "keel/activities/models/__init__.py",
        "def _hidden():\n    from keel.activities.models import openai_provider\n",
        [MODULES],
    ),
    "a module uses the old top-level name": (
        "keel/activities/memory.py",
        "import workflows.agent\n",
        [NAMESPACE],
    ),
    "a test uses the old top-level name": (
        "tests/helpers.py",
        "from activities import ledger\n",
        [NAMESPACE],
    ),
    "a new module of keel that no room claims": (
        "keel/newroom.py",
        "X = 1\n",
        [LAYERS],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_planted_violation_breaks_its_contract(tmp_path: Path, case: str) -> None:
    path, code, broken = CASES[case]
    staged = stage(ROOT, tmp_path / "src")
    target = staged / path
    target.write_text((target.read_text() if target.exists() else "") + "\n" + code)
    status, out = _run(staged)
    assert status != 0, out
    flat = _squash(out)
    for name in broken:
        assert _squash(name) + "BROKEN" in flat, (case, out)


def test_mypy_is_strict_on_exactly_the_core() -> None:
    """The core is named twice in pyproject.toml (the last layer, the strict mypy override): a
    module added to one and not the other would be unchecked or unplaced."""
    config = tomllib.loads(CONFIG.read_text())
    layers = next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "layers")
    core = {f"keel.{m.strip()}" for m in layers["layers"][-1].split(":")}
    strict = next(o for o in config["tool"]["mypy"]["overrides"] if o.get("disallow_untyped_defs"))
    assert set(strict["module"]) == core
    on_disk = {f"keel.{p.stem}" for p in (ROOT / "keel").glob("*.py") if p.stem != "__init__"}
    assembly = {f"keel.{m.strip()}" for m in layers["layers"][1].split(":")}
    assert on_disk == core | assembly, on_disk ^ (core | assembly)


_IMPORT_EACH_FIRST = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "keel" or m.startswith("keel.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    names = []
    for folder, package in (
        (ROOT / "keel", "keel"),
        (ROOT / "workflows", "keel.workflows"),
        (ROOT / "activities", "keel.activities"),
    ):
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if "__pycache__" not in path.parts and "migrations" not in path.parts:
                names.append(".".join([package, *parts]))
    return names


@pytest.mark.timeout(900)
def test_every_module_imports_first_on_its_own() -> None:
    """A cycle that only a function-level import kept apart shows as an ImportError when the
    other end is imported first (``keel.activities.agent_defs`` did, once the MCP tools read
    agent definitions at module level). Each module is imported first, on its own: the
    interpreter forgets every ``keel`` module before the next one."""
    names = _modules()
    assert len(names) > 80 and "keel.activities.agent_defs" in names and "keel.workflows.agent" in names
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, *names],
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
