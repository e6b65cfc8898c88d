"""Agent definitions as pure data: policy sections only tighten, tool selection by name and
tag, memory scopes, tiers only where the worker can serve them, one MCP config per server
name; and the gate's facts come from the tools' declarations (pre-declaration snapshots keep
their old facts so recorded runs replay)."""

from __future__ import annotations

import pytest

from keel.agent_io import RunContext
from keel.agents import Agent, AgentError, agent_tiers, load_agents, merged_policy, select_tools
from keel.gate import check_tool_call
from keel.models import StepRecord, StepState, ToolInfo
from keel.policy import ToolRule, parse_policy
from keel.workflows.state import RunState

POLICY = parse_policy(
    """version: "2026-12-01.1"
roles: {ops: [tickets:write]}
tenants: {acme: {users: {carol: [ops]}}}
tools:
  open_ticket:
    constraints:
      - {name: title-short, arg: title, max_length: 50}
limits: {max_iterations: 3}
"""
)
TICKET = ToolInfo(name="open_ticket", description="", permissions=("tickets:write",), tags=("tickets",))


def _agent(**kw: object) -> Agent:
    return Agent.model_validate({"name": "ops", "instructions": "x", **kw})


def test_a_policy_section_adds_rules_and_replaces_limits_only() -> None:
    agent = _agent(
        policy={
            "tools": {
                "open_ticket": {
                    "constraints": [{"name": "prio", "arg": "priority", "one_of": ["low", "high"]}],
                    "approvals": [{"name": "high", "when": {"arg": "priority", "equals": "high"}}],
                }
            },
            "limits": {"max_iterations": 1},
        }
    )
    merged = merged_policy(POLICY, agent)
    rule = merged.tools["open_ticket"]
    assert [c.name for c in rule.constraints] == ["title-short", "prio"]  # the file's rule stays
    assert merged.limits.max_iterations == 1 and POLICY.limits.max_iterations == 3

    def gate(**args: object):  # type: ignore[no-untyped-def]
        return check_tool_call(merged, "acme", "carol", (), TICKET, args)

    assert gate(title="x" * 60, priority="low").rule == "title-short"
    assert gate(title="ok", priority="urgent").rule == "prio"
    assert gate(title="ok", priority="high").needs_approval
    assert gate(title="ok", priority="low").allowed


TICKET_ARGS = TICKET.model_copy(
    update={"args_schema": {"properties": {"title": {"type": "string"}, "priority": {"type": "string"}}}}
)


@pytest.mark.parametrize(
    ("section", "says"),
    [
        (
            {"open_tiket": {"approvals": [{"name": "all"}]}},
            "policy.tools.open_tiket: unknown tool 'open_tiket'",
        ),
        (
            {"open_ticket": {"approvals": [{"name": "high", "when": {"arg": "prio", "equals": "high"}}]}},
            "policy.tools.open_ticket.approvals[0].when.arg: tool 'open_ticket' has no argument 'prio'",
        ),
        (
            {"open_ticket": {"constraints": [{"name": "c", "arg": "titel", "max_length": 5}]}},
            "policy.tools.open_ticket.constraints[0].arg: tool 'open_ticket' has no argument 'titel'",
        ),
        (
            {"open_ticket": {"permissions": ["tickets:admin"]}},
            "policy.tools.open_ticket.permissions[0]: no role grants 'tickets:admin' (roles: ops)",
        ),
        (
            {"open_ticket": {"approvals": [{"name": "a"}], "constraints": [{"name": "a", "arg": "title"}]}},
            "policy.tools.open_ticket: rule name 'a' used twice",
        ),
        ({"crm.create": {"approvals": [{"name": "all"}]}}, "unknown tool 'crm.create'"),
    ],
)
def test_an_agent_policy_naming_what_does_not_exist_is_refused_in_one_line(
    tmp_path, section: dict, says: str
) -> None:  # type: ignore[no-untyped-def]
    """Like the policy file: a misspelt tool, argument or permission in an agent's section
    would make its rule silently never apply, so the definition does not load."""
    path = tmp_path / "ops.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"name": "ops", "instructions": "x", "policy": {"tools": section}}))
    with pytest.raises(AgentError) as e:
        load_agents(
            {"KEEL_AGENT_PATH": str(path)}, builtin=tmp_path / "none", tools=(TICKET_ARGS,), policy=POLICY
        )
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(f"{path}: agent 'ops': ")


def test_a_valid_agent_section_loads_and_mcp_rules_need_the_agents_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    path = tmp_path / "ops.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "ops",
                "instructions": "x",
                "mcp": [{"name": "crm", "command": "true"}],
                "policy": {
                    "tools": {
                        "open_ticket": {
                            "permissions": ["tickets:write"],
                            "approvals": [{"name": "high", "when": {"arg": "priority", "equals": "high"}}],
                        },
                        "crm.create": {"approvals": [{"name": "all"}]},
                    }
                },
            }
        )
    )
    agents = load_agents(
        {"KEEL_AGENT_PATH": str(path)}, builtin=tmp_path / "none", tools=(TICKET_ARGS,), policy=POLICY
    )
    assert agents["ops"][0].policy.tools["crm.create"].approvals[0].name == "all"


def test_the_shipped_agents_load_against_the_shipped_catalogue_and_policy() -> None:
    from keel.activities.tools.loader import catalog
    from keel.policy import load_policy
    from keel.settings import PROJECT_ROOT

    tools = catalog(include_hidden=True)
    policy = load_policy(PROJECT_ROOT / "config" / "policy.yaml", tools)
    assert {"support", "operations"} <= set(load_agents({}, tools=tools, policy=policy))


def test_an_agent_section_keeps_the_files_cumulative_limits_and_untrusted_rule() -> None:
    """Naming a tool in an agent's section used to rebuild its rule from permissions,
    constraints and approvals only: the file's cumulative limits and ``on_untrusted`` fell
    away (fail open). They stay, and the stricter ``on_untrusted`` wins."""
    policy = parse_policy(
        """version: "2026-12-02.1"
roles: {ops: [tickets:write]}
tenants: {acme: {users: {carol: [ops]}}}
tools:
  open_ticket:
    on_untrusted: approve
    cumulative:
      - {name: tickets-per-run, arg: priority, per: run, max: 1}
"""
    )
    agent = _agent(policy={"tools": {"open_ticket": {"on_untrusted": "deny", "approvals": [{"name": "a"}]}}})
    rule = merged_policy(policy, agent).tools["open_ticket"]
    assert [c.name for c in rule.cumulative] == ["tickets-per-run"]
    assert rule.on_untrusted == "deny"
    loose = _agent(policy={"tools": {"open_ticket": {"on_untrusted": "approve"}}})
    strict = policy.model_copy(update={"tools": {"open_ticket": ToolRule(on_untrusted="deny")}})
    assert merged_policy(strict, loose).tools["open_ticket"].on_untrusted == "deny"


def test_tool_selection_memory_scope_and_tiers() -> None:
    tools = [("open_ticket", ("tickets",)), ("check_inventory", ("inventory",)), ("lookup_order", ())]
    assert select_tools(_agent(tools=["tag:tickets", "lookup_order"]), tools) == {
        "open_ticket",
        "lookup_order",
    }
    assert select_tools(_agent(), tools) == {"open_ticket", "check_inventory", "lookup_order"}
    assert select_tools(_agent(tools=[]), tools) == set()
    assert _agent().memory_session("s1") == "s1"
    assert _agent(memory="agent").memory_session("s1") == "ops:s1"
    assert _agent(memory="none").memory_session("s1") is None
    worker = dict.fromkeys(("fast", "balanced", "powerful"), "offline")
    agent = _agent(tiers={"fast": "openai:gpt-4o-mini", "powerful": "anthropic:claude-x"})
    assert agent_tiers(worker, agent, {}) == worker  # no keys: the worker's models serve
    assert agent_tiers(worker, agent, {"OPENAI_API_KEY": "k"})["fast"] == "openai:gpt-4o-mini"
    assert agent_tiers(worker, agent, {"OPENAI_API_KEY": "k"})["powerful"] == "offline"


def test_one_mcp_configuration_per_server_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.yaml").write_text("name: a1\ninstructions: x\nmcp: [{name: crm, command: crm-a}]\n")
    (tmp_path / "b.yaml").write_text("name: b1\ninstructions: x\nmcp: [{name: crm, command: crm-b}]\n")
    with pytest.raises(
        AgentError, match="MCP server 'crm' is configured differently by agents 'a1' and 'b1'"
    ):
        load_agents({"KEEL_AGENT_PATH": str(tmp_path)})
    (tmp_path / "b.yaml").write_text("name: b1\ninstructions: x\nmcp: [{name: crm, command: crm-a}]\n")
    assert {"a1", "b1"} <= set(load_agents({"KEEL_AGENT_PATH": str(tmp_path)}))


def _state(results: dict[str, tuple[str, dict[str, object]]]) -> RunState:
    st = RunState()
    for sid, (tool, data) in results.items():
        st.put(StepRecord(id=sid, tool=tool, state=StepState.SUCCEEDED))
        st.results[sid] = data
    return st


def test_gate_facts_come_from_tool_declarations() -> None:
    crm = ToolInfo(name="crm_contact", description="", facts={"email": "order_customer"})
    other = ToolInfo(name="lookup_order", description="", facts={})
    ctx = RunContext(authorized=True, all_tools=(crm, other))
    st = _state(
        {"s1": ("crm_contact", {"email": "a@x.io"}), "s2": ("lookup_order", {"customer_email": "b@y.io"})}
    )
    assert st.gate_context(ctx) == {"order_customer": ["a@x.io"]}  # nothing undeclared leaks in
    # A snapshot recorded before declarations (facts None): the old facts, so it replays alike.
    old = RunContext(authorized=True, all_tools=(ToolInfo(name="lookup_order", description=""),))
    st = _state({"s1": ("lookup_order", {"customer_email": "b@y.io", "order_id": "ORD-1"})})
    assert st.gate_context(old) == {"order_customer": ["b@y.io"], "order_ids": ["ORD-1"]}


def test_public_surface() -> None:
    import keel
    import keel.agents
    import keel.client

    assert keel.__all__ == ["Agent", "Client", "__version__"]
    assert keel.Client is keel.client.Client and keel.Agent is keel.agents.Agent
    for module in (keel.agents, keel.client):
        assert all(hasattr(module, name) for name in module.__all__), module
    assert issubclass(keel.client.RunExistsError, keel.client.KeelClientError)
    assert issubclass(keel.client.RefusedError, keel.client.KeelClientError)
    assert issubclass(keel.client.RunNotFoundError, keel.client.KeelClientError)
