"""Agents as definitions: one declaration per agent, in Python or YAML.

An agent is what a run is *for*: its name, the planner's instructions, the tools it may use
(by name or ``tag:<tag>``), model tiers, a policy section (extra constraints and approvals
for its tools, its own limits), its memory scope and the MCP servers it talks to. The
workflow is the same for every agent; ``prepare_run`` resolves the definition named by the
request and snapshots what it decides with into the run's history.

Python::

    from keel.agents import Agent

    operations = Agent(
        name="operations",
        instructions="You run warehouse operations: check stock, open tickets.",
        tools=("tag:inventory", "tag:tickets"),
    )

YAML (``config/agents/*.yaml``, or files/folders in ``KEEL_AGENT_PATH``)::

    name: operations
    instructions: You run warehouse operations ...
    tools: [tag:inventory, tag:tickets]

Where definitions come from (``load_agents``): ``config/agents/*.yaml``, the paths in
``KEEL_AGENT_PATH`` (``:``-separated files or folders), and entry points of the group
``keel.agents`` (``module:attribute`` naming an ``Agent`` or a list of them). Two
definitions with one name are refused, like two tools with one name.

Pure data: no I/O in the models, so the workflow may import them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from keel.errors import ConfigError
from keel.models import ToolInfo
from keel.policy import Limits, ToolRule, _loc, _Strict, check_tool_rules
from keel.settings import PROJECT_ROOT

__all__ = [
    "DEFAULT_AGENT",
    "ENTRY_POINT_GROUP",
    "Agent",
    "AgentError",
    "AgentPolicy",
    "check_agent",
    "McpServer",
    "McpToolOverride",
    "load_agents",
    "parse_agent",
    "select_tools",
    "workflow_id",
]

DEFAULT_AGENT = "support"
"""The agent a request that names none runs (the demo's support agent)."""
ENTRY_POINT_GROUP = "keel.agents"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class AgentError(ConfigError):
    """A definition that cannot be used; ``str(e)`` is one line naming the source."""


def workflow_id(tenant: str, agent: str, request_id: str) -> str:
    """The run id scheme: ``agent/<tenant>/<agent>/<request_id>`` (one request id per agent)."""
    return f"agent/{tenant}/{agent}/{request_id}"


class McpToolOverride(_Strict):
    """Policy overrides for one MCP tool, over what its annotations say."""

    read_only: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None
    permissions: tuple[str, ...] | None = None
    hidden: bool = False
    """Never offer this tool to the planner."""


class McpServer(_Strict):
    """An MCP server the agent's runs use; its tools are listed when a run starts."""

    name: str
    """Prefix of its tools' names in the run (``<name>.<tool>``)."""
    transport: Literal["stdio", "http"] = "stdio"
    command: str = ""
    """stdio: the program to start (with ``args``, ``env``, ``cwd``)."""
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    """Extra variables for a stdio server; values ``${VAR}`` are read from the worker's env."""
    cwd: str | None = None
    url: str = ""
    """http: the streamable-HTTP endpoint, e.g. ``http://127.0.0.1:8000/mcp``."""
    headers: dict[str, str] = Field(default_factory=dict)
    """http: request headers; values ``${VAR}`` are read from the worker's env (secrets)."""
    permissions: tuple[str, ...] = ()
    """Permissions the caller needs for every tool of this server."""
    timeout_seconds: float = 30.0
    cost_usd: float = 0.0
    """Estimated cost of one call, reserved in the ledger before it runs."""
    rate_limit_per_second: float | None = Field(default=None, gt=0)
    """Calls per second to this server across all workers (one Temporal task queue with a
    rate limit, ``<queue>-mcp-<name>``, like a rate-limited native tool's)."""
    tools: dict[str, McpToolOverride] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _server_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '_' (max 40)")
        return v


class AgentPolicy(_Strict):
    """The agent's section of the policy: added to the policy file's rules, never replacing
    them (a constraint or an approval here can only make this agent stricter)."""

    tools: dict[str, ToolRule] = Field(default_factory=dict)
    limits: Limits | None = None
    """This agent's escape-hatch limits instead of the policy file's."""


class Agent(_Strict):
    """One agent definition (see the module docstring)."""

    name: str
    instructions: str = Field(min_length=1, max_length=8000)
    """The planner's role and rules for this agent (the system prompt's first part)."""
    description: str = ""
    tools: tuple[str, ...] = ("*",)
    """Tool names, ``tag:<tag>`` or ``*`` (every tool the caller may use)."""
    tiers: dict[str, str] = Field(default_factory=dict)
    """Per tier (fast, balanced, powerful) a model ``provider:name``; applied when the worker
    has that provider configured, otherwise the worker's own tier models serve."""
    policy: AgentPolicy = AgentPolicy()
    memory: Literal["session", "agent", "none"] = "session"
    """``session``: shared by the tenant's session; ``agent``: per agent and session; ``none``."""
    mcp: tuple[McpServer, ...] = ()

    @field_validator("name")
    @classmethod
    def _agent_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '_', starting with a letter")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: dict[str, str]) -> dict[str, str]:
        for tier, model in v.items():
            if tier not in ("fast", "balanced", "powerful"):
                raise ValueError(f"unknown tier {tier!r} (fast, balanced, powerful)")
            provider, _, name = model.partition(":")
            if model != "offline" and (provider not in ("openai", "anthropic") or not name):
                raise ValueError(f"{tier}: expected 'offline', 'openai:<name>' or 'anthropic:<name>'")
        return v

    def memory_session(self, session: str) -> str | None:
        """The memory key of ``session`` for this agent (``None``: no memory)."""
        if self.memory == "none":
            return None
        return f"{self.name}:{session}" if self.memory == "agent" else session


def select_tools(agent: Agent, names_and_tags: Sequence[tuple[str, tuple[str, ...]]]) -> set[str]:
    """The tool names ``agent`` selects from ``(name, tags)`` pairs."""
    chosen: set[str] = set()
    for sel in agent.tools:
        for name, tags in names_and_tags:
            if sel == "*" or sel == name or (sel.startswith("tag:") and sel[4:] in tags):
                chosen.add(name)
    return chosen


def parse_agent(data: Any, source: str) -> Agent:
    """Validate one definition (a mapping or an ``Agent``); ``AgentError`` with one line."""
    if isinstance(data, Agent):
        return data
    if not isinstance(data, dict):
        raise AgentError(f"{source}: expected a mapping with 'name', 'instructions', ...")
    try:
        return Agent.model_validate(data, context={"strict": True})
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise AgentError(f"{source}: {_loc(err['loc'])}: {msg}") from None


def _yaml_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    return [path]


def _from_yaml(path: Path) -> list[Agent]:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except OSError as e:
        raise AgentError(f"{path}: cannot read agent file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise AgentError(f"{path}: {where}invalid YAML: {getattr(e, 'problem', None) or e}") from None
    return [parse_agent(d, str(path)) for d in docs]


def _from_entry_points() -> list[tuple[Agent, str]]:
    from importlib import metadata

    found: list[tuple[Agent, str]] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as e:
            raise AgentError(f"{where} failed to load: {type(e).__name__}: {e}") from None
        items = obj if isinstance(obj, list | tuple) else [obj]
        found += [(parse_agent(a, where), where) for a in items]
    return found


def check_agent(agent: Agent, source: str, tools: Sequence[ToolInfo], policy: Any = None) -> None:
    """Refuse (``AgentError``, one line) an agent whose policy section names a tool or an
    argument the catalogue ``tools`` does not have, or a permission no role of ``policy``
    grants: like the policy file's own rules, a typo must not load (a rule on a misspelt
    tool would silently never apply). Rules on ``<server>.<tool>`` need the agent's MCP
    server ``<server>``."""
    bad = check_tool_rules(agent.policy.tools, tools, "policy.tools", tuple(s.name for s in agent.mcp))
    if bad is None and policy is not None:
        held = {p for perms in policy.roles.values() for p in perms}
        for tool, rule in agent.policy.tools.items():
            for i, perm in enumerate(rule.permissions):
                if not any(_grants(h, perm) for h in held):
                    bad = (
                        f"policy.tools.{tool}.permissions[{i}]",
                        f"no role grants {perm!r} (roles: {', '.join(sorted(policy.roles)) or 'none'})",
                    )
                    break
            if bad:
                break
    if bad:
        raise AgentError(f"{source}: agent {agent.name!r}: {bad[0]}: {bad[1]}")


def _grants(held: str, perm: str) -> bool:
    return held == perm or held == "*" or (held.endswith(":*") and perm.startswith(held[:-1]))


def load_agents(
    env: Mapping[str, str],
    builtin: Path | None = None,
    tools: Sequence[ToolInfo] | None = None,
    policy: Any = None,
) -> dict[str, tuple[Agent, str]]:
    """Every definition this environment names: ``{name: (agent, where it came from)}``.

    With ``tools`` (the catalogue, hidden tools included) each agent's policy section is
    checked against it, and with ``policy`` against the roles it defines (``check_agent``)."""
    found: list[tuple[Agent, str]] = []
    paths = [builtin or PROJECT_ROOT / "config" / "agents"]
    paths += [Path(p) for p in (env.get("KEEL_AGENT_PATH") or "").split(":") if p.strip()]
    for path in paths:
        if not path.exists():
            if path in paths[1:]:
                raise AgentError(f"KEEL_AGENT_PATH: {path} does not exist")
            continue
        for file in _yaml_files(path):
            found += [(a, str(file)) for a in _from_yaml(file)]
    found += _from_entry_points()
    agents: dict[str, tuple[Agent, str]] = {}
    for agent, where in found:
        if agent.name in agents:
            raise AgentError(
                f"agent {agent.name!r} is defined twice (in {agents[agent.name][1]} and in {where})"
            )
        agents[agent.name] = (agent, where)
        if tools is not None:
            check_agent(agent, where, tools, policy)
    servers: dict[str, tuple[McpServer, str]] = {}
    for name, (agent, _) in agents.items():
        for server in agent.mcp:  # a tool call names only <server>.<tool>: one config per name
            seen = servers.setdefault(server.name, (server, name))
            if seen[0] != server:
                raise AgentError(
                    f"MCP server {server.name!r} is configured differently by agents {seen[1]!r} and {name!r}"
                )
    return agents


def merged_policy(policy: Any, agent: Agent) -> Any:
    """``policy`` (a ``keel.policy.Policy``) with the agent's section added: its tool rules'
    permissions, constraints, approvals and cumulative limits appended to the file's, the
    stricter ``on_untrusted`` of the two, its limits instead."""
    tools = dict(policy.tools)
    for name, rule in agent.policy.tools.items():
        base = tools.get(name) or ToolRule()
        tools[name] = ToolRule(
            permissions=tuple(dict.fromkeys((*base.permissions, *rule.permissions))),
            constraints=(*base.constraints, *rule.constraints),
            approvals=(*base.approvals, *rule.approvals),
            cumulative=(*base.cumulative, *rule.cumulative),
            on_untrusted=_stricter(base.on_untrusted, rule.on_untrusted),
        )
    update: dict[str, Any] = {"tools": tools}
    if agent.policy.limits is not None:
        update["limits"] = agent.policy.limits
    return policy.model_copy(update=update)


def _stricter(a: str | None, b: str | None) -> Any:
    """``deny`` over ``approve`` over unset: an agent's section can only tighten."""
    return "deny" if "deny" in (a, b) else ("approve" if "approve" in (a, b) else None)


def agent_tiers(tiers: Mapping[str, str], agent: Agent, env: Mapping[str, str]) -> dict[str, str]:
    """The worker's tier models with the agent's choices, where the worker can serve them."""
    available = {
        "offline": True,
        "openai": bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL")),
        "anthropic": bool(env.get("ANTHROPIC_API_KEY")),
    }
    out = dict(tiers)
    for tier, model in agent.tiers.items():
        if available.get(model.split(":", 1)[0]):
            out[tier] = model
    return out
