"""OpenTelemetry: configuration from OTEL_* variables, one trace per run with no duplicate
spans under replay (max_cached_workflows=0), keel.* attributes, and Keel's metrics."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel import telemetry
from keel.activities import breaker
from keel.settings import Settings
from tests.helpers import make_order, request, run_agent, running_worker


@pytest.fixture
def meter() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry.use_meter_provider(provider)
    try:
        yield reader
    finally:
        telemetry._instruments = None
        provider.shutdown()


def _points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], float]]:
    data = reader.get_metrics_data()
    out: list[tuple[dict[str, Any], float]] = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:  # type: ignore[attr-defined]
                        out.append(
                            (dict(p.attributes or {}), getattr(p, "value", None) or getattr(p, "sum", 0))
                        )
    return out


def test_setup_reads_standard_variables() -> None:
    assert telemetry.setup_telemetry("t", {}, set_global=False) == (None, None)
    assert telemetry.setup_telemetry(
        "t", {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, set_global=False
    ) == (None, None)
    tp, mp = telemetry.setup_telemetry(
        "t", {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "keel-x"}, set_global=False
    )
    assert isinstance(tp, TracerProvider) and mp is None
    assert tp.resource.attributes["service.name"] == "keel-x"
    tp2, mp2 = telemetry.setup_telemetry(
        "keel-worker",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_METRICS_EXPORTER": "none"},
        set_global=False,
    )
    assert isinstance(tp2, TracerProvider) and mp2 is None
    assert tp2.resource.attributes["service.name"] == "keel-worker"
    telemetry.shutdown_telemetry(tp, mp)
    tp2.shutdown()  # nothing to flush; the endpoint is never contacted


def test_tenant_of_and_annotate_without_tracing() -> None:
    assert telemetry.tenant_of("agent/acme/r-1") == "acme"
    assert telemetry.tenant_of("agent/acme/r/with/slashes") == "acme"
    assert telemetry.tenant_of("rate-probe-1") == ""
    telemetry.annotate(tenant="acme", nothing=None)  # no current span: a no-op


async def test_one_trace_per_run_without_duplicates_under_replay(
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
    meter: InMemoryMetricReader,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = telemetry.with_tracing(client, provider)
    order = await make_order(db_pool, total_usd=12.5)
    req = request(
        f"Check if order {order} is shipped and refund it if so", session=f"s-{uuid.uuid4().hex[:8]}"
    )  # own memory: other tests' runs stay out
    # running_worker defaults to max_cached_workflows=0: every workflow task replays the run
    # from its history, which is exactly when a naive tracer would emit spans again.
    async with running_worker(traced, db_pool, temporal_services, task_queue):
        resp = await run_agent(traced, task_queue, req)
    assert resp.outcome == "completed", resp
    spans = [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("temporalWorkflowID") in (resp.workflow_id, None)
    ]
    assert len({s.context.trace_id for s in spans}) == 1, "one run, one trace"
    names = Counter(s.name for s in spans)
    assert names["StartWorkflow:AgentWorkflow"] == 1
    assert names["RunWorkflow:AgentWorkflow"] == 1
    assert names["CompleteWorkflow:AgentWorkflow"] == 1

    # Exactly one StartActivity span per activity the history scheduled (no replay copies).
    history = await traced.get_workflow_handle(resp.workflow_id).fetch_history()
    scheduled = Counter(
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )
    for activity_type, n in scheduled.items():
        local = 1 if activity_type == "run_tool" else 0  # the second tool: a local activity
        assert names[f"StartActivity:{activity_type}"] == n + local, (activity_type, names)
    # The demo's tools are quick and in-process: local activities (keel-23-local-tools) but
    # the first, an activity that ends the workflow task the run began in; each traced once.
    assert scheduled["run_tool"] == 1 and names["RunActivity:run_tool"] == 2, names
    # With the offline model the first plan is made inside the begin_local local activity
    # (patch keel-23-begin-local; begin_run otherwise), later ones in plan. Traced once.
    assert names["RunActivity:begin_local"] == 1 and names["RunActivity:begin_run"] == 0
    # Without a judge the rules' evaluation runs in the workflow (issue 23): a workflow span
    # with its verdict, once (not again on replay), where the evaluate activity's span was.
    (verdict,) = [s for s in spans if s.name == "Evaluate:rules"]
    assert (verdict.attributes or {})["keel.score"] == 1.0
    assert (verdict.attributes or {})["keel.confidence"] == 0.9
    # Local activities are traced too: the plan's admission holds its steps (model calls hold
    # their own budget inside the model activities, so the workflow reserves none itself).
    assert names["RunActivity:budget_admit"] >= 1

    tools = [s for s in spans if s.name == "RunActivity:run_tool"]
    attrs = {s.attributes["keel.tool"]: s.attributes for s in tools}  # type: ignore[index]
    assert set(attrs) == {"lookup_order", "issue_refund"}
    refund = attrs["issue_refund"]
    assert refund["keel.tenant"] == "acme" and refund["keel.user"] == "alice"
    assert refund["keel.cost_micros"] == 2000 and refund["keel.breaker_state"] == "closed"
    plan = next(s for s in spans if s.name == "RunActivity:begin_local").attributes or {}
    assert plan["keel.tenant"] == "acme" and plan["keel.model"] == "offline"

    # Every model call of the run is one GenAI "chat" span, a child of the activity that sent
    # it, in the run's trace (tests/providers/test_genai_telemetry.py: every role, live SDKs).
    everything = exporter.get_finished_spans()
    chats = [s for s in everything if s.name == "chat offline"]
    activities = {s.context.span_id: s.name for s in spans if s.name.startswith("RunActivity:")}
    assert chats and all(s.context.trace_id == spans[0].context.trace_id for s in chats)
    assert all(s.parent is not None and s.parent.span_id in activities for s in chats)
    # offline, only the planner is a model (the judge and the answer are deterministic)
    planners = {activities[s.parent.span_id] for s in chats if s.parent}
    assert "RunActivity:begin_local" in planners
    assert planners <= {"RunActivity:begin_local", "RunActivity:plan"}
    assert {str((s.attributes or {})["keel.role"]) for s in chats} == {"plan"}
    sent = [c for c in resp.calls if c.outcome == "ok"]
    assert len(sent) == len(resp.calls)  # offline: every call answered, none refused
    assert len(chats) == len(sent), "one span per request sent, no more, no fewer"
    assert sum(int((s.attributes or {})["keel.cost_micros"]) for s in chats) == sum(
        c.cost_micros for c in sent
    )
    for chat in chats:
        a = chat.attributes or {}
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "keel.offline"
        assert a["gen_ai.usage.input_tokens"] > 0 and a["keel.cost_micros"] > 0  # type: ignore[operator]
        assert a["keel.tenant"] == "acme"
    # the customer's request is in no span: content capture is off by default
    assert not [s.name for s in everything if "refund it if so" in s.to_json()]
    usage = _points(meter, "gen_ai.client.token.usage")
    assert {a["gen_ai.token.type"] for a, _ in usage} == {"input", "output"}

    calls = _points(meter, "keel.tool.calls")
    assert ({"tool": "issue_refund", "outcome": "ok", "tenant": "acme"}, 1) in calls
    assert ({"tenant": "acme", "kind": "tool", "tool": "issue_refund"}, 2000) in _points(meter, "keel.cost")
    models = _points(meter, "keel.model.calls")
    assert any(a["model"] == "offline" and a["outcome"] == "ok" for a, _ in models)
    telemetry.use_tracer_provider(None)  # with_tracing pointed the model spans at it
    provider.shutdown()


async def test_breaker_and_budget_metrics(
    db_pool: AsyncConnectionPool,
    meter: InMemoryMetricReader,
) -> None:
    scope = f"tool:m{uuid.uuid4().hex[:6]}"
    cfg = breaker.BreakerConfig(failure_threshold=1, cooldown_seconds=60)
    async with db_pool.connection() as conn:
        await breaker.record_failure(conn, scope, cfg, "w", "boom")
    assert ({"scope": scope, "from": "closed", "to": "open"}, 1) in _points(meter, "keel.breaker.transitions")
    assert ({"scope": scope}, 2) in _points(meter, "keel.breaker.state")
    telemetry.record_budget_decision("DENY", tenant="acme", kind="model")
    telemetry.record_cascade(tier="fast", cheapest=True, tenant="acme")
    telemetry.record_run(tenant="acme", outcome="completed", duration_s=1.5, iterations=2, tool_calls=3)
    assert ({"decision": "deny", "tenant": "acme", "kind": "model"}, 1) in _points(
        meter, "keel.budget.decisions"
    )
    assert ({"tier": "fast", "cheapest": True, "tenant": "acme"}, 1) in _points(meter, "keel.cascade.calls")
    assert _points(meter, "keel.run.duration") == [({"tenant": "acme", "outcome": "completed"}, 1.5)]
