"""``tools list``: the catalogue a worker started with this environment would load.

It loads the tools in this process exactly as a worker does (``keel.activities.tools.loader``),
so a module that would stop a worker fails here too, with the same one line.
"""

from __future__ import annotations

import argparse
import json

from keel.cli._output import CliError

__all__ = ["register"]

_EXAMPLES = """examples:
  keel tools list
  keel tools list --json
  KEEL_TOOL_MODULES=mytools.crm keel tools list     # what that worker would serve

Sources: built-in (activities/tools/demo.py), entry points of the group keel.tools in
installed packages, and the modules named in KEEL_TOOL_MODULES (comma-separated)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "tools",
        help="list the tools a worker would load, and from where",
        description="Show every tool a worker started with this environment would register.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="tools_command", metavar="ACTION")
    tsub.required = True
    ls = tsub.add_parser(
        "list",
        help="name, source, permissions and behaviour of every tool",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("--json", action="store_true", help="print the tools as JSON")
    ls.set_defaults(func=_list)


def _rows() -> list[dict[str, object]]:
    from keel.activities.tools.loader import ToolLoadError, catalog, sources
    from keel.activities.tools.registry import REGISTRY

    try:
        infos = catalog(include_hidden=True)
    except ToolLoadError as e:
        raise CliError(str(e)) from None
    visible = {t.name for t in catalog()}
    found = sources()
    rows = []
    for info in infos:
        module = REGISTRY[info.name].module
        src = found.get(module)
        rows.append(
            {
                "name": info.name,
                "module": module,
                "source": src.origin if src else "registered by another module",
                "permissions": list(info.permissions),
                "tags": list(info.tags),
                "side_effects": info.side_effects,
                "idempotent": info.idempotent,
                "compensation": info.compensation,
                "fallback": info.fallback,
                "hidden": info.name not in visible,
                "description": info.description,
            }
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("TOOL", "MODULE", "SOURCE", "PERMISSIONS", "BEHAVIOUR")
    table = [
        (
            str(r["name"]) + (" (hidden)" if r["hidden"] else ""),
            str(r["module"]),
            str(r["source"]),
            ",".join(r["permissions"]) or "-",  # type: ignore[arg-type]
            _behaviour(r),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *table]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print("\n".join(fmt.format(*x) for x in [head, *table]))
    return 0


def _behaviour(r: dict[str, object]) -> str:
    parts = ["writes" if r["side_effects"] else "read-only"]
    if not r["idempotent"]:
        parts.append("non-idempotent")
    if r["compensation"]:
        parts.append(f"undo={r['compensation']}")
    if r["fallback"]:
        parts.append(f"fallback={r['fallback']}")
    return ", ".join(parts)
