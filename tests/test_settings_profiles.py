"""One configuration: every variable validated at start, Temporal through envconfig profiles.

A TLS + API-key profile (the Temporal Cloud shape) must turn into exactly the connect options
the SDK needs; a plain profile must reach the real dev server; bad values are reported all at
once, one line per variable, by the CLI and by the worker before they do anything.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import TLSConfig

from keel.settings import KeelEnv, Settings, SettingsError, apply_dotenv, load_settings
from tests.conftest import TEST_CODEC_KEYS
from tests.test_cli import PY, STARTER, _cli

CLOUD = """
[profile.cloud]
address = "keel-prod.a1b2c.tmprl.cloud:7233"
namespace = "keel-prod.a1b2c"
api_key = "key-from-file"

[profile.cloud.tls]
server_name = "keel-prod.a1b2c.tmprl.cloud"
server_ca_cert_data = "-----BEGIN CERTIFICATE-----\\nCA\\n-----END CERTIFICATE-----"
client_cert_data = "-----BEGIN CERTIFICATE-----\\nCLIENT\\n-----END CERTIFICATE-----"
client_key_data = "-----BEGIN PRIVATE KEY-----\\nKEY\\n-----END PRIVATE KEY-----"

[profile.cloud.grpc_meta]
team = "payments"
"""


def test_tls_and_api_key_profile_gives_the_cloud_connect_options(tmp_path: Path) -> None:
    toml = tmp_path / "temporal.toml"
    toml.write_text(CLOUD)
    s = load_settings({"TEMPORAL_CONFIG_FILE": str(toml), "TEMPORAL_PROFILE": "cloud"})
    assert s.temporal_address == "keel-prod.a1b2c.tmprl.cloud:7233"
    opts = s.connect_options()
    assert opts["namespace"] == "keel-prod.a1b2c" and opts["api_key"] == "key-from-file"
    assert opts["rpc_metadata"] == {"team": "payments"}
    tls = opts["tls"]
    assert isinstance(tls, TLSConfig) and tls.domain == "keel-prod.a1b2c.tmprl.cloud"
    assert tls.server_root_ca_cert and b"CA" in tls.server_root_ca_cert
    assert tls.client_cert and b"CLIENT" in tls.client_cert
    assert tls.client_private_key and b"KEY" in tls.client_private_key
    assert "key-from-file" not in repr(s)  # the key never lands in a log line
    # The environment overrides the file, as the Temporal CLI does.
    env = {"TEMPORAL_CONFIG_FILE": str(toml), "TEMPORAL_PROFILE": "cloud", "TEMPORAL_API_KEY": "key-from-env"}
    assert load_settings(env).connect_options()["api_key"] == "key-from-env"


def test_an_api_key_alone_turns_tls_on() -> None:
    s = load_settings({"TEMPORAL_ADDRESS": "ns.acct.tmprl.cloud:7233", "TEMPORAL_API_KEY": "k"})
    assert s.connect_options()["tls"] is True and s.connect_options()["api_key"] == "k"
    assert load_settings({}).connect_options() == {"namespace": "default", "tls": False}


async def test_connect_passes_the_profile_to_the_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``keel.client.connect`` is the one place clients are built: it must hand over everything."""
    from keel import client as keel_client

    toml = tmp_path / "temporal.toml"
    toml.write_text(CLOUD)
    seen: dict[str, object] = {}

    async def fake_connect(target: str, **kwargs: object) -> str:
        seen.update(kwargs, target=target)
        return "client"

    monkeypatch.setattr(Client, "connect", staticmethod(fake_connect))
    s = load_settings(
        {"TEMPORAL_CONFIG_FILE": str(toml), "TEMPORAL_PROFILE": "cloud", "KEEL_CODEC_KEYS": TEST_CODEC_KEYS}
    )
    assert await keel_client.connect(s) == "client"
    assert seen["target"] == "keel-prod.a1b2c.tmprl.cloud:7233" and seen["api_key"] == "key-from-file"
    assert isinstance(seen["tls"], TLSConfig) and seen["namespace"] == "keel-prod.a1b2c"
    assert seen["rpc_metadata"] == {"team": "payments"} and "data_converter" in seen


async def test_a_plain_profile_reaches_the_dev_server(temporal_services: Settings, tmp_path: Path) -> None:
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

    from keel.client import connect

    toml = tmp_path / "temporal.toml"
    toml.write_text(
        f'[profile.dev]\naddress = "{temporal_services.temporal_address}"\nnamespace = "default"\n'
    )
    s = load_settings(
        {"TEMPORAL_CONFIG_FILE": str(toml), "TEMPORAL_PROFILE": "dev", "KEEL_CODEC_KEYS": TEST_CODEC_KEYS}
    )
    assert s.connect_options() == {"namespace": "default", "tls": False}
    client = await connect(s)
    info = await client.workflow_service.get_system_info(GetSystemInfoRequest())
    assert info.server_version


def test_the_cli_uses_the_profile(
    test_env: dict[str, str], temporal_services: Settings, tmp_path: Path
) -> None:
    toml = tmp_path / "temporal.toml"
    toml.write_text(f'[profile.dev]\naddress = "{temporal_services.temporal_address}"\n')
    env = {**test_env, "TEMPORAL_CONFIG_FILE": str(toml), "TEMPORAL_PROFILE": "dev"}
    env.pop("TEMPORAL_ADDRESS")
    env.pop("TEMPORAL_NAMESPACE")
    done = _cli(env, "doctor", "-o", "json")
    assert f'"reachable at {temporal_services.temporal_address} namespace default"' in done.stdout, (
        done.stdout
    )
    missing = _cli({**env, "TEMPORAL_PROFILE": "nope"}, "doctor")
    assert missing.returncode == 2 and missing.stderr.startswith("error: TEMPORAL_PROFILE: profile 'nope'")


def test_every_bad_variable_is_one_line_at_start(test_env: dict[str, str]) -> None:
    bad = {
        **test_env,
        "KEEL_PG_PORT": "fifty",
        "KEEL_LEDGER_HOLDS": "sometimes",
        "KEEL_MODEL_FAST": "gpt-4o",
        "KEEL_BREAKER_THRESHOLD": "0",
        "KEEL_MAX_RUNS_ACME": "many",
    }
    lines = _cli(bad, "doctor").stderr.splitlines()
    assert [ln.split(":")[1].strip() for ln in lines] == [
        "KEEL_PG_PORT",
        "KEEL_LEDGER_HOLDS",
        "KEEL_MODEL_FAST",
        "KEEL_BREAKER_THRESHOLD",
        "KEEL_MAX_RUNS_ACME",
    ], lines
    assert all(ln.startswith("error: ") for ln in lines) and "Traceback" not in "".join(lines)
    worker = subprocess.run(
        [PY, "worker.py"],
        cwd=Path(__file__).parent.parent,
        env=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2 and worker.stderr.count("\n") == 5, worker.stderr
    assert worker.stderr.startswith("worker: KEEL_PG_PORT: ")


def test_dotenv_fills_in_what_the_environment_does_not_set(tmp_path: Path, test_env: dict[str, str]) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("KEEL_TASK_QUEUE=from-dotenv\nKEEL_UI_PORT=9999\n")
    env = {"KEEL_UI_PORT": "8300"}
    assert sorted(apply_dotenv({**env, "KEEL_ENV_FILE": str(dotenv)})) == ["KEEL_TASK_QUEUE"]
    filled = {**env, "KEEL_ENV_FILE": str(dotenv)}
    apply_dotenv(filled)
    s = load_settings(filled)
    assert s.task_queue == "from-dotenv" and s.ui_port == 8300  # the environment wins
    with pytest.raises(SettingsError, match="KEEL_ENV_FILE: no such file"):
        apply_dotenv({"KEEL_ENV_FILE": str(tmp_path / "missing.env")})
    # The CLI reads ./.env from where it runs.
    cli_env = {k: v for k, v in test_env.items() if k != "KEEL_TASK_QUEUE"}
    (tmp_path / ".env").write_text("KEEL_TASK_QUEUE=from-dotenv\n")
    done = subprocess.run(
        [
            PY,
            *[str(Path(__file__).parent.parent / a) if a.endswith(".py") else a for a in STARTER],
            "doctor",
            "-o",
            "json",
        ],
        cwd=tmp_path,
        env={**cli_env, "PYTHONPATH": str(Path(__file__).parent.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "worker: from-dotenv (workflow)" in done.stdout, done.stdout + done.stderr


def test_every_keel_variable_read_anywhere_is_in_the_model() -> None:
    """A new ``KEEL_*`` read outside the model fails here until the model names it."""
    import re

    root = Path(__file__).parent.parent
    names: set[str] = set()
    for folder in ("keel", "activities", "workflows"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r"KEEL_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text()))
    names |= set(re.findall(r"KEEL_[A-Z][A-Z0-9_]*[A-Z0-9]", (root / "worker.py").read_text()))
    fields = set(KeelEnv.model_fields)
    # A prefix built into a name at run time (f"KEEL_MODEL_{tier}") is covered by its fields.
    missing = sorted(n for n in names - fields if not any(f.startswith(n + "_") for f in fields))
    assert missing == [], f"add these to keel.settings.KeelEnv: {missing}"


def test_the_app_role_serves_runs_and_the_owner_migrates() -> None:
    """Embedded default: runs connect as ``keel_app`` (the role that cannot bend the audit
    trail), migrations as the superuser; one URL given means one role for both (as before);
    both given, each its own."""
    dev = load_settings({"KEEL_PG_PORT": "54000"})
    assert dev.database_url == "postgresql://keel_app@127.0.0.1:54000/keel"
    assert dev.owner_url == "postgresql://postgres@127.0.0.1:54000/keel"
    one = load_settings({"KEEL_DATABASE_URL": "postgresql://keel@db/keel"})
    assert one.database_url == one.owner_url == "postgresql://keel@db/keel"
    two = load_settings(
        {
            "KEEL_DATABASE_URL": "postgresql://keel_app@db/keel",
            "KEEL_DATABASE_OWNER_URL": "postgresql://own@db/keel",
        }
    )
    assert (two.database_url, two.owner_url) == ("postgresql://keel_app@db/keel", "postgresql://own@db/keel")
    assert load_settings(two.to_env()).owner_url == two.owner_url  # workers inherit both
