"""The embedded services are real, reused when already running, and migrations are idempotent."""

from __future__ import annotations

import psycopg

from keel.db import apply_migrations
from keel.devservices import DevServices
from keel.settings import Settings


def test_postgres_is_real_and_seeded(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("show server_version").fetchone()[0]
        assert int(version.split(".")[0]) >= 16
        assert conn.execute("select status from orders where id='ORD-123'").fetchone() == ("shipped",)


def test_migrations_are_idempotent(pg_url: str) -> None:
    assert apply_migrations(pg_url) == []


def test_start_twice_reuses(temporal_services: Settings) -> None:
    services = DevServices(temporal_services)
    pid_before = (temporal_services.state_dir / "temporal.pid").read_text()
    services.up()
    assert (temporal_services.state_dir / "temporal.pid").read_text() == pid_before
    status = services.status()
    assert status["temporal"].startswith("running") and status["postgres"].startswith("running")
