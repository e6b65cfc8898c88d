"""OpenTelemetry GenAI conventions on every model call, through the real OpenAI and Anthropic
SDKs against the local fakes (and the offline model): one ``chat {model}`` span per request
with the ``gen_ai.*`` attributes, the two GenAI client histograms, the cost as
``keel.cost_micros``, and no prompt or completion text anywhere unless capture is turned on —
and then redacted."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import keel.activities.llm as llm
from keel import telemetry
from keel.models import ChatMessage, ModelCall, Usage
from keel.pricing import cost_micros
from keel.redact import redact
from keel.settings import KeelEnv, Settings, SettingsError
from tests.helpers import make_order, request, run_agent, running_worker
from tests.providers import fake_anthropic as fa
from tests.providers import fake_openai as fo
from tests.providers.fake_anthropic import FakeAnthropic
from tests.providers.fake_openai import FakeOpenAI
from tests.providers.sloppy import Roles, role_of, server_bill

SECRET = "AKIAIOSFODNN7EXAMPLE"  # an AWS access key id: keel.redact must catch it
PROMPT_MARK = "planted-prompt-marker-7f3a"
SYSTEM_MARK = "planted-system-marker-91c2"
ANSWER_MARK = "planted-answer-marker-d04e"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def chat_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith("chat ")]

    def points(self, name: str) -> list[tuple[dict[str, Any], int, float]]:
        """(attributes, count, sum) of each point of histogram ``name``."""
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        for p in metric.data.data_points:  # type: ignore[attr-defined]
                            out.append((dict(p.attributes or {}), p.count, p.sum))
        return out

    def everything(self) -> str:
        """Every span (names, attributes, events, status) and every metric point, as text."""
        data = self.reader.get_metrics_data()
        return "\n".join(
            [s.to_json() for s in self.spans.get_finished_spans()] + [data.to_json() if data else ""]
        )


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Telemetry]:
    monkeypatch.delenv("KEEL_GENAI_CAPTURE_CONTENT", raising=False)
    t = Telemetry()
    telemetry.use_tracer_provider(t.tracer_provider)
    telemetry.use_meter_provider(t.meter_provider)
    try:
        yield t
    finally:
        telemetry.use_tracer_provider(None)
        telemetry._instruments = None
        t.tracer_provider.shutdown()
        t.meter_provider.shutdown()


def _call(model: str, *, schema: bool = False, max_tokens: int = 300) -> ModelCall:
    return ModelCall(
        model=model,
        role="respond",
        system=f"You answer customers. {SYSTEM_MARK}",
        messages=(
            ChatMessage(role="user", content=f"{PROMPT_MARK}: my key is {SECRET}, where is order 42?"),
        ),
        output_schema=SCHEMA if schema else None,
        schema_name="answer",
        max_tokens=max_tokens,
    )


async def _send(call: ModelCall) -> Any:
    return await ActivityEnvironment().run(llm.call_model, call)


async def test_openai_call_is_one_chat_span_with_genai_attributes(
    fake_openai: fo.FakeOpenAI, otel: Telemetry
) -> None:
    fake_openai.push(
        fo.chat(
            f"Order 42 shipped. {ANSWER_MARK}", prompt_tokens=1200, completion_tokens=40, cached_tokens=1024
        )
    )
    result = await _send(_call("openai:gpt-4o-mini"))
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini" and span.kind == SpanKind.CLIENT
    assert span.status.status_code != StatusCode.ERROR
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"  # what the API answered
    assert a["gen_ai.response.id"] == "chatcmpl-fake"
    assert a["gen_ai.request.max_tokens"] == 300
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.output.type"] == "text"
    assert a["gen_ai.usage.input_tokens"] == 1200 and a["gen_ai.usage.output_tokens"] == 40
    assert a["gen_ai.usage.cache_read.input_tokens"] == 1024
    assert a["keel.cost_micros"] == cost_micros("openai:gpt-4o-mini", result.usage) == 128
    assert a["keel.role"] == "respond" and "error.type" not in a
    host, port = fake_openai.url.removeprefix("http://").split(":")
    assert (a["server.address"], a["server.port"]) == (host, int(port))

    tokens = otel.points("gen_ai.client.token.usage")
    by_type = {p[0]["gen_ai.token.type"]: p for p in tokens}
    assert set(by_type) == {"input", "output"}
    assert (by_type["input"][1], by_type["input"][2]) == (1, 1200)
    assert (by_type["output"][1], by_type["output"][2]) == (1, 40)
    for attrs, _, _ in tokens:
        assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
        assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    [(attrs, count, seconds)] = otel.points("gen_ai.client.operation.duration")
    assert count == 1 and 0 < seconds < 30 and "error.type" not in attrs
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"


async def test_anthropic_structured_call_reports_cache_and_finish_reason(
    fake_anthropic: fa.FakeAnthropic, otel: Telemetry
) -> None:
    fake_anthropic.push(
        fa.tool_use(
            "answer",
            {"answer": "shipped"},
            input_tokens=50,
            output_tokens=30,
            cache_read=900,
            cache_write=100,
        )
    )
    result = await _send(_call("anthropic:claude-haiku-4-5", schema=True, max_tokens=512))
    assert result.parsed == {"answer": "shipped"}
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    assert span.name == "chat claude-haiku-4-5" and span.kind == SpanKind.CLIENT
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.response.model"] == "claude-haiku-4-5-20251001"
    assert a["gen_ai.response.id"] == "msg_fake"
    assert a["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert a["gen_ai.request.max_tokens"] == 512 and a["gen_ai.output.type"] == "json"
    # the convention's input_tokens is the whole prompt, cache reads and writes included
    assert a["gen_ai.usage.input_tokens"] == 1050 and a["gen_ai.usage.output_tokens"] == 30
    assert a["gen_ai.usage.cache_read.input_tokens"] == 900
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 100
    usage = Usage(input_tokens=1050, cached_input_tokens=900, cache_write_tokens=100, output_tokens=30)
    assert a["keel.cost_micros"] == cost_micros("anthropic:claude-haiku-4-5", usage) > 0


async def test_a_failed_call_has_error_type_and_no_token_points(
    fake_openai: fo.FakeOpenAI, fake_anthropic: fa.FakeAnthropic, otel: Telemetry
) -> None:
    fake_openai.push(fo.error(503, "unavailable", type_="server_error"))
    fake_anthropic.push(fa.error(429, "rate_limit_error", "slow down", headers={"retry-after": "1"}))
    for model in ("openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"):
        with pytest.raises(ApplicationError):
            await _send(_call(model))
    spans = {s.attributes["gen_ai.provider.name"]: s for s in otel.chat_spans()}  # type: ignore[index]
    assert set(spans) == {"openai", "anthropic"}
    assert spans["openai"].attributes["error.type"] == "ProviderUnavailable"  # type: ignore[index]
    assert spans["anthropic"].attributes["error.type"] == "ProviderRateLimited"  # type: ignore[index]
    for span in spans.values():
        assert span.status.status_code == StatusCode.ERROR
        assert "gen_ai.usage.input_tokens" not in (span.attributes or {})
    assert otel.points("gen_ai.client.token.usage") == []
    durations = otel.points("gen_ai.client.operation.duration")
    assert sorted(p[0]["error.type"] for p in durations) == ["ProviderRateLimited", "ProviderUnavailable"]


async def test_a_billed_refusal_keeps_its_usage_and_cost(fake_openai: fo.FakeOpenAI, otel: Telemetry) -> None:
    fake_openai.push(fo.chat(None, refusal="I can't help with that.", prompt_tokens=300, completion_tokens=7))
    with pytest.raises(ApplicationError) as info:
        await _send(_call("openai:gpt-4o-mini"))
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    assert a["error.type"] == info.value.type and span.status.status_code == StatusCode.ERROR
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (300, 7)
    usage = Usage(input_tokens=300, output_tokens=7)
    assert a["keel.cost_micros"] == cost_micros("openai:gpt-4o-mini", usage) > 0
    assert sorted(p[2] for p in otel.points("gen_ai.client.token.usage")) == [7, 300]


async def test_a_reply_without_usage_claims_no_tokens_or_price(
    fake_openai: fo.FakeOpenAI, otel: Telemetry
) -> None:
    reply = fo.chat("ok")
    body = dict(reply.body)  # type: ignore[arg-type]
    del body["usage"]  # some OpenAI-compatible servers omit it
    fake_openai.push(dataclasses.replace(reply, body=body))
    await _send(_call("openai:gpt-4o-mini"))
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    assert a["keel.usage_known"] is False and "keel.cost_micros" not in a  # the ledger charges the hold
    assert not [k for k in a if k.startswith("gen_ai.usage.")]
    assert otel.points("gen_ai.client.token.usage") == []
    assert len(otel.points("gen_ai.client.operation.duration")) == 1


async def test_offline_calls_are_spans_too(otel: Telemetry) -> None:
    await _send(_call("offline"))
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    assert span.name == "chat offline" and span.kind == SpanKind.INTERNAL  # in-process model
    assert "server.address" not in a
    assert a["gen_ai.provider.name"] == "keel.offline" and a["gen_ai.request.model"] == "offline"
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] > 0 and a["keel.cost_micros"] > 0
    assert {p[0]["gen_ai.token.type"] for p in otel.points("gen_ai.client.token.usage")} == {
        "input",
        "output",
    }


async def test_no_prompt_or_completion_text_anywhere_by_default(
    fake_openai: fo.FakeOpenAI, fake_anthropic: fa.FakeAnthropic, otel: Telemetry
) -> None:
    fake_openai.push(fo.chat(f"{ANSWER_MARK} {SECRET}"))
    fake_anthropic.push(fa.text(f"{ANSWER_MARK} {SECRET}"))
    for model in ("openai:gpt-4o-mini", "anthropic:claude-haiku-4-5", "offline"):
        await _send(_call(model))
    assert len(otel.chat_spans()) == 3
    text = otel.everything()
    for planted in (SECRET, PROMPT_MARK, SYSTEM_MARK, ANSWER_MARK, "where is order 42"):
        assert planted not in text, planted
    assert "gen_ai.input.messages" not in text and "gen_ai.output.messages" not in text


async def test_captured_content_is_opt_in_and_redacted(
    fake_openai: fo.FakeOpenAI, otel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redact(SECRET) != SECRET
    monkeypatch.setenv("KEEL_GENAI_CAPTURE_CONTENT", "true")
    fake_openai.push(fo.chat(f"{ANSWER_MARK} and the key {SECRET}"))
    await _send(_call("openai:gpt-4o-mini"))
    [span] = otel.chat_spans()
    a = dict(span.attributes or {})
    system = json.loads(str(a["gen_ai.system_instructions"]))
    inputs = json.loads(str(a["gen_ai.input.messages"]))
    outputs = json.loads(str(a["gen_ai.output.messages"]))
    assert SYSTEM_MARK in system[0]["content"]
    assert inputs[0]["role"] == "user" and PROMPT_MARK in inputs[0]["parts"][0]["content"]
    assert outputs[0]["role"] == "assistant" and ANSWER_MARK in outputs[0]["parts"][0]["content"]
    assert outputs[0]["finish_reason"] == "stop"
    assert "[REDACTED:" in inputs[0]["parts"][0]["content"] + outputs[0]["parts"][0]["content"]
    assert SECRET not in otel.everything()  # captured, and still no secret in any span or metric


def test_capture_setting_is_validated_by_keel_env() -> None:
    assert KeelEnv.from_env({}).KEEL_GENAI_CAPTURE_CONTENT is False
    assert KeelEnv.from_env({"KEEL_GENAI_CAPTURE_CONTENT": "true"}).KEEL_GENAI_CAPTURE_CONTENT is True
    with pytest.raises(SettingsError, match="KEEL_GENAI_CAPTURE_CONTENT"):
        KeelEnv.from_env({"KEEL_GENAI_CAPTURE_CONTENT": "perhaps"})
    assert telemetry.capture_content({"KEEL_GENAI_CAPTURE_CONTENT": "perhaps"}) is False
    assert telemetry.capture_content({"KEEL_GENAI_CAPTURE_CONTENT": "1"}) is True
    assert telemetry.capture_content({}) is False


async def test_every_model_call_of_a_run_is_a_chat_span_priced_as_the_ledger(
    otel: Telemetry,
    monkeypatch: pytest.MonkeyPatch,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    """A whole run on the OpenAI SDK (fake server): the plan, its repair, the judge and the
    answer are each one span under the activity that sent it, with the role, and the spans'
    keel.cost_micros add up to what the server billed and the ledger committed."""
    roles = Roles()
    server = FakeOpenAI(responder=roles).start()
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    async with db_pool.connection() as conn:
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
    try:
        order = await make_order(db_pool)
        step = {"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"}
        roles.plans.extend([{"plan": {"steps": [step], "answer": ""}}, {"steps": [step], "answer": ""}])
        roles.answers.append(f"Order {order} is shipped.")
        traced = telemetry.with_tracing(client, otel.tracer_provider)
        text = f"{PROMPT_MARK} where is order {order}?"
        async with running_worker(traced, db_pool, temporal_services, task_queue):
            resp = await run_agent(traced, task_queue, request(text))
    finally:
        server.stop()
    assert resp.outcome == "completed", resp.reason
    assert [role_of(r) for r, _ in server.answered] == ["plan", "plan", "eval", "answer"]

    spans = otel.spans.get_finished_spans()
    chats = sorted(otel.chat_spans(), key=lambda s: s.start_time or 0)
    parents = {s.context.span_id: s.name for s in spans if s.name.startswith("RunActivity:")}
    assert [str((s.attributes or {})["keel.role"]) for s in chats] == ["plan", "plan", "evaluate", "respond"]
    assert [parents[s.parent.span_id] for s in chats if s.parent] == [
        "RunActivity:begin_run",  # the first plan and its repair (keel-23-begin-run)
        "RunActivity:begin_run",
        "RunActivity:evaluate",
        "RunActivity:finish_run",  # the answer is written where the run is finished
    ]
    assert len({s.context.trace_id for s in chats}) == 1
    for chat in chats:
        a = chat.attributes or {}
        assert chat.name == "chat gpt-4o-mini" and a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18" and a["keel.tenant"] == "acme"
    answered, _, costs = server_bill([(server, "openai")])
    assert answered == len(chats)
    spent = sum(int((s.attributes or {})["keel.cost_micros"]) for s in chats)
    assert spent == sum(costs) == sum(resp.spend.by_model.values())
    by_type = {}
    for attrs, count, _ in otel.points("gen_ai.client.token.usage"):
        by_type[attrs["gen_ai.token.type"]] = by_type.get(attrs["gen_ai.token.type"], 0) + count
    assert by_type == {"input": 4, "output": 4}
    assert sum(p[1] for p in otel.points("gen_ai.client.operation.duration")) == 4
    assert PROMPT_MARK not in otel.everything()  # the request text is in no span or metric


async def test_an_escalated_run_on_anthropic_has_a_span_per_request_on_each_tier(
    otel: Telemetry,
    monkeypatch: pytest.MonkeyPatch,
    client: Client,
    db_pool: AsyncConnectionPool,
    temporal_services: Settings,
    task_queue: str,
) -> None:
    """The cheap tier's plan is refused by the rules and the run escalates: each request the
    Anthropic server answered (cheap plan, escalated plan, judges, answer) is one span, in
    order, naming the model it went to and its role, priced as the server billed."""
    roles = Roles(anthropic=True)
    server = FakeAnthropic(responder=roles).start()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key-00000000")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    async with db_pool.connection() as conn:
        await conn.execute("delete from circuit_breakers where scope like 'model:%%'")
    try:
        order = await make_order(db_pool, status="shipped", total_usd=30.0)
        lookup = {"id": "s1", "tool": "lookup_order", "args": {"order_id": order}, "why": "status"}
        refund = {
            "id": "s2",
            "tool": "issue_refund",
            "args": {"order_id": order, "amount_usd": "${s1.refundable_usd}", "reason": "asked"},
            "when": {"step": "s1", "field": "shipped", "equals": True},
        }
        unconditional = {**refund, "id": "s1", "args": {**refund["args"], "amount_usd": 30.0}, "when": None}
        roles.plans.extend(
            [{"steps": [unconditional], "answer": ""}, {"steps": [lookup, refund], "answer": ""}]
        )
        roles.answers.append(f"Order {order} had shipped, so I refunded $30.0.")
        traced = telemetry.with_tracing(client, otel.tracer_provider)
        req = request(f"Check if order {order} is shipped and refund it if so", session=f"s-{order}")
        async with running_worker(traced, db_pool, temporal_services, task_queue):
            resp = await run_agent(traced, task_queue, req)
    finally:
        server.stop()
    assert resp.outcome == "completed", resp.reason
    assert "escalated_to_balanced" in resp.flags

    chats = sorted(otel.chat_spans(), key=lambda s: s.start_time or 0)
    sent = [(r.body["model"], role_of(r)) for r, _ in server.answered]
    as_role = {"plan": "plan", "check": "evaluate", "eval": "evaluate", "answer": "respond"}
    assert [
        (str((s.attributes or {})["gen_ai.request.model"]), str((s.attributes or {})["keel.role"]))
        for s in chats
    ] == [(model, as_role[role]) for model, role in sent]
    plans = [m for m, role in sent if role == "plan"]
    assert plans == ["claude-haiku-4-5", "claude-sonnet-4-5"]  # the escalation is its own span
    assert all(str((s.attributes or {})["gen_ai.provider.name"]) == "anthropic" for s in chats)
    answered, _, costs = server_bill([(server, "anthropic")])
    spent = sum(int((s.attributes or {})["keel.cost_micros"]) for s in chats)
    assert answered == len(chats) and spent == sum(costs) == sum(resp.spend.by_model.values())
