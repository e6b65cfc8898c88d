"""Runtime settings: every ``KEEL_*`` variable in one validated model, Temporal via profiles.

One place decides every address and path so the same code runs on the embedded default
(one machine, no Docker) and against a real cluster or Temporal Cloud. ``KeelEnv`` names and
checks every variable Keel reads (a bad value is one line naming the variable, and all bad
values are reported at once, at start). The Temporal connection comes from a
``temporalio.envconfig`` profile: a TOML file (``TEMPORAL_CONFIG_FILE``, default
``~/.config/temporalio/temporal.toml``, profile ``TEMPORAL_PROFILE``) overlaid by the
``TEMPORAL_ADDRESS`` / ``TEMPORAL_NAMESPACE`` / ``TEMPORAL_API_KEY`` / ``TEMPORAL_TLS*``
variables, so the commands that reach the dev server reach Temporal Cloud unchanged. A
``.env`` file (``KEEL_ENV_FILE``, default ``./.env``) fills in variables the environment
does not set. Secrets (provider and Temporal API keys) are never copied into payloads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.anomaly import AnomalyLimits
from keel.errors import ConfigError
from keel.search_attributes import SEARCH_ATTRIBUTES

__all__ = [
    "KeelEnv",
    "PROJECT_ROOT",
    "PROVIDER_ENV",
    "SEARCH_ATTRIBUTES",
    "Settings",
    "SettingsError",
    "apply_dotenv",
    "load_settings",
    "offline_env",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


_MODEL_RE = re.compile(r"offline|(openai|anthropic):\S+")
_PER_TENANT_RUNS = "KEEL_MAX_RUNS_"


class SettingsError(ConfigError):
    """Invalid configuration: ``problems`` holds one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeelEnv(BaseSettings):
    """Every variable Keel reads, with its default; field names are the variables' names."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=True)

    TEMPORAL_ADDRESS: str | None = None
    """Temporal frontend ``host:port``; overrides the profile's address."""
    TEMPORAL_NAMESPACE: str | None = None
    """Temporal namespace; overrides the profile's (default ``default``)."""
    TEMPORAL_PROFILE: str | None = None
    """Profile in the Temporal config file (default ``default``)."""
    TEMPORAL_CONFIG_FILE: Path | None = None
    """Temporal's TOML config file (default ``~/.config/temporalio/temporal.toml``)."""
    KEEL_TASK_QUEUE: str = Field("keel", pattern=r"^[A-Za-z0-9._:/-]{1,200}$")
    """Task queue for workflows and activities."""
    KEEL_DATABASE_URL: str | None = Field(None, pattern=r"^postgres(ql)?://")
    """PostgreSQL holding the ledger, audit log, memory and business data, as the role the
    application runs as (default: the embedded server's ``keel_app``)."""
    KEEL_DATABASE_OWNER_URL: str | None = Field(None, pattern=r"^postgres(ql)?://")
    """The same database as the role that owns the schema: migrations run as it (default:
    the embedded server's superuser; with ``KEEL_DATABASE_URL`` set, that URL)."""
    KEEL_STATE_DIR: Path | None = None
    """Embedded services' data, logs and pid files (default ``.keel/`` in the checkout)."""
    KEEL_UI_PORT: int = Field(8233, ge=1, le=65535)
    """Temporal Web UI port of the embedded dev server."""
    KEEL_PG_PORT: int = Field(55432, ge=1, le=65535)
    """Port of the embedded PostgreSQL."""
    KEEL_POLICY_FILE: Path | None = None
    """Permission policy (default ``config/policy.yaml``)."""
    KEEL_UI_URL: str | None = Field(None, pattern=r"^https?://")
    """Where people look at runs (default the embedded UI)."""
    KEEL_LEDGER_HOLDS: Literal["lease", "durable"] = "lease"
    """``lease``: a transaction placing only budget holds commits without waiting for its WAL
    flush; ``durable``: it waits (see ``keel/migrations/baseline/ledger.sql``)."""
    KEEL_PRICES_FILE: Path | None = None
    """Model prices (YAML) that win over genai-prices' (default ``config/prices.yaml``)."""
    KEEL_MODEL_FAST: str | None = None
    """Model for the ``fast`` tier (``offline``, ``openai:<name>``, ``anthropic:<name>``)."""
    KEEL_MODEL_BALANCED: str | None = None
    """Model for the ``balanced`` tier."""
    KEEL_MODEL_POWERFUL: str | None = None
    """Model for the ``powerful`` tier."""
    KEEL_OPENAI_JSON_MODE: Literal["json_schema", "json_object"] = "json_schema"
    """Structured output for OpenAI-compatible servers without ``json_schema``."""
    KEEL_BREAKER_THRESHOLD: int = Field(5, ge=1)
    """Consecutive transient failures that open a circuit breaker."""
    KEEL_BREAKER_COOLDOWN_S: float = Field(30.0, gt=0)
    """Seconds an open breaker stays open before one probe call."""
    KEEL_BREAKER_PROBE_LEASE_S: float = Field(120.0, gt=0)
    """Seconds a probe may take before another worker may probe."""
    KEEL_MAX_RUNS_PER_TENANT: int | None = Field(None, ge=0)
    """Concurrent runs per tenant (0 or unset: unlimited); ``KEEL_MAX_RUNS_<TENANT>`` per tenant."""
    KEEL_UPDATE_SNAPSHOTS: bool = False
    """Rewrite the CLI snapshots (tests only)."""
    KEEL_ENV_FILE: Path | None = None
    """The ``.env`` file to read (default ``./.env``)."""
    KEEL_CODEC_KEYS: str | None = Field(None, repr=False)
    """Payload encryption keys ``id:<base64>,...``, newest last (see ``keel.codec``)."""
    KEEL_CODEC_KEY_FILE: Path | None = None
    """Key file (default ``<state_dir>/codec.keys``)."""
    KEEL_CODEC_PORT: int = Field(8234, ge=1, le=65535)
    """Port of the embedded codec server the Web UI decodes payloads through."""
    KEEL_CODEC_TOKEN: str | None = Field(None, repr=False)
    """Bearer token the codec server requires of every encode/decode request."""
    KEEL_AGENT_PATH: str | None = None
    """``:``-separated agent definition files or folders, beside ``config/agents``."""
    KEEL_TOOL_MODULES: str | None = None
    """Comma-separated Python modules whose tools a worker loads."""
    KEEL_SANDBOX_BWRAP: str | None = None
    """The bubblewrap binary of the code sandbox (default ``bwrap`` on PATH)."""
    KEEL_SANDBOX_PYTHON: str | None = None
    """The interpreter the sandbox's ``run_python`` uses."""
    KEEL_SANDBOX_CONCURRENCY: int = Field(8, ge=1)
    """Sandboxed runs at once per worker."""
    KEEL_AUDIT_CHECKPOINT_FILE: str | None = None
    """Signed audit-log heads to verify against (``audit verify --checkpoint``)."""
    KEEL_AUDIT_HMAC_KEY: str | None = Field(None, repr=False)
    """Key that signs audit checkpoints."""
    KEEL_MODEL_BREAKER_THRESHOLD: str | None = None
    """Consecutive model-provider failures that open its breaker (see ``keel.activities.llm``)."""
    KEEL_MODEL_TIMEOUT_S: str | None = None
    """Per-call model timeout in seconds (see ``keel.workflows.options``)."""
    KEEL_GENAI_CAPTURE_CONTENT: bool = False
    """Record prompts and completions on the ``chat`` spans (redacted by ``keel.redact``)."""
    KEEL_FLAG_COST_FACTOR: str | None = None
    """Anomaly flag thresholds, ``KEEL_FLAG_<FIELD>`` (validated by ``keel.anomaly``)."""

    @field_validator("KEEL_MODEL_FAST", "KEEL_MODEL_BALANCED", "KEEL_MODEL_POWERFUL")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v and not _MODEL_RE.fullmatch(v.strip()):
            raise ValueError(f"expected 'offline', 'openai:<name>' or 'anthropic:<name>', got {v!r}")
        return v

    @field_validator("TEMPORAL_ADDRESS")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v and not re.fullmatch(r"[^\s:]+:\d{1,5}", v):
            raise ValueError(f"must be host:port, got {v!r}")
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeelEnv:
        """Validate ``env`` (empty values count as unset); ``SettingsError`` lists every problem."""
        given = {k: v for k, v in env.items() if k in cls.model_fields and v != ""}
        problems = []
        try:
            keel = cls.model_validate(given)
        except ValidationError as e:
            for err in e.errors():
                name = str(err["loc"][0]) if err["loc"] else "?"
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "string_pattern_mismatch":
                    msg = f"not a valid value ({given.get(name)!r})"
                problems.append(f"{name}: {msg}")
            keel = None
        if any(k.startswith("KEEL_FLAG_") for k in env):
            try:
                AnomalyLimits.from_env(env)
            except ValueError as e:
                problems.append(str(e).splitlines()[0])
        for name, raw in env.items():
            if name.startswith(_PER_TENANT_RUNS) and name != "KEEL_MAX_RUNS_PER_TENANT" and raw.strip():
                if not raw.strip().isdigit():
                    problems.append(f"{name}: must be a whole number of runs, got {raw!r}")
        if problems or keel is None:
            raise SettingsError(problems)
        return keel


@dataclass(frozen=True)
class Settings:
    """Where Keel's services live and how the worker behaves (resolved from ``KeelEnv``)."""

    temporal_address: str = "127.0.0.1:7233"
    """Temporal frontend (``TEMPORAL_ADDRESS`` or the profile)."""
    temporal_namespace: str = "default"
    """Temporal namespace (``TEMPORAL_NAMESPACE`` or the profile)."""
    task_queue: str = "keel"
    """Task queue for workflows and activities (``KEEL_TASK_QUEUE``)."""
    database_url: str = "postgresql://keel_app@127.0.0.1:55432/keel"
    """PostgreSQL holding the ledger, audit log, memory and business data, as the application
    role (``KEEL_DATABASE_URL``). The embedded server's default is ``keel_app`` (migration
    012): it cannot bend the audit trail, as in production."""
    database_owner_url: str = ""
    """The schema owner's connection (``KEEL_DATABASE_OWNER_URL``): migrations, creating the
    database. Nothing that serves runs connects with it. Empty: ``database_url`` (one role)."""
    state_dir: Path = field(default=PROJECT_ROOT / ".keel")
    """Embedded services' data, logs and pid files (``KEEL_STATE_DIR``)."""
    ui_port: int = 8233
    """Temporal Web UI port of the embedded dev server (``KEEL_UI_PORT``)."""
    pg_port: int = 55432
    """Port of the embedded PostgreSQL (``KEEL_PG_PORT``)."""
    policy_file: Path = field(default=PROJECT_ROOT / "config" / "policy.yaml")
    """Permission policy (``KEEL_POLICY_FILE``)."""
    ui_url: str = "http://127.0.0.1:8233"
    """Where people look at runs (``KEEL_UI_URL``)."""
    ledger_holds: str = "lease"
    """``lease`` (default) or ``durable`` budget holds (``KEEL_LEDGER_HOLDS``)."""
    temporal_api_key: str | None = field(default=None, repr=False)
    """API key of the Temporal profile (``TEMPORAL_API_KEY``): Temporal Cloud."""
    temporal_tls: Any = False
    """``False``, ``True`` or a ``temporalio.service.TLSConfig`` from the profile."""
    temporal_rpc_metadata: tuple[tuple[str, str], ...] = ()
    """gRPC metadata of the profile (``grpc_meta``)."""
    codec_keys: str = field(default="", repr=False)
    """Payload encryption keys ``id:<base64>,...``, newest last (``KEEL_CODEC_KEYS``); when
    empty, the key file is read (see ``keel.codec``)."""
    codec_key_file: Path | None = None
    """Key file (``KEEL_CODEC_KEY_FILE``; default ``<state_dir>/codec.keys``)."""
    codec_port: int = 8234
    """Port of the embedded codec server the Web UI decodes payloads through (``KEEL_CODEC_PORT``)."""

    @property
    def owner_url(self) -> str:
        """Where migrations run: the owner's URL, or the app's when only one role is set."""
        return self.database_owner_url or self.database_url

    @property
    def key_file(self) -> Path:
        return self.codec_key_file or self.state_dir / "codec.keys"

    @property
    def codec_url(self) -> str:
        """Where the embedded codec server listens (the dev UI's ``--ui-codec-endpoint``)."""
        return f"http://127.0.0.1:{self.codec_port}"

    @property
    def temporal_port(self) -> int:
        return int(self.temporal_address.rsplit(":", 1)[1])

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``temporalio.client.Client.connect`` (besides the converter)."""
        opts: dict[str, Any] = {"namespace": self.temporal_namespace, "tls": self.temporal_tls}
        if self.temporal_api_key:
            opts["api_key"] = self.temporal_api_key
        if self.temporal_rpc_metadata:
            opts["rpc_metadata"] = dict(self.temporal_rpc_metadata)
        return opts

    def to_env(self) -> dict[str, str]:
        """The variables ``load_settings`` reads, set to these settings (its inverse; the
        Temporal profile's TLS and API key travel in the profile file or their own variables)."""
        return {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
            "KEEL_TASK_QUEUE": self.task_queue,
            "KEEL_DATABASE_URL": self.database_url,
            "KEEL_DATABASE_OWNER_URL": self.owner_url,
            "KEEL_STATE_DIR": str(self.state_dir),
            "KEEL_UI_PORT": str(self.ui_port),
            "KEEL_PG_PORT": str(self.pg_port),
            "KEEL_POLICY_FILE": str(self.policy_file),
            "KEEL_UI_URL": self.ui_url,
            "KEEL_LEDGER_HOLDS": self.ledger_holds,
            "KEEL_CODEC_KEYS": self.codec_keys,
            "KEEL_CODEC_KEY_FILE": str(self.key_file),
            "KEEL_CODEC_PORT": str(self.codec_port),
        }


def apply_dotenv(env: dict[str, str] | None = None) -> list[str]:
    """Fill ``env`` (default ``os.environ``) from ``KEEL_ENV_FILE`` or ``./.env`` without
    overriding what is set; returns the names it set. Call once, at a process's start, so
    every module sees the same values."""
    from dotenv import dotenv_values

    target = os.environ if env is None else env
    path = Path(target.get("KEEL_ENV_FILE") or ".env")
    if not path.is_file():
        if target.get("KEEL_ENV_FILE"):
            raise SettingsError([f"KEEL_ENV_FILE: no such file {str(path)!r}"])
        return []
    added = []
    for name, value in dotenv_values(path).items():
        if value is not None and name not in target:
            target[name] = value
            added.append(name)
    return added


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default ``os.environ``) and the Temporal profile.

    Raises:
        SettingsError: one line per bad variable (a ``ValueError``).
    """
    e = dict(os.environ if env is None else env)
    keel = KeelEnv.from_env(e)
    address, namespace, api_key, tls, meta = _temporal_profile(keel, e)
    pg_port = keel.KEEL_PG_PORT
    return Settings(
        temporal_address=address,
        temporal_namespace=namespace,
        task_queue=keel.KEEL_TASK_QUEUE,
        database_url=keel.KEEL_DATABASE_URL or f"postgresql://keel_app@127.0.0.1:{pg_port}/keel",
        database_owner_url=keel.KEEL_DATABASE_OWNER_URL
        or keel.KEEL_DATABASE_URL
        or f"postgresql://postgres@127.0.0.1:{pg_port}/keel",
        state_dir=keel.KEEL_STATE_DIR or PROJECT_ROOT / ".keel",
        ui_port=keel.KEEL_UI_PORT,
        pg_port=pg_port,
        policy_file=keel.KEEL_POLICY_FILE or PROJECT_ROOT / "config" / "policy.yaml",
        ui_url=keel.KEEL_UI_URL or f"http://127.0.0.1:{keel.KEEL_UI_PORT}",
        ledger_holds=keel.KEEL_LEDGER_HOLDS,
        temporal_api_key=api_key,
        temporal_tls=tls,
        temporal_rpc_metadata=meta,
        codec_keys=keel.KEEL_CODEC_KEYS or "",
        codec_key_file=keel.KEEL_CODEC_KEY_FILE,
        codec_port=keel.KEEL_CODEC_PORT,
    )


def _temporal_profile(
    keel: KeelEnv, env: Mapping[str, str]
) -> tuple[str, str, str | None, Any, tuple[tuple[str, str], ...]]:
    """(address, namespace, api key, tls, grpc metadata) from the envconfig profile + env."""
    from temporalio.envconfig import ClientConfigProfile

    path = keel.TEMPORAL_CONFIG_FILE
    if path is not None and not path.is_file():
        raise SettingsError([f"TEMPORAL_CONFIG_FILE: no such file {str(path)!r}"])
    try:
        profile = ClientConfigProfile.load(
            keel.TEMPORAL_PROFILE,
            config_source=path,
            override_env_vars=env,
            config_file_strict=keel.TEMPORAL_PROFILE is not None,
        )
        tls = profile.tls.to_connect_tls_config() if profile.tls is not None else bool(profile.api_key)
    except Exception as err:  # the SDK's errors for a bad file or an unknown profile
        where = f"profile {keel.TEMPORAL_PROFILE!r}" if keel.TEMPORAL_PROFILE else "Temporal config"
        raise SettingsError([f"TEMPORAL_PROFILE: {where}: {str(err).splitlines()[0]}"]) from None
    address = profile.address or "127.0.0.1:7233"
    if not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
        raise SettingsError([f"TEMPORAL_ADDRESS: must be host:port, got {address!r}"])
    return (
        address,
        profile.namespace or "default",
        profile.api_key,
        tls,
        tuple(sorted(profile.grpc_meta.items())),
    )


PROVIDER_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL")
"""The variables that make a worker call a real provider instead of the offline model."""


def offline_env(settings: Settings, base: dict[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """Environment for a Keel subprocess (worker, CLI) of a test or benchmark: ``base`` (default
    ``os.environ``) pointed at ``settings`` plus ``overrides``, without the provider variables,
    so it runs the offline model whatever the caller's shell holds."""
    env = {**(os.environ if base is None else base), **settings.to_env(), **overrides}
    for key in PROVIDER_ENV:
        env.pop(key, None)
    return env
