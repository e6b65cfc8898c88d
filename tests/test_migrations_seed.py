"""Migrations hold the schema only: demo data is a seed step, the test tools' table is the
tests' own, and a database that applied the old ``006_testing.sql`` still upgrades cleanly."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from keel.db import MIGRATIONS_DIR, apply_migrations, seed_demo
from keel.doctor import _migrations
from keel.settings import Settings


@pytest.fixture
def fresh_db(settings: Settings) -> Iterator[str]:
    """An empty database of its own on the test server (the session's is shared), reached as
    the owner, who migrates and seeds."""
    owner, name = settings.owner_url, f"m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')  # type: ignore[arg-type]
    try:
        yield make_conninfo(owner, dbname=name)
    finally:
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')  # type: ignore[arg-type]


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}


def test_a_new_database_has_no_demo_rows_and_no_test_tables_until_seeded(fresh_db: str) -> None:
    assert not any(p.name.startswith("006_") for p in MIGRATIONS_DIR.glob("*.sql"))
    apply_migrations(fresh_db)
    assert "test_effects" not in _tables(fresh_db) and "orders" in _tables(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("select count(*) from orders").fetchone() == (0,)
    seed_demo(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("select status from orders where id = 'ORD-123'").fetchone() == ("shipped",)
        assert conn.execute("select count(*) from inventory where tenant = 'acme'").fetchone() == (3,)
        conn.execute("update orders set status = 'delivered' where id = 'ORD-123'")
    seed_demo(fresh_db)  # again: idempotent, and what the demo changed stays changed
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("select status from orders where id = 'ORD-123'").fetchone() == ("delivered",)
        assert conn.execute("select count(*) from orders").fetchone() == (5,)


async def test_a_database_that_applied_006_upgrades_and_doctor_is_satisfied(
    fresh_db: str, settings: Settings
) -> None:
    apply_migrations(fresh_db)
    # What a database migrated before the move looks like: 006 recorded, its table present,
    # the migration that drops it not yet applied.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            "create table test_effects (id bigserial primary key, tool text not null, "
            "note text not null default '', idempotency_key text not null unique, "
            "status text not null default 'done', created_at timestamptz not null default now(), "
            "undone_at timestamptz)"
        )
        conn.execute("insert into keel_migrations (name) values ('006_testing.sql')")
        conn.execute("delete from keel_migrations where name = '013_drop_test_effects.sql'")
    check = await _migrations(dataclasses.replace(settings, database_url=fresh_db))
    assert not check.ok and "013_drop_test_effects.sql" in check.detail, check
    assert apply_migrations(fresh_db) == ["013_drop_test_effects.sql"]
    assert "test_effects" not in _tables(fresh_db)
    check = await _migrations(dataclasses.replace(settings, database_url=fresh_db))
    assert check.ok, check
    assert apply_migrations(fresh_db) == []
