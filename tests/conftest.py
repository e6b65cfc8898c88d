"""Session fixtures: the real Temporal dev server and the real PostgreSQL, started once.

Every test connects as the application role ``keel_app`` (``pg_url``, ``db_pool``, the
workers' ``KEEL_DATABASE_URL``); migrations run as the owner, and tests that play an operator
or attacker with more rights ask for ``owner_pg_url`` explicitly.

Tests run their own services in a temporary state folder on free ports, so a developer's
``make demo`` services keep running untouched, and everything started here is stopped at
the end of the session (Temporal first, then PostgreSQL), also when the session is ended by
SIGTERM. Only a SIGKILLed session leaves them running.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from keel.db import apply_migrations, open_pool, seed_demo
from keel.devservices import DevServices, free_port
from keel.settings import Settings, load_settings, offline_env

TEST_CODEC_KEYS = ",".join(
    line.strip()
    for line in (Path(__file__).parent / "histories" / "codec-test.keys").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
"""The payload key of every test session (``tests/histories/codec-test.keys``)."""


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    state = Path(tempfile.mkdtemp(prefix="keel-test-"))
    env = {
        **os.environ,
        "KEEL_STATE_DIR": str(state),
        "KEEL_PG_PORT": str(free_port()),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KEEL_UI_PORT": str(free_port()),
        "KEEL_CODEC_PORT": str(free_port()),
        # A fixed, committed test key: recorded golden histories stay replayable.
        "KEEL_CODEC_KEYS": TEST_CODEC_KEYS,
        "KEEL_TASK_QUEUE": "keel-test",
    }
    s = load_settings(env)
    services = DevServices(s)
    # SIGTERM (``timeout``, a cancelled CI job) would end pytest without teardown and leave
    # the services running; as an interrupt, the finally below still stops them.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        services.start_postgres()
        apply_migrations(s.owner_url)  # the owner migrates; everything else is keel_app
        assert s.database_url.startswith("postgresql://keel_app@"), s.database_url
        seed_demo(s.owner_url)  # the demo tenants' orders and stock (keel/seed/demo.sql)
        with psycopg.connect(s.owner_url, autocommit=True) as conn:  # the test tools' table
            conn.execute((Path(__file__).parent / "doubles" / "tools.sql").read_text())  # type: ignore[arg-type]
        yield s
    finally:
        services.down()
        shutil.rmtree(state, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def test_env(settings: Settings) -> dict[str, str]:
    """Environment for subprocesses (workers, CLI) pointed at the test services."""
    return offline_env(settings)


@pytest.fixture(scope="session")
def pg_url(settings: Settings) -> str:
    """The application role ``keel_app``, as workers connect in production (migration 012):
    tests prove what production gets, not what a superuser could do."""
    return settings.database_url


@pytest.fixture(scope="session")
def owner_pg_url(settings: Settings) -> str:
    """The superuser that owns the schema: only for tests that play an operator or an
    attacker with more rights than the application (they say so)."""
    return settings.owner_url


@pytest.fixture(scope="session")
async def db_pool(pg_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(pg_url, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
def temporal_services(settings: Settings) -> Settings:
    """Start the Temporal dev server lazily: pure database tests do not pay for it."""
    DevServices(settings).start_temporal()
    return settings


@pytest.fixture(scope="session")
async def client(temporal_services: Settings) -> Client:
    from keel.client import connect

    return await connect(temporal_services)


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4()}"
