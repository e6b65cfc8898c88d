"""Agent definitions as pure data: policy sections only tighten, tool selection by name and
tag, memory scopes, tiers only where the worker can serve them, one MCP config per server
name; and the gate's facts come from the tools' declarations (pre-declaration snapshots keep
their old facts so recorded runs replay)."""

from __future__ import annotations

import pytest
from keel.workflows.state import RunState

from keel.agent_io import RunContext
from keel.agents import Agent, AgentError, agent_tiers, load_agents, merged_policy, select_tools
from keel.gate import check_tool_call
from keel.models import StepRecord, StepState, ToolInfo
from keel.policy import parse_policy

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
