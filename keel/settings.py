"""Runtime settings, read from the environment only.

One place decides every address and path so the same code runs on the embedded default
(one machine, no Docker) and against a real cluster: point ``TEMPORAL_ADDRESS`` and
``KEEL_DATABASE_URL`` elsewhere and nothing else changes. Secrets (provider API keys) are
read by the activities that need them, never copied into payloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "load_settings", "offline_env", "PROJECT_ROOT", "PROVIDER_ENV", "SEARCH_ATTRIBUTES"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SEARCH_ATTRIBUTES: dict[str, str] = {
    "KeelTenant": "Keyword",
    "KeelUser": "Keyword",
    "KeelAgent": "Keyword",
    "KeelOutcome": "Keyword",
    "KeelSpendMicros": "Int",
    "KeelFlags": "KeywordList",
}
"""Custom search attributes the dev server registers, so runs filter by tenant in the UI."""


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Where Keel's services live and how the worker behaves."""

    temporal_address: str = "127.0.0.1:7233"
    """Temporal frontend (``TEMPORAL_ADDRESS``)."""
    temporal_namespace: str = "default"
    """Temporal namespace (``TEMPORAL_NAMESPACE``)."""
    task_queue: str = "keel"
    """Task queue for workflows and activities (``KEEL_TASK_QUEUE``)."""
    database_url: str = "postgresql://postgres@127.0.0.1:55432/keel"
    """PostgreSQL holding the ledger, audit log, memory and business data (``KEEL_DATABASE_URL``)."""
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
    """``lease`` (default): a transaction placing only budget holds commits without waiting for
    its WAL flush; ``durable``: it waits, like every commit and release (``KEEL_LEDGER_HOLDS``;
    see migration 009 for what a database crash can cost in ``lease``)."""
    codec_keys: str = field(default="", repr=False)
    """Payload encryption keys ``id:<base64>,...``, newest last (``KEEL_CODEC_KEYS``); when
    empty, the key file is read (see ``keel.codec``)."""
    codec_key_file: Path | None = None
    """Key file (``KEEL_CODEC_KEY_FILE``; default ``<state_dir>/codec.keys``)."""
    codec_port: int = 8234
    """Port of the embedded codec server the Web UI decodes payloads through (``KEEL_CODEC_PORT``)."""

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

    def to_env(self) -> dict[str, str]:
        """The variables ``load_settings`` reads, set to these settings (its inverse)."""
        return {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
            "KEEL_TASK_QUEUE": self.task_queue,
            "KEEL_DATABASE_URL": self.database_url,
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


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: ``os.environ``); bad values raise ``ValueError``."""
    e = dict(os.environ if env is None else env)
    ui_port = _int(e, "KEEL_UI_PORT", 8233)
    pg_port = _int(e, "KEEL_PG_PORT", 55432)
    address = e.get("TEMPORAL_ADDRESS") or "127.0.0.1:7233"
    if ":" not in address:
        raise ValueError(f"TEMPORAL_ADDRESS must be host:port, got {address!r}")
    holds = e.get("KEEL_LEDGER_HOLDS") or "lease"
    if holds not in ("lease", "durable"):
        raise ValueError(f"KEEL_LEDGER_HOLDS must be lease or durable, got {holds!r}")
    return Settings(
        temporal_address=address,
        temporal_namespace=e.get("TEMPORAL_NAMESPACE") or "default",
        task_queue=e.get("KEEL_TASK_QUEUE") or "keel",
        database_url=e.get("KEEL_DATABASE_URL") or f"postgresql://postgres@127.0.0.1:{pg_port}/keel",
        state_dir=Path(e.get("KEEL_STATE_DIR") or PROJECT_ROOT / ".keel"),
        ui_port=ui_port,
        pg_port=pg_port,
        policy_file=Path(e.get("KEEL_POLICY_FILE") or PROJECT_ROOT / "config" / "policy.yaml"),
        ui_url=e.get("KEEL_UI_URL") or f"http://127.0.0.1:{ui_port}",
        ledger_holds=holds,
        codec_keys=e.get("KEEL_CODEC_KEYS") or "",
        codec_key_file=Path(e["KEEL_CODEC_KEY_FILE"]) if e.get("KEEL_CODEC_KEY_FILE") else None,
        codec_port=_int(e, "KEEL_CODEC_PORT", 8234),
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
