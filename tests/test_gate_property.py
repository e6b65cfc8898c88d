"""Arbitrary JSON arguments through the gate (issue 15, item 2), as a model, a prompt
injection or a buggy planner could write them: huge integers (``10**400``), lists and dicts
where strings go, NUL characters, non-finite floats.

Two levels. The pure level maps which inputs make ``keel.gate.check_tool_call`` raise
(those must be caught by the workflow) and shows that the ``keel.decisions`` helpers the
loop calls outside that guard never raise. The workflow level sends such arguments through a
real run (real Temporal, PostgreSQL, gate, ledger and tools; only the planner is scripted):
no exception escapes, and every run ends through the one exit — an outcome, an audit row for
the step's denial or failure, the run slot free, no hold left open, spend equal to the ledger.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client

from keel import decisions as d
from keel.activities.tools.loader import catalog
from keel.agent_io import PlanInput, PlanOutput
from keel.gate import GateDecision, check_tool_call
from keel.models import AgentResponse, Plan, PlanStep, StepState
from keel.policy import Policy, load_policy
from keel.settings import Settings
from tests.doubles import tools as testing
from tests.doubles.models import PlanCall, ScriptedPlanner
from tests.ending import assert_one_exit, history_counts
from tests.helpers import request, running_worker
from tests.scripted import start

HUGE = 10**400

# JSON as it can arrive in a plan: the workflow decodes it from an activity result, so no lone
# surrogates (the activity could not encode them) and nesting the decoder accepts.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([HUGE, -HUGE, 10**19, 2**63, -(2**63) - 1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 5e-324, 150.0, 10.0]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
    st.sampled_from(["\x00", "a\x00b", "alice@example.com", "x@evil.test", "ORD-1", "ls; rm -rf /", ""]),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=5, alphabet="abcto\x00"), inner, max_size=3),
    ),
    max_leaves=8,
)

POLICY = Path(__file__).resolve().parents[1] / "config" / "policy.yaml"
TOOL_ARGS = {
    "issue_refund": ("order_id", "amount_usd", "reason"),
    "send_email": ("to", "subject", "body"),
    "lookup_order": ("order_id",),
    "run_shell": ("command",),
}


def _args_for(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """The tool's own argument names (some missing) with arbitrary values, plus strays."""
    return st.fixed_dictionaries(
        {},
        optional={n: json_values for n in names},
    ).flatmap(
        lambda a: st.dictionaries(st.text(max_size=4), json_values, max_size=2).map(lambda x: {**x, **a})
    )


# ---------------------------------------------------------------- pure: which inputs raise
def _demo_policy() -> Policy:
    return load_policy(POLICY)


def _judge(policy: Policy, tool_name: str, args: dict[str, Any]) -> GateDecision | BaseException:
    tools = {t.name: t for t in catalog(include_hidden=True)}
    try:
        return check_tool_call(
            policy,
            "acme",
            "alice",
            (),
            tools.get(tool_name),
            args,
            {"order_customer": ["alice@example.com"], "order_ids": ["ORD-1"]},
        )
    except BaseException as e:  # the point is to see what escapes
        return e


@settings(max_examples=300, deadline=None, database=None)
@given(tool=st.sampled_from(sorted(TOOL_ARGS)), data=st.data())
def test_gate_returns_a_decision_or_raises_a_plain_exception(tool: str, data: st.DataObject) -> None:
    """The gate may raise on arguments it cannot judge — but only ordinary exceptions (which
    the workflow turns into a denied step), never anything that is not an ``Exception``, and
    the same input always gets the same answer (replay must reach the same decision)."""
    policy = _demo_policy()
    args = data.draw(_args_for(TOOL_ARGS[tool]))
    first, second = _judge(policy, tool, args), _judge(policy, tool, args)
    if isinstance(first, BaseException):
        assert isinstance(first, Exception), repr(first)
        assert type(first) is type(second)
    else:
        assert first == second


@pytest.mark.parametrize(
    ("tool", "args", "raises"),
    [
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": HUGE}, OverflowError),
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": -HUGE}, OverflowError),
        ("send_email", {"to": ["alice@example.com"], "subject": "s", "body": "b"}, TypeError),
        ("send_email", {"to": {"a": 1}, "subject": "s", "body": "b"}, TypeError),
        ("send_email", {"to": "alice@example.com", "subject": "s", "body": "b"}, None),
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": math.inf}, None),
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": "10"}, None),
        ("run_shell", {"command": ["ls"]}, None),
    ],
)
def test_which_inputs_make_the_gate_raise(tool: str, args: dict[str, Any], raises: type | None) -> None:
    """The map of what raises today (the workflow must catch these; see the run test below)."""
    out = _judge(_demo_policy(), tool, args)
    if raises is None:
        assert isinstance(out, GateDecision), repr(out)
    else:
        assert isinstance(out, raises), repr(out)


@settings(max_examples=300, deadline=None, database=None)
@given(
    args=st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    when=st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["step", "field", "equals", "not_equals"]), json_values)
    ),
    results=st.dictionaries(st.sampled_from(["s1", "s2"]), st.dictionaries(st.text(max_size=3), json_values)),
)
def test_decision_helpers_outside_the_guard_never_raise(
    args: dict[str, Any], when: dict[str, Any] | None, results: dict[str, dict[str, Any]]
) -> None:
    """The loop calls these outside the gate's try/except: an exception from them would end
    the run as an internal error instead of a denied step."""
    d.call_signature("issue_refund", args)
    d.step_summary("issue_refund", args)
    d.condition_holds(when, results)
    d.rule_score([str(v) for v in args])
    try:
        d.resolve_args(args, results)
    except d.ReferenceError_:
        pass


@settings(max_examples=300, deadline=None, database=None)
@given(args=st.dictionaries(st.text(max_size=5), json_values, max_size=4))
def test_the_finish_time_anomaly_canon_never_raises(args: dict[str, Any]) -> None:
    """``finish_run`` canonicalises every executed call's arguments for the anomaly flags: an
    exception there fails the run's ending itself (five attempts, then the workflow fails
    with no answer) — seen with ``10**400``, which ``float()`` cannot hold."""
    from keel.anomaly import canonical_call

    assert canonical_call("issue_refund", args) == canonical_call("issue_refund", dict(args))
    canonical_call("issue_refund", {"amount_usd": HUGE, "note": ["x", {"n": -HUGE}]})


# ---------------------------------------------------------------- through the workflow
_PROPERTY_POLICY = f"""version: "2026-11-01.1"
roles:
  tester: [{testing.TEST_PERMISSION}, orders:read, inventory:read, refunds:write, email:send]
tenants:
  acme:
    users:
      alice: [tester]
tools:
  issue_refund:
    constraints:
      - {{name: refund-positive, arg: amount_usd, min: 0.01}}
      - {{name: refund-hard-limit, arg: amount_usd, max: 500}}
    approvals:
      - name: refund-over-100
        when: {{arg: amount_usd, gt: 100}}
        timeout_seconds: 1
        on_timeout: reject
  send_email:
    constraints:
      - name: email-recipient
        arg: to
        any_of:
          - {{one_of_ref: order_customer}}
          - {{domain_in: [example.com]}}
      - {{name: email-subject-length, arg: subject, max_length: 200}}
limits:
  max_iterations: 2
  max_tool_calls: 12
  deadline_seconds: 60
  thrash_repeats: 3
  max_consecutive_failures: 3
  min_confidence: 0.0
"""


class _Plans:
    """The scripted planner's plans, per workflow id: iteration 1 gets the test's plan, the
    second look answers directly."""

    def __init__(self) -> None:
        self.by_run: dict[str, Plan] = {}

    def __call__(self, inp: PlanCall) -> Plan:
        return self.by_run.get(inp.workflow_id, Plan()) if inp.iteration == 1 else Plan(answer="done")


@pytest.fixture(scope="module")
async def property_worker(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, _Plans]]:
    policy = tmp_path_factory.mktemp("gate-property") / "policy.yaml"
    policy.write_text(_PROPERTY_POLICY)
    mp = pytest.MonkeyPatch()
    mp.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    testing.register()
    plans = _Plans()
    planner = ScriptedPlanner(plans)
    queue = f"gate-prop-{uuid.uuid4()}"
    try:
        async with (
            planner.serving(),
            running_worker(
                client,
                db_pool,
                temporal_services,
                queue,
                policy_file=policy,
            ),
        ):
            yield queue, plans
    finally:
        mp.undo()


async def _one_run(
    client: Client, pool: AsyncConnectionPool, queue: str, plans: _Plans, tool: str, args: dict[str, Any]
) -> str:
    # Hypothesis seeds the global ``random`` (make_order's id source): ids from uuid instead.
    order = f"ORD-{uuid.uuid4().int % 10**12:012d}"
    async with pool.connection() as conn:
        await conn.execute(
            "insert into orders (id, tenant, customer_email, status, item_sku, total_micros) "
            "values (%s, 'acme', 'alice@example.com', 'shipped', 'SKU-KEEL-1', 50000000)",
            (order,),
        )
    req = request(f"property run on {order}")
    wid = f"agent/{req.tenant}/{req.request_id}"
    plans.by_run[wid] = Plan(
        steps=(
            PlanStep(id="s1", tool="lookup_order", args={"order_id": order}),
            PlanStep(id="s2", tool="test_effect", args={"note": "before"}),
            PlanStep(id="s3", tool=tool, args=args),
        )
    )
    handle = await start(client, queue, req)
    try:
        resp: AgentResponse = await asyncio.wait_for(handle.result(), timeout=45)
    except TimeoutError:
        counts = await history_counts(handle)
        await handle.terminate("property test: the run did not end")
        raise AssertionError(f"{tool} {args!r}: the run did not end; history {counts}") from None
    assert "internal_error" not in resp.flags and "cleanup_failed" not in resp.flags, (args, resp.reason)
    s3 = next((s for s in resp.steps if s.id == "s3"), None)
    if s3 is None:
        # The real plan activity's check (intent rules) refused the whole plan before any of
        # its steps ran (e.g. s3 names an order the request did not): a clean ending too,
        # and nothing may have run.
        assert "plan_refused" in resp.flags and resp.outcome == "needs_human", (args, resp)
        assert resp.message.startswith("Handed to a human"), resp.message
        assert not any(s.state == StepState.SUCCEEDED for s in resp.steps), resp.steps
        await assert_one_exit(pool, handle, resp)
        return f"plan_refused/{resp.outcome}"
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "select kind, decision from audit_log where workflow_id = %s and step_id = 's3'", (wid,)
            )
        ).fetchall()
    if s3.state == StepState.DENIED:
        assert ("permission", "deny") in rows or ("approval", "deny") in rows or ("budget", "deny") in rows, (
            rows
        )
        assert resp.outcome in ("denied", "rejected", "budget_exhausted"), resp.outcome
        assert resp.compensated == ("s2",), resp.compensated  # the earlier effect was undone
    elif s3.state == StepState.FAILED:
        assert ("tool", "failed") in rows, rows
    else:
        assert s3.state in (StepState.SUCCEEDED, StepState.COMPENSATED), s3
        assert ("permission", "allow") in rows, rows
    await assert_one_exit(pool, handle, resp)
    return f"{s3.state.value}/{resp.outcome}"


@pytest.mark.timeout(240)  # 25 whole runs, each planned by the real plan activity (metered)
async def test_arbitrary_arguments_through_the_workflow_end_through_the_one_exit(
    client: Client, db_pool: AsyncConnectionPool, property_worker: tuple[str, _Plans]
) -> None:
    queue, plans = property_worker
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(tool=st.sampled_from(["issue_refund", "send_email", "test_effect"]), data=st.data())
    def prop(tool: str, data: st.DataObject) -> None:
        names = TOOL_ARGS.get(tool, ("note", "undo_failures"))
        args = data.draw(_args_for(names))
        run = _one_run(client, db_pool, queue, plans, tool, args)
        seen.append(asyncio.run_coroutine_threadsafe(run, loop).result(60))

    # Hypothesis drives synchronous code: it runs in a thread, the runs on this test's loop.
    await asyncio.to_thread(prop)
    assert len(seen) >= 10
    print("s3 state/outcome:", dict(Counter(seen)))


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": HUGE}),
        ("send_email", {"to": ["alice@example.com"], "subject": "s", "body": "b"}),
        ("send_email", {"to": {"addr": "alice@example.com"}, "subject": "s", "body": "b"}),
        ("issue_refund", {"order_id": "ORD-1", "amount_usd": math.nan}),
        ("test_effect", {"note": "a\x00b"}),
        ("test_effect", {"note": "x", "undo_failures": HUGE}),
    ],
    ids=["refund-10**400", "to-list", "to-dict", "amount-nan", "note-nul", "undo-failures-huge"],
)
async def test_the_issues_wedging_inputs_end_through_the_one_exit(
    tool: str,
    args: dict[str, Any],
    client: Client,
    db_pool: AsyncConnectionPool,
    property_worker: tuple[str, _Plans],
) -> None:
    """The exact inputs the issue saw wedge a workflow (OverflowError, TypeError in the gate)."""
    queue, plans = property_worker
    await _one_run(client, db_pool, queue, plans, tool, args)


# ---------------------------------------------------------------- nesting the workflow cannot decode
def _nested(depth: int) -> Any:
    v: Any = "x"
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("depth", [33, 220, 5000])
def test_the_planner_refuses_arguments_nested_too_deep(depth: int) -> None:
    """A model's plan nested 200-250 levels deep encodes in the activity but cannot be decoded
    by the workflow: every workflow task of the run would fail, for ever. The plan activity
    refuses it (a repair, then InvalidPlan), so it never reaches the workflow."""
    from keel.activities.agent import MAX_ARG_DEPTH, _check_plan

    plan = {"steps": [{"id": "s1", "tool": "echo", "args": {"note": _nested(depth)}}], "answer": ""}
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_ARG_DEPTH} levels"):
        _check_plan(plan, "", {"echo"})
    ok = {"steps": [{"id": "s1", "tool": "echo", "args": {"note": _nested(MAX_ARG_DEPTH - 2)}}], "answer": ""}
    assert _check_plan(ok, "", {"echo"}).steps[0].id == "s1"


@pytest.mark.xfail(
    strict=True,
    reason="open: an activity result the workflow cannot decode (arguments nested ~200-250 "
    "deep; pydantic's JSON parser stops at 200) fails every workflow task of the run. The "
    "real planner now refuses such plans; any other activity returning such data still wedges",
)
async def test_an_undecodable_plan_from_a_planner_that_skips_validation_still_wedges(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real plan activity refuses such a plan, so "a planner that skips validation" is a
    # fake plan activity under the real name: the only way such data reaches the workflow.
    deep = Plan(steps=(PlanStep(id="s1", tool="echo", args={"note": _nested(220)}),))

    @activity.defn(name="plan")
    async def unvalidated_plan(inp: PlanInput) -> PlanOutput:
        return PlanOutput(plan=deep, model="offline")

    policy = tmp_path / "policy.yaml"
    policy.write_text(_PROPERTY_POLICY)
    monkeypatch.setenv("KEEL_TOOL_MODULES", testing.MODULE)
    queue = f"gate-deep-{uuid.uuid4()}"
    req = request("deep")
    async with running_worker(
        client, db_pool, temporal_services, queue, policy_file=policy, extra_activities=[unvalidated_plan]
    ):
        await _wedges(client, queue, req)


async def _wedges(client: Client, queue: str, req: Any) -> None:
    handle = await start(client, queue, req)
    try:
        await asyncio.wait_for(handle.result(), timeout=8)
    except TimeoutError:
        counts = await history_counts(handle)
        await handle.terminate("test: wedged on an undecodable activity result")
        raise AssertionError(f"wedged: {counts}") from None
