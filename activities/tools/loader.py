"""Where tools come from: the built-in demo tools, and the user's own tool packages.

A worker's catalogue is, in this order:

1. ``keel.activities.tools.demo`` and ``keel.activities.tools.operations`` (the built-in tools of the
   support and operations agents) and ``keel.activities.tools.sandboxed`` (tools that run
   programs in a sandbox);
2. every entry point in the group ``keel.tools`` of the installed distributions (a tool
   package says ``[project.entry-points."keel.tools"] acme = "acme_tools"`` in its
   ``pyproject.toml``; ``pip install`` is the whole deployment);
3. the modules named in ``KEEL_TOOL_MODULES`` (comma-separated, e.g. ``mytools.crm,mytools.erp``)
   for code that is not packaged (the tests serve their test tools this way:
   ``KEEL_TOOL_MODULES=tests.doubles.tools``).

Importing a module registers its ``@tool(...)`` declarations. A module that fails to import
(a missing dependency, a syntax error) or declares a name already taken raises
``ToolLoadError``: one line naming the module and how it was found. The worker refuses to
start on it; a worker that silently served a partial catalogue would plan without tools
its operators think it has.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from keel.activities.tools.registry import REFUSED, declared
from keel.errors import KeelError
from keel.models import ToolInfo

__all__ = ["ENTRY_POINT_GROUP", "ToolLoadError", "ToolSource", "catalog", "load_tools", "sources"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "keel.tools"
BUILTIN = (
    "keel.activities.tools.demo",
    "keel.activities.tools.operations",
    "keel.activities.tools.sandboxed",
)


class ToolLoadError(KeelError, RuntimeError):
    """A tool module could not be loaded; ``str(e)`` is one line naming it."""


@dataclass(frozen=True)
class ToolSource:
    """How one tool module was found (for ``keel tools list`` and error messages)."""

    module: str
    origin: str
    """``built-in``, ``entry point acme (acme-tools 0.1.0)`` or ``KEEL_TOOL_MODULES``."""


_SOURCES: dict[str, ToolSource] = {}
_LOADED: set[str] = set()


def sources() -> dict[str, ToolSource]:
    """Every module loaded so far, by module name."""
    return dict(_SOURCES)


_EP_CACHE: tuple[tuple[tuple[str, int], ...], list[metadata.EntryPoint]] | None = None


def _path_stamp() -> tuple[tuple[str, int], ...]:
    """Each import-path folder with its mtime: installing or removing a distribution adds or
    removes a ``*.dist-info`` folder in one of them, which changes that folder's mtime."""
    out = []
    for entry in sys.path:
        try:
            out.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            out.append((entry, -1))
    return tuple(out)


def _entry_points() -> list[metadata.EntryPoint]:
    """The ``keel.tools`` entry points, rescanned only when a distribution may have come or
    gone. ``metadata.entry_points`` reads every installed distribution's metadata files
    (~3 ms with a hundred of them), and the catalogue is read twice by every run's
    preparation: that scan was the largest CPU cost of a run's fixed part."""
    global _EP_CACHE
    stamp = _path_stamp()
    if _EP_CACHE is not None and _EP_CACHE[0] == stamp:
        return _EP_CACHE[1]
    eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))
    _EP_CACHE = (stamp, eps)
    return eps


def _dist_of(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"


def _import(module: str, origin: str, attr: str | None = None) -> None:
    key = f"{module}:{attr or ''}"
    if key in _LOADED:
        return
    try:
        loaded = importlib.import_module(module)
        if attr:  # ``module:register`` names a function that registers the tools
            target = loaded
            for part in attr.split("."):
                target = getattr(target, part)
            if callable(target):
                target()
    except ToolLoadError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ToolLoadError(
            f"tool module {module!r} ({origin}) failed to load: {type(e).__name__}: {first}"
        ) from e
    _LOADED.add(key)
    _SOURCES.setdefault(module, ToolSource(module=module, origin=origin))


def load_tools(env: Mapping[str, str]) -> None:
    """Import every tool module this environment names (idempotent; cheap once loaded)."""
    for module in BUILTIN:
        _import(module, "built-in")
    for ep in _entry_points():
        module, _, attr = ep.value.partition(":")
        module, attr = module.strip(), attr.strip()
        if f"{module}:{attr}" in _LOADED:
            # Loaded already: skip naming its distribution, which parses the package's
            # metadata file (~0.3 ms per entry point, twice per run's preparation).
            continue
        _import(module, f"entry point {ep.name!r} of {_dist_of(ep)}", attr or None)
    for name in (env.get("KEEL_TOOL_MODULES") or "").split(","):
        if name.strip():
            _import(name.strip(), "KEEL_TOOL_MODULES")


_warned = False


def catalog(include_hidden: bool = False) -> tuple[ToolInfo, ...]:
    """All tool declarations, sorted by name (the snapshot a run works from), after loading the
    built-in and sandboxed tools and the user's tool packages
    (entry points ``keel.tools``, ``KEEL_TOOL_MODULES``)."""
    global _warned
    load_tools(os.environ)
    if not _warned:
        _warned = True
        if REFUSED:  # one line per worker, naming every tool it will not offer
            log.warning(
                "sandbox unavailable (%s): not registering %s",
                next(iter(REFUSED.values())),
                ", ".join(sorted(REFUSED)),
            )
    return declared(include_hidden)
