"""An import-linter contract the built-in ones do not cover: no import cycle between modules.

``acyclic_siblings`` finds cycles between sibling packages and modules, but a package's
``__init__`` importing one of its own modules that imports the package back
(``keel.activities.models`` and its providers, ``keel.cli`` and ``keel.cli._output``) is a
parent and a child, not two siblings, so it slips through. This contract looks at single
modules (a package counts as its ``__init__``): every strongly connected group of two or more
modules under ``packages`` is a cycle, reported with one concrete loop and its line numbers.
Function-level imports count like any other import (grimp reads them all).

Registered in ``pyproject.toml`` (``contract_types``). ``python -m tests.import_contracts``
(what ``make lint`` runs) lays the sources out as they install and lints that copy: grimp finds
a package's modules by walking its folder, and ``workflows/`` and ``activities/`` live beside
``keel/`` in the repository (setuptools ``package-dir`` maps them to ``keel.workflows`` and
``keel.activities``), so linting the repository itself would never see them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

__all__ = ["AcyclicModulesContract", "lint", "module_cycles", "stage"]

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".keel" / "lint"


def module_cycles(graph: ImportGraph, packages: set[str]) -> list[list[str]]:
    """Each import cycle among the modules of ``packages``, as one loop ``[a, b, ..., a]``."""

    def inside(m: str) -> bool:
        return any(m == p or m.startswith(p + ".") for p in packages)

    modules = sorted(m for m in graph.modules if inside(m) and not graph.is_module_squashed(m))
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m) if inside(n)) for m in modules}
    # Tarjan's strongly connected components, iteratively (no recursion limit to meet).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            successors = edges.get(node, [])
            if i < len(successors):
                work.append((node, i + 1))
                nxt = successors[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    loops = []
    for group in sorted(groups):
        start = group[0]
        # The shortest way back to ``start`` from one of the modules it imports in the group.
        best: tuple[str, ...] | None = None
        for first in (n for n in edges[start] if n in group):
            chain = graph.find_shortest_chain(importer=first, imported=start)
            if chain is not None and (best is None or len(chain) < len(best)):
                best = chain
        loops.append([start, *(best or group)])
    return loops


class AcyclicModulesContract(Contract):
    """No import cycle between any two modules of ``packages`` (``__init__`` included)."""

    type_name = "acyclic_modules"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        loops = module_cycles(graph, set(self.packages))  # type: ignore[arg-type]
        details = [[(a, b, _lines(graph, a, b)) for a, b in itertools.pairwise(loop)] for loop in loops]
        return ContractCheck(kept=not loops, metadata={"loops": details})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for loop in check.metadata["loops"]:
            output.print_error(f"Import cycle through {len(loop)} modules:")
            output.new_line()
            for importer, imported, lines in loop:
                output.print_error(f"- {importer} -> {imported} ({lines})")
            output.new_line()


def _lines(graph: ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    return ", ".join(f"l.{d['line_number']}" for d in details) or "?"


def stage(root: Path, dest: Path) -> Path:
    """Copy the sources into ``dest`` in the installed layout (``keel/workflows``,
    ``keel/activities``) plus ``tests``; Python files only. Returns ``dest``."""

    def skip(folder: str, names: list[str]) -> set[str]:
        return {
            n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))
        }

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "keel", dest / "keel", ignore=skip)
    shutil.copytree(root / "workflows", dest / "keel" / "workflows", ignore=skip)
    shutil.copytree(root / "activities", dest / "keel" / "activities", ignore=skip)
    shutil.copytree(root / "tests", dest / "tests", ignore=skip)
    return dest


def lint(staged: Path, config: Path, *, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` on a staged copy (its cwd, so its ``keel`` is the one imported)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", str(config)],
        cwd=staged,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(staged)},
        capture_output=capture,
        text=True,
        check=False,
    )


if __name__ == "__main__":
    sys.exit(lint(stage(ROOT, STAGE), ROOT / "pyproject.toml").returncode)
