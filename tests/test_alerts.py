"""Alert rules: valid for promtool, firing on bad series and silent on good ones, and
written against metric names Keel really emits through the collector.

``promtool`` comes with Debian's ``prometheus`` package (about 96 MB installed, so
``make install`` does not pull it in); without it the promtool tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from keel import telemetry
from keel.settings import PROJECT_ROOT

RULES = PROJECT_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus provides it)"
)


def _promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_and_config_are_valid() -> None:
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0 and "SUCCESS: 6 rules found" in rules.stdout, rules.stdout + rules.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_alerts_fire_on_bad_series_and_not_on_normal_ones() -> None:
    r = _promtool("test", "rules", "alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """With every threshold raised a hundredfold, the same unit tests must fail."""
    rules = (RULES / "alerts.yml").read_text()
    blunt = re.sub(
        r"(>=?|>) (\d+(\.\d+)?)\b", lambda m: f"{m.group(1)} {float(m.group(2)) * 100 + 100}", rules
    )
    assert blunt != rules
    (tmp_path / "alerts.yml").write_text(blunt)
    shutil.copy(RULES / "alerts.test.yml", tmp_path / "alerts.test.yml")
    r = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def _emitted_names() -> set[str]:
    """Prometheus names of every Keel metric, as the collector exposes them (dots to
    underscores, no suffixes; histograms as ``_bucket``/``_sum``/``_count``)."""
    reader = InMemoryMetricReader()
    telemetry.use_meter_provider(MeterProvider(metric_readers=[reader]))
    try:
        telemetry.record_cost(10, tenant="t", kind="tool", tool="x")
        telemetry.record_tool_call("x", "error", tenant="t", error_type="E")
        telemetry.record_run(tenant="t", outcome="completed", duration_s=1.0, iterations=1, tool_calls=1)
        telemetry.record_flags(["cost_spike"], tenant="t")
        data = reader.get_metrics_data()
    finally:
        telemetry.use_meter_provider(MeterProvider())
    names: set[str] = set()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                base = m.name.replace(".", "_")
                names.add(base)
                if type(m.data).__name__ == "Histogram":
                    names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_rules_only_use_metrics_keel_emits_under_the_collectors_naming() -> None:
    collector = yaml.safe_load((PROJECT_ROOT / "deploy" / "otel-collector.yaml").read_text())
    prom = collector["exporters"]["prometheus"]
    assert prom.get("add_metric_suffixes") is False and "namespace" not in prom
    emitted = _emitted_names()
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b(keel_[a-z_]+)\b", rule["expr"]))
    assert used, "no Keel metric in the rules"
    assert used <= emitted, f"rules use metrics Keel does not emit: {sorted(used - emitted)}"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"KeelRunCostSpike", "KeelTenantSpendSpike", "KeelToolErrorRate", "KeelLoopLength"} <= alerts


def test_the_compose_stack_runs_prometheus_on_the_collector() -> None:
    stack = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    prom = stack["services"]["prometheus"]
    assert "otel-collector" in prom["depends_on"]
    assert any("alerts.yml" in v for v in prom["volumes"])
    config = yaml.safe_load((RULES / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["otel-collector:8889"] and config["rule_files"] == ["alerts.yml"]
