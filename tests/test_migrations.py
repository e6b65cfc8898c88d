"""A new database built from the baselines and one upgraded through every numbered migration
end at the same schema: tables, columns, constraints, indexes, functions (their bodies and
settings), triggers. Compared by ``pg_dump --schema-only`` of the embedded PostgreSQL, and
by catalog queries, so a difference names the object that differs."""

from __future__ import annotations

import difflib
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from keel.db import BASELINE_DIR, MIGRATIONS_DIR, apply_migrations
from keel.devservices import _pg_bin

_CATALOG = {
    "columns": """
        select table_name, column_name, ordinal_position, data_type, udt_name, is_nullable,
               column_default, collation_name
          from information_schema.columns where table_schema = 'public'""",
    "constraints": """
        select conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          from pg_constraint where connamespace = 'public'::regnamespace""",
    "indexes": "select tablename, indexname, indexdef from pg_indexes where schemaname = 'public'",
    "tables": """
        select relname, relkind, coalesce(reloptions, '{}') from pg_class
         where relnamespace = 'public'::regnamespace and relkind in ('r', 'v', 'm', 'S', 'p')""",
    "functions": """
        select p.oid::regprocedure::text, pg_get_function_result(p.oid), l.lanname, p.provolatile,
               p.proparallel, coalesce(p.proconfig, '{}'), md5(p.prosrc)
          from pg_proc p join pg_language l on l.oid = p.prolang
         where p.pronamespace = 'public'::regnamespace""",
    "triggers": """
        select tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) from pg_trigger
         where not tgisinternal""",
}


def _url(base: str, dbname: str) -> str:
    return make_conninfo(base, dbname=dbname)


@pytest.fixture
def two_databases(owner_pg_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases, as the owner: creating and migrating a database is the owner's
    job (the app role ``keel_app`` every other test uses has neither right)."""
    pg_url = owner_pg_url
    names = [f"keel_mig_{uuid.uuid4().hex[:8]}_{how}" for how in ("new", "old")]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f'create database "{name}"')
    try:
        yield _url(pg_url, names[0]), _url(pg_url, names[1])
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            for name in names:
                admin.execute(f'drop database if exists "{name}" with (force)')


def _catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {k: sorted(conn.execute(q).fetchall(), key=repr) for k, q in _CATALOG.items()}  # type: ignore[arg-type]


def _dump(url: str) -> str:
    info = conninfo_to_dict(url)
    out = subprocess.run(
        [
            str(_pg_bin() / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            f"--host={info.get('host', '127.0.0.1')}",
            f"--port={info.get('port', 5432)}",
            f"--username={info.get('user', 'postgres')}",
            str(info["dbname"]),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    # pg_dump >= 17.6 brackets its output with a random \restrict key; not schema.
    return "\n".join(line for line in out.splitlines() if not re.match(r"\\(un)?restrict ", line))


def _same(a: str, b: str, what: str) -> None:
    if a != b:
        diff = "\n".join(
            difflib.unified_diff(a.splitlines(), b.splitlines(), "baseline", "numbered", lineterm="")
        )
        pytest.fail(f"{what} differ:\n{diff[:6000]}")


def test_a_new_database_gets_the_baseline_and_matches_an_upgraded_one(two_databases: tuple[str, str]) -> None:
    new, old = two_databases
    fresh = apply_migrations(new)
    numbered = apply_migrations(old, baselines=False)
    for baseline in BASELINE_DIR.glob("*.sql"):  # the baseline really took their place
        assert f"baseline/{baseline.name}" in fresh and f"baseline/{baseline.name}" not in numbered
    # Both record every numbered migration as applied: neither re-runs anything.
    every = {p.name for p in MIGRATIONS_DIR.glob("*.sql")}
    assert every <= set(fresh) and set(numbered) == every
    assert apply_migrations(new) == [] and apply_migrations(old) == []
    cat_new, cat_old = _catalog(new), _catalog(old)
    for kind in _CATALOG:
        _same("\n".join(map(repr, cat_new[kind])), "\n".join(map(repr, cat_old[kind])), kind)
    assert any("keel_budget_reserve" in f[0] for f in cat_new["functions"])  # not two empty dumps
    _same(_dump(new), _dump(old), "pg_dump --schema-only")


def test_a_database_part_way_through_the_numbered_path_keeps_upgrading_through_it(
    two_databases: tuple[str, str],
) -> None:
    """A database that stopped after 008 (a deployment older than 009) is not given the
    baseline again: it runs 009 and the rest, and ends where a new database starts."""
    new, old = two_databases
    apply_migrations(new)
    apply_migrations(old, upto="008_ledger_lean.sql")
    rest = apply_migrations(old)
    assert "009_ledger_leases.sql" in rest and not any(n.startswith("baseline/") for n in rest)
    _same(_dump(new), _dump(old), "pg_dump --schema-only")


def test_a_baseline_names_what_it_replaces(tmp_path: Any) -> None:
    from keel.db import _replaces

    for baseline in BASELINE_DIR.glob("*.sql"):
        names = _replaces(baseline)
        assert names and all((MIGRATIONS_DIR / n).is_file() for n in names), baseline
    bad = tmp_path / "x.sql"
    bad.write_text("create table t ();\n")
    with pytest.raises(ValueError, match="replaces"):
        _replaces(bad)
