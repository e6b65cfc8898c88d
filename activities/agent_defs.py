"""The worker's agent definitions, loaded once per process (see ``keel.agents``).

``prepare_run`` resolves the definition a request names here. Definitions are files and
installed packages, so a worker reads them at its start (``keel.worker`` calls
``agent_definitions`` before serving, and a bad definition stops it with one line) and
again only when restarted, like its code.
"""

from __future__ import annotations

import os
from typing import Any

from keel.activities.tools.loader import catalog
from keel.agents import DEFAULT_AGENT, Agent, load_agents
from keel.policy import PolicyError, load_policy
from keel.settings import SettingsError, load_settings

__all__ = ["agent_definitions", "find_agent", "reset"]

_AGENTS: dict[str, tuple[Agent, str]] | None = None


def agent_definitions() -> dict[str, tuple[Agent, str]]:
    """``{name: (definition, where it came from)}``; raises ``AgentError`` on a bad one,
    including a policy section that names a tool, argument or permission that does not exist
    (checked against the tool catalogue and the roles of the policy file)."""
    global _AGENTS
    if _AGENTS is None:
        tools = catalog(include_hidden=True)
        _AGENTS = load_agents(os.environ, tools=tools, policy=_policy(tools))
    return _AGENTS


def _policy(tools: Any) -> Any:
    """The policy file's roles to check permissions against; a policy that does not load is
    reported by every run's ``prepare_run`` (it refuses them all), so it is skipped here."""
    try:
        return load_policy(load_settings(os.environ).policy_file, tools)
    except (PolicyError, SettingsError):
        return None


def find_agent(name: str) -> tuple[Agent | None, str]:
    """The definition named ``name`` (``""``: the default), or ``None`` and why not."""
    agents = agent_definitions()
    hit = agents.get(name or DEFAULT_AGENT)
    if hit is None:
        return None, f"unknown agent {name!r} (this worker serves: {', '.join(sorted(agents)) or 'none'})"
    return hit[0], ""


def reset() -> None:
    """Forget the loaded definitions (tests that change ``KEEL_AGENT_PATH``)."""
    global _AGENTS
    _AGENTS = None
