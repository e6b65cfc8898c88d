"""``agents list``: the agent definitions a worker started with this environment would serve.

It loads them in this process exactly as a worker does (``keel.agents.load_agents``), so a
definition that would stop a worker fails here too, with the same one line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from keel.cli._output import CliError

__all__ = ["register"]

_EXAMPLES = """examples:
  keel agents list
  keel agents list --json
  keel agents list --mcp                            # also ask each MCP server for its tools
  KEEL_AGENT_PATH=./agents keel agents list        # with your own YAML definitions
  keel run --agent operations "Is SKU-KEEL-3 in stock? Open a ticket if not" --user carol

Sources: config/agents/*.yaml, the files or folders in KEEL_AGENT_PATH (':'-separated) and
entry points of the group keel.agents in installed packages."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agents",
        help="list the agent definitions a worker would serve",
        description="Show every agent definition a worker started with this environment would serve.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="agents_command", metavar="ACTION")
    asub.required = True
    ls = asub.add_parser(
        "list",
        help="name, source, tools and limits of every agent",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("--json", action="store_true", help="print the definitions as JSON")
    ls.add_argument(
        "--mcp", action="store_true", help="list each MCP server's tools now, as a run starting now would"
    )
    ls.set_defaults(func=_list)


async def _mcp_tools(agent: object) -> dict[str, object]:
    from keel.activities.tools.mcp import server_tools

    tools, problems = await server_tools(agent)  # type: ignore[arg-type]
    return {
        "tools": [
            {
                "name": t.name,
                "side_effects": t.side_effects,
                "retried": t.idempotent,
                "at_most_once": not t.idempotent,
                "risk": t.risk,
            }
            for t in tools
        ],
        "problems": list(problems.values()),
    }


async def _list(args: argparse.Namespace) -> int:
    from keel.activities.agent_defs import agent_definitions
    from keel.activities.tools.loader import ToolLoadError, catalog
    from keel.agents import AgentError, select_tools

    try:
        agents = agent_definitions()  # as the worker loads them: checked against the catalogue
        tools = [(t.name, t.tags) for t in catalog()]
    except (AgentError, ToolLoadError) as e:
        raise CliError(str(e)) from None
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "source": where,
            "description": agent.description,
            "tools": sorted(select_tools(agent, tools)),
            "tool_selectors": list(agent.tools),
            "memory": agent.memory,
            "tiers": agent.tiers,
            "limits": agent.policy.limits.model_dump() if agent.policy.limits else None,
            "mcp_servers": [m.name for m in agent.mcp],
        }
        for name, (agent, where) in sorted(agents.items())
    ]
    if args.mcp:
        for row in rows:
            agent = agents[str(row["name"])][0]
            if agent.mcp:
                row["mcp"] = await _mcp_tools(agent)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['source']})")
        if r["description"]:
            print(f"  {r['description']}")
        print(f"  tools   {', '.join(r['tools']) or '-'}   (selected by {', '.join(r['tool_selectors'])})")
        mcp = f"   mcp {', '.join(r['mcp_servers'])}" if r["mcp_servers"] else ""
        print(f"  memory  {r['memory']}{mcp}")
        listed = r.get("mcp") or {}
        for t in listed.get("tools", []):
            how = (
                "read-only" if not t["side_effects"] else ("at-most-once" if t["at_most_once"] else "retried")
            )
            print(f"    {t['name']}  ({how}, risk {t['risk']})")
        for p in listed.get("problems", []):
            print(f"    unavailable: {p}")
    return 0
