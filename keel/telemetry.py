"""OpenTelemetry for Keel: providers from the standard ``OTEL_*`` variables, Temporal's
tracing interceptor, and the few metrics an operator of a multi-tenant agent fleet needs.

Traces: ``temporalio.contrib.opentelemetry.TracingInterceptor`` on the client (starter and
worker) gives one trace per run — ``StartWorkflow`` from the CLI, ``RunWorkflow``, one
``StartActivity``/``RunActivity`` pair per plan, tool, judge evaluation, budget/gate local
activity and compensation; an evaluation by the rules alone runs in the workflow and is an
``Evaluate:rules`` span with its score. Workflow-side spans are emitted only when not
replaying, so a worker that rebuilds a run from history (cache eviction, another worker
taking over) emits no duplicates. Activities add ``keel.*`` attributes to their ``RunActivity`` span with
:func:`annotate`.

Model calls follow OpenTelemetry's GenAI semantic conventions (the latest experimental
version, ``gen_ai.provider.name`` rather than the deprecated ``gen_ai.system``): every request
sent to a provider — plan, judge, answer, repair, escalation, any provider, offline included —
is one ``chat {model}`` span (:func:`model_call`) with the ``gen_ai.*`` request, response and
usage attributes, ``error.type`` on failure, and Keel's own ``keel.cost_micros``, ``keel.role``,
``keel.tenant``; and feeds the two GenAI client histograms ``gen_ai.client.token.usage`` (by
``gen_ai.token.type``) and ``gen_ai.client.operation.duration`` (seconds). Prompts and
completions are not recorded unless ``KEEL_GENAI_CAPTURE_CONTENT=true`` (``keel.settings``),
and even then only after :func:`keel.redact.redact`.

Metrics: call the ``record_*`` helpers from activities; they are no-ops until a meter
provider is installed (:func:`setup_telemetry` or :func:`use_meter_provider` in tests).

Configuration (standard OpenTelemetry variables, nothing Keel-specific):

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` set → traces and metrics go there over OTLP/HTTP
  (``http://collector:4318``); ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` =
  ``otlp`` | ``console`` | ``none`` override per signal; ``OTEL_SDK_DISABLED=true`` turns it
  all off; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the process.
* nothing set → no providers, no interceptor, no cost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from keel.redact import redact
from keel.settings import KeelEnv, SettingsError

__all__ = [
    "BREAKER_STATE_VALUE",
    "GENAI_PROVIDER",
    "ModelCallSpan",
    "annotate",
    "capture_content",
    "model_call",
    "model_response",
    "record_breaker_transition",
    "record_budget_decision",
    "record_cascade",
    "record_cost",
    "record_flags",
    "record_model_call",
    "record_run",
    "record_tool_call",
    "setup_telemetry",
    "shutdown_telemetry",
    "tenant_of",
    "tracing_interceptor",
    "use_meter_provider",
    "use_tracer_provider",
    "with_tracing",
]

log = logging.getLogger(__name__)

BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}
"""``keel.breaker.state`` gauge values (alert on ``> 0``)."""


# ---------------------------------------------------------------------------- providers
def setup_telemetry(
    service_name: str, env: Mapping[str, str] | None = None, *, set_global: bool = True
) -> tuple[Any, Any]:
    """Build tracer and meter providers as the ``OTEL_*`` variables ask.

    Returns ``(tracer_provider, meter_provider)``; either is ``None`` when its signal is
    off. Pass the tracer provider to :func:`with_tracing` to trace Temporal calls. With
    ``set_global`` (once per process) they also become OpenTelemetry's global providers and
    Keel's metrics flow through the meter provider.
    """
    e = os.environ if env is None else env
    if (e.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return None, None
    traces = _choice(e, "OTEL_TRACES_EXPORTER")
    metric = _choice(e, "OTEL_METRICS_EXPORTER")
    if traces is None and metric is None:
        return None, None
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": e.get("OTEL_SERVICE_NAME") or service_name})
    tp = mp = None
    if traces is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        tp = TracerProvider(resource=resource)
        if traces == "console":
            tp.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            tp.add_span_processor(BatchSpanProcessor(_otlp("trace")))
        if set_global:
            trace.set_tracer_provider(tp)
    if metric is not None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )

        exporter = ConsoleMetricExporter() if metric == "console" else _otlp("metric")
        mp = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)])
        if set_global:
            metrics.set_meter_provider(mp)
            use_meter_provider(mp)
    return tp, mp


def shutdown_telemetry(tracer_provider: Any, meter_provider: Any) -> None:
    """Flush and stop what :func:`setup_telemetry` started (safe with ``None``)."""
    for provider in (tracer_provider, meter_provider):
        if provider is not None:
            try:
                provider.shutdown()
            except Exception as e:  # exporting must never break shutdown
                log.warning("telemetry shutdown: %s", e)


def tracing_interceptor(tracer_provider: Any = None) -> Any:
    """Temporal's stable tracing interceptor, on ``tracer_provider`` (default: global)."""
    from temporalio.contrib.opentelemetry import TracingInterceptor

    provider = tracer_provider or trace.get_tracer_provider()
    if tracer_provider is not None:
        use_tracer_provider(tracer_provider)  # model-call spans join the same traces
    return TracingInterceptor(provider.get_tracer("keel"))


_tracer: Any = None


def use_tracer_provider(tracer_provider: Any) -> None:
    """Emit Keel's own spans (``chat {model}``) through ``tracer_provider`` rather than the
    global one (``None``: back to the global; tests pass one with an in-memory exporter)."""
    global _tracer
    _tracer = tracer_provider.get_tracer("keel") if tracer_provider is not None else None


def with_tracing(client: Any, tracer_provider: Any = None) -> Any:
    """A copy of ``client`` whose calls — and workers built on it — are traced."""
    from temporalio.client import Client

    config = client.config()
    config["interceptors"] = [*config.get("interceptors", ()), tracing_interceptor(tracer_provider)]
    return Client(**config)


def _choice(env: Mapping[str, str], var: str) -> str | None:
    raw = (env.get(var) or "").strip().lower().split(",")[0].strip()
    if not raw:
        return "otlp" if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else None
    if raw in ("console", "otlp"):
        return raw
    if raw != "none":
        log.warning("%s=%s is not supported by Keel (otlp, console, none); ignoring", var, raw)
    return None


def _otlp(signal: str) -> Any:
    """OTLP/HTTP exporter; the SDK reads endpoint, headers and timeouts from ``OTEL_*``."""
    try:
        if signal == "trace":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    except ImportError as e:
        raise RuntimeError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not "
            "installed: pip install opentelemetry-exporter-otlp-proto-http"
        ) from e


# ---------------------------------------------------------------------------- spans
def annotate(**attrs: Any) -> None:
    """Set ``keel.<name>`` attributes on the current span (no-op without tracing).

    ``None`` and empty strings are skipped; other values must be str, bool, int or float.
    """
    span = trace.get_current_span()
    if not span.is_recording():
        return
    for name, value in attrs.items():
        if value is None or value == "":
            continue
        span.set_attribute(
            f"keel.{name}", value if isinstance(value, str | bool | int | float) else str(value)
        )


def tenant_of(workflow_id: str) -> str:
    """The tenant of a Keel run id ``agent/<tenant>/<request>`` (``""`` for other ids)."""
    parts = workflow_id.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "agent" else ""


# ---------------------------------------------------------------------------- metrics
COUNT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30, 50, 100)
"""Histogram boundaries for per-run counts (iterations, tool calls)."""
TOKEN_BUCKETS = tuple(4**n for n in range(14))
"""``gen_ai.client.token.usage`` boundaries the convention advises: 1, 4, 16, ... 67108864."""
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""``gen_ai.client.operation.duration`` boundaries the convention advises (seconds)."""


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.cost = meter.create_counter(
            "keel.cost", unit="uUSD", description="Spend in micro-USD by tenant/kind/model/tool"
        )
        self.budget = meter.create_counter("keel.budget.decisions", description="Budget decisions by outcome")
        self.model_calls = meter.create_counter(
            "keel.model.calls", description="Model calls by provider/model/outcome"
        )
        # The GenAI client metrics, with the conventions' advisory bucket boundaries.
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.cascade = meter.create_counter(
            "keel.cascade.calls",
            description="Planner calls by tier; cheapest=true / all is the cascade hit rate",
        )
        self.tool_calls = meter.create_counter("keel.tool.calls", description="Tool calls by outcome")
        self.tool_errors = meter.create_counter("keel.tool.errors", description="Tool failures by error type")
        self.breaker_transitions = meter.create_counter(
            "keel.breaker.transitions", description="Circuit-breaker state changes"
        )
        self.breaker_state = meter.create_gauge(
            "keel.breaker.state", description="0 closed, 1 half-open, 2 open (last transition)"
        )
        self.runs = meter.create_counter("keel.runs", description="Finished runs by outcome")
        self.run_duration = meter.create_histogram(
            "keel.run.duration", unit="s", description="Wall-clock duration of runs"
        )
        # Small-count buckets: the SDK's default (0, 5, 10, 25, ...) would put every loop
        # length of 1-5 in one bucket, and the loop-length alert's p95 could not see them.
        self.run_iterations = meter.create_histogram(
            "keel.run.iterations",
            unit="{iteration}",
            description="Plan/act loop length",
            explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
        )
        self.run_tool_calls = meter.create_histogram(
            "keel.run.tool_calls",
            unit="{call}",
            description="Tool calls per run",
            explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
        )
        self.run_flags = meter.create_counter(
            "keel.run.flags", description="Runs flagged by run-shape anomaly (keel.anomaly), by flag"
        )


_instruments: _Instruments | None = None


def use_meter_provider(meter_provider: Any) -> None:
    """Emit Keel's metrics through ``meter_provider`` (tests pass an in-memory one)."""
    global _instruments
    _instruments = _Instruments(meter_provider.get_meter("keel"))


def _m() -> _Instruments:
    global _instruments
    if _instruments is None:  # the global proxy meter binds to a provider installed later
        _instruments = _Instruments(metrics.get_meter("keel"))
    return _instruments


def _attrs(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None and v != ""}


def record_cost(micros: int, *, tenant: str, kind: str, model: str = "", tool: str = "") -> None:
    """Spend actually incurred (``kind`` = ``model`` | ``tool``), in micro-USD."""
    if micros > 0:
        _m().cost.add(micros, _attrs(tenant=tenant, kind=kind, model=model, tool=tool))


def record_budget_decision(decision: str, *, tenant: str = "", kind: str = "") -> None:
    """One ledger decision: ``allow`` | ``allow_with_caps`` | ``deny`` (and dry-run ones)."""
    _m().budget.add(1, _attrs(decision=decision.lower(), tenant=tenant, kind=kind))


def record_model_call(*, model: str, provider: str, outcome: str, tenant: str = "") -> None:
    """One provider call: ``outcome`` is ``ok``, an error type, or ``circuit_open`` (a call the
    breaker refused, which has no ``chat`` span: nothing was sent)."""
    _m().model_calls.add(1, _attrs(model=model, provider=provider, outcome=outcome, tenant=tenant))


def record_cascade(*, tier: str, cheapest: bool, tenant: str = "") -> None:
    """One planner call on ``tier``: the inputs of the cascade hit rate."""
    _m().cascade.add(1, _attrs(tier=tier, cheapest=cheapest, tenant=tenant))


def record_tool_call(tool: str, outcome: str, *, tenant: str = "", error_type: str = "") -> None:
    """One ``run_tool`` attempt: ``ok`` | ``replayed`` | ``error`` | ``circuit_open``."""
    m = _m()
    m.tool_calls.add(1, _attrs(tool=tool, outcome=outcome, tenant=tenant))
    if outcome in ("error", "circuit_open"):
        m.tool_errors.add(1, _attrs(tool=tool, error_type=error_type or outcome, tenant=tenant))


def record_breaker_transition(scope: str, from_state: str, to_state: str) -> None:
    m = _m()
    m.breaker_transitions.add(1, {"scope": scope, "from": from_state, "to": to_state})
    m.breaker_state.set(BREAKER_STATE_VALUE.get(to_state, 0), {"scope": scope})


def record_run(
    *, tenant: str, outcome: str, duration_s: float | None, iterations: int, tool_calls: int
) -> None:
    """A finished run (call once, from ``finish_run``)."""
    m = _m()
    a = _attrs(tenant=tenant, outcome=outcome)
    m.runs.add(1, a)
    if duration_s is not None:
        m.run_duration.record(duration_s, a)
    m.run_iterations.record(iterations, a)
    m.run_tool_calls.record(tool_calls, a)


def record_flags(flags: list[str] | tuple[str, ...], *, tenant: str = "") -> None:
    """Anomaly flags of one finished run (``cost_spike``, ``long_loop``, ...), one count each."""
    m = _m()
    for flag in flags:
        m.run_flags.add(1, _attrs(flag=flag, tenant=tenant))


# ---------------------------------------------------------------------------- GenAI model calls
GENAI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "offline": "keel.offline"}
"""``gen_ai.provider.name`` by Keel provider prefix (the offline model is Keel's own)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_capture_cache: dict[str, bool] = {}


def capture_content(env: Mapping[str, str] | None = None) -> bool:
    """Whether model spans carry (redacted) prompts and completions:
    ``KEEL_GENAI_CAPTURE_CONTENT``, validated by :class:`keel.settings.KeelEnv` (off by default;
    an invalid value is refused when the worker starts and reads as off here)."""
    raw = ((os.environ if env is None else env).get("KEEL_GENAI_CAPTURE_CONTENT") or "").strip()
    hit = _capture_cache.get(raw)
    if hit is None:
        try:
            hit = KeelEnv.from_env({"KEEL_GENAI_CAPTURE_CONTENT": raw}).KEEL_GENAI_CAPTURE_CONTENT
        except SettingsError:
            hit = False
        _capture_cache[raw] = hit
    return hit


class ModelCallSpan:
    """The ``chat`` span of one provider request and the facts its metrics need.

    Made by :func:`model_call`; the provider reports what the API answered with
    :func:`model_response`, the caller the outcome with :meth:`succeeded` (or the context
    manager records the failure).
    """

    def __init__(self, span: Any, metric_attrs: dict[str, Any], capture: bool) -> None:
        self.span, self.capture = span, capture
        self._metric_attrs = metric_attrs
        self.response_model = ""
        self.response_id = ""
        self.finish_reasons: tuple[str, ...] = ()
        self._usage_recorded = False

    def _set(self, name: str, value: Any) -> None:
        if value is not None and value != "" and value != ():
            self.span.set_attribute(name, value)

    def response(self, *, model: str = "", response_id: str = "", finish_reasons: Sequence[str] = ()) -> None:
        self.response_model = model or self.response_model
        self.response_id = response_id or self.response_id
        self.finish_reasons = tuple(r for r in finish_reasons if r) or self.finish_reasons

    def usage(self, usage: Any, *, cost_micros: int | None = None) -> None:
        """Token counts (a ``keel.models.Usage``) on the span and the token histogram."""
        if usage is None or self._usage_recorded:
            return
        self._usage_recorded = True
        self._set("gen_ai.usage.input_tokens", usage.input_tokens)
        self._set("gen_ai.usage.output_tokens", usage.output_tokens)
        if usage.cached_input_tokens:
            self._set("gen_ai.usage.cache_read.input_tokens", usage.cached_input_tokens)
        if usage.cache_write_tokens:
            self._set("gen_ai.usage.cache_creation.input_tokens", usage.cache_write_tokens)
        if cost_micros is not None:
            self.span.set_attribute("keel.cost_micros", cost_micros)
        attrs = self._attrs()
        hist = _m().token_usage
        hist.record(usage.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        hist.record(usage.output_tokens, {**attrs, "gen_ai.token.type": "output"})

    def succeeded(self, result: Any, *, cost_micros: int) -> None:
        """A ``keel.models.ModelResult`` came back: response attributes, usage, cost, content."""
        if not self.finish_reasons:
            self.finish_reasons = ("length" if result.truncated else "stop",)
        if not self.response_model:
            self.response_model = (result.model or "").split(":", 1)[-1]
        if result.usage_known:
            self.usage(result.usage, cost_micros=cost_micros)
        else:  # no usage, no price: the ledger charges the call's whole hold (keel.activities.metered)
            self.span.set_attribute("keel.usage_known", False)
        if self.capture and self.span.is_recording():
            message = {
                "role": "assistant",
                "parts": [{"type": "text", "content": redact(result.text or "")}],
                "finish_reason": self.finish_reasons[0],
            }
            self.span.set_attribute("gen_ai.output.messages", json.dumps([message]))

    def _attrs(self) -> dict[str, Any]:
        out = dict(self._metric_attrs)
        if self.response_model:
            out["gen_ai.response.model"] = self.response_model
        return out

    def _finish(self, error_type: str, seconds: float) -> None:
        self._set("gen_ai.response.model", self.response_model)
        self._set("gen_ai.response.id", self.response_id)
        self._set("gen_ai.response.finish_reasons", self.finish_reasons)
        attrs = self._attrs()
        if error_type:
            attrs["error.type"] = error_type
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(Status(StatusCode.ERROR, error_type))
        _m().operation_duration.record(seconds, attrs)


_current_call: ContextVar[ModelCallSpan | None] = ContextVar("keel_model_call", default=None)


@contextlib.contextmanager
def model_call(
    call: Any, *, provider: str, tenant: str = "", server: tuple[str, int] | None = None
) -> Iterator[ModelCallSpan]:
    """The ``chat {model}`` span around one provider request of ``call`` (a
    ``keel.models.ModelCall``), and its duration point when it ends; ``server`` is the
    endpoint's ``(host, port)`` (``server.address``/``server.port``).

    An exception leaving the block ends the span with ``error.type`` (an
    ``ApplicationError``'s type, else the exception's class name) and status ERROR, and is
    re-raised unchanged.
    """
    name = call.model.split(":", 1)[1] if ":" in call.model else call.model
    gen_provider = GENAI_PROVIDER.get(provider, provider)
    metric_attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": gen_provider,
        "gen_ai.request.model": name,
    }
    if server is not None:
        metric_attrs["server.address"], metric_attrs["server.port"] = server
    if tenant:
        metric_attrs["keel.tenant"] = tenant
    attributes: dict[str, Any] = {
        **metric_attrs,
        "gen_ai.request.max_tokens": call.max_tokens,
        "gen_ai.output.type": "json" if call.output_schema is not None else "text",
        "keel.role": call.role,
    }
    capture = capture_content()
    kind = trace.SpanKind.INTERNAL if provider == "offline" else trace.SpanKind.CLIENT
    tracer = _tracer or trace.get_tracer("keel")
    with tracer.start_as_current_span(
        f"chat {name}",
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        handle = ModelCallSpan(span, metric_attrs, capture)
        if capture and span.is_recording():
            _capture_request(span, call)
        token = _current_call.set(handle)
        started = time.monotonic()
        error_type = ""
        try:
            yield handle
        except BaseException as e:
            error_type = str(getattr(e, "type", "") or "") or type(e).__name__
            raise
        finally:
            _current_call.reset(token)
            handle._finish(error_type, time.monotonic() - started)


def model_response(*, model: str = "", response_id: str = "", finish_reasons: Sequence[str] = ()) -> None:
    """What the provider's API answered (``gen_ai.response.*``); providers call it, and it is a
    no-op outside :func:`model_call`."""
    handle = _current_call.get()
    if handle is not None:
        handle.response(model=model, response_id=response_id, finish_reasons=finish_reasons)


def _capture_request(span: Any, call: Any) -> None:
    """Opt-in content capture, redacted: the system instructions and the input messages, in
    the conventions' JSON shapes (``gen_ai.system_instructions``, ``gen_ai.input.messages``)."""
    system = (call.system or "").strip()
    if system:
        span.set_attribute(
            "gen_ai.system_instructions", json.dumps([{"type": "text", "content": redact(system)}])
        )
    messages = [
        {"role": m.role, "parts": [{"type": "text", "content": redact(m.content)}]} for m in call.messages
    ]
    span.set_attribute("gen_ai.input.messages", json.dumps(messages))
