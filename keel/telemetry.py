"""OpenTelemetry for Keel: providers from the standard ``OTEL_*`` variables, Temporal's
tracing interceptor, and the few metrics an operator of a multi-tenant agent fleet needs.

Traces: ``temporalio.contrib.opentelemetry.TracingInterceptor`` on the client (starter and
worker) gives one trace per run — ``StartWorkflow`` from the CLI, ``RunWorkflow``, one
``StartActivity``/``RunActivity`` pair per plan, tool, evaluation, budget/gate local activity
and compensation. Workflow-side spans are emitted only when not replaying, so a worker that
rebuilds a run from history (cache eviction, another worker taking over) emits no
duplicates. Activities add ``keel.*`` attributes to their ``RunActivity`` span with
:func:`annotate`.

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

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics, trace

__all__ = [
    "BREAKER_STATE_VALUE",
    "annotate",
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
    return TracingInterceptor(provider.get_tracer("keel"))


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


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.cost = meter.create_counter(
            "keel.cost", unit="uUSD", description="Spend in micro-USD by tenant/kind/model/tool"
        )
        self.budget = meter.create_counter("keel.budget.decisions", description="Budget decisions by outcome")
        self.model_calls = meter.create_counter(
            "keel.model.calls", description="Model calls by provider/model/outcome"
        )
        self.tokens = meter.create_counter(
            "keel.model.tokens", unit="{token}", description="Tokens by model and direction"
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


def record_model_call(
    *,
    model: str,
    provider: str,
    outcome: str,
    tenant: str = "",
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_tokens: int = 0,
) -> None:
    """One provider call: ``outcome`` is ``ok``, an error type, or ``circuit_open``."""
    m = _m()
    m.model_calls.add(1, _attrs(model=model, provider=provider, outcome=outcome, tenant=tenant))
    for direction, n in (("input", input_tokens), ("output", output_tokens), ("cached_input", cached_tokens)):
        if n:
            m.tokens.add(n, _attrs(model=model, direction=direction, tenant=tenant))


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
