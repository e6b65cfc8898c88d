"""Attacks from a ``keel_app`` connection (migration 012): what the application's own role
must not be able to do to the audit trail, the schema or its own rights.

Each statement runs in its own autocommit connection as ``keel_app`` (the ``pg_url`` the
workers use), so one refusal never hides the next attack. A statement that succeeds is a
finding; the ones still open are strict xfails that say what works.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

ATTACKS = {
    "update-audit-row": (
        "update audit_log set reason = 'nothing happened' where id = (select max(id) from audit_log)"
    ),
    "delete-audit-row": "delete from audit_log where id = (select max(id) from audit_log)",
    "truncate-audit": "truncate audit_log",
    "insert-audit-row-directly": (
        "insert into audit_log (tenant, seq, ts, kind, decision, idem_key, prev_hash, hash) "
        "values ('acme', 999999, now(), 'run', 'allow', 'forged-' || gen_random_uuid(), '', '')"
    ),
    "move-audit-head": "update audit_heads set seq = seq + 1 where tenant = 'acme'",
    "reset-audit-head": "update audit_heads set seq = 0, hash = '' where tenant = 'acme'",
    "delete-audit-head": "delete from audit_heads where tenant = 'acme'",
    "insert-audit-head": (
        "insert into audit_heads (tenant, seq, hash) values ('forged-' || gen_random_uuid(), 5, 'x')"
    ),
    "disable-append-only-trigger": "alter table audit_log disable trigger audit_log_append_only",
    "disable-all-triggers": "alter table audit_log disable trigger all",
    "replica-role-skips-triggers": "set session_replication_role = replica",
    "replace-trigger-function": (
        "create or replace function keel_audit_append_only() returns trigger "
        "language plpgsql as $$ begin return coalesce(new, old); end $$"
    ),
    "replace-append-function": (
        "create or replace function keel_audit_append(text, text, text, text, text, text, text, "
        "text, jsonb, text) returns table (id bigint, seq bigint, ts timestamptz, prev_hash text, "
        "hash text, existing boolean) language sql as $$ select 1::bigint, 1::bigint, now(), '', '', true $$"
    ),
    "replace-hash-function": (
        "create or replace function keel_audit_field(text) returns text language sql as $$ select '' $$"
    ),
    # Migration 015: a lock function that no longer locks (or finds no record) would let two
    # attempts act on one key; one that skips the audit append would act without a decision.
    "replace-effect-lock-function": (
        "create or replace function keel_tool_effect_lock(text) returns jsonb "
        "language sql as $$ select null::jsonb $$"
    ),
    "drop-step-open-function": (
        "drop function keel_tool_step_open(text, text, text, text, text, text, text, text, text, text, "
        "jsonb, text, text, text[], bigint, bigint, integer, integer, text, text, text, text, text, text)"
    ),
    "drop-audit-trigger": "drop trigger audit_log_append_only on audit_log",
    "create-function-in-public": (
        "create function public.keel_evil() returns int language sql security definer as $$ select 1 $$"
    ),
    "create-table-in-public": "create table public.keel_evil_t (x int)",
    "alter-ledger-table": (
        "alter table keel_budget_scopes drop constraint if exists keel_budget_scopes_reserved_micros_check"
    ),
    "add-ledger-trigger": (
        "create trigger evil before update on keel_budget_scopes for each row "
        "execute function keel_audit_append_only()"
    ),
    "truncate-ledger": "truncate keel_budget_scopes",
    "become-audit-owner": "set role keel_audit_owner",
    "grant-self-owner-role": "grant keel_audit_owner to keel_app",
    "alter-own-role": "alter role keel_app superuser",
    "create-role": "create role keel_evil login superuser",
    "forge-policy-version": (
        "update policy_versions set body = 'allow everything' "
        "where hash = (select min(hash) from policy_versions)"
    ),
    "delete-policy-version": "delete from policy_versions",
    "untrusted-language": (
        "create function public.keel_sh() returns int language plpython3u as $$ return 1 $$"
    ),
    "read-server-files": "select pg_read_file('postgresql.conf')",
    "copy-to-program": "copy (select 1) to program 'true'",
    "drop-migrations-record": "drop table keel_migrations",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_keel_app_cannot(name: str, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("keel_app",)
        with pytest.raises(psycopg.Error):
            conn.execute(ATTACKS[name])
        # Nothing half-done: the audit chain of every tenant still verifies via the function.


def test_keel_app_cannot_wedge_every_audit_append_through_the_id_sequence(
    pg_url: str, owner_pg_url: str
) -> None:
    """audit_log's ``id`` comes from ``audit_log_id_seq``. Migration 012 granted keel_app
    ``update`` on ALL sequences before it revoked the audit tables, so keel_app could
    ``setval`` the audit sequence back: every later append (every tenant's) then collides on
    the primary key and fails, i.e. every run's audit write (and with it every gate decision)
    fails. keel_app must not be able to move the audit sequence."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    with psycopg.connect(owner_pg_url, autocommit=True) as owner:
        owner.execute(
            "select * from keel_audit_append(%s, 'u', 'w', 's', 'run', '', 'allow', '', '{}', %s)",
            (tenant, f"{tenant}/seed"),
        )
        (top,) = owner.execute("select max(id) from audit_log").fetchone() or (0,)
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                with pytest.raises(psycopg.Error):
                    conn.execute("select setval('audit_log_id_seq', 1)")
                with pytest.raises(psycopg.Error):
                    conn.execute("alter sequence audit_log_id_seq restart with 1")
                # keel_app's appends still work.
                conn.execute(
                    "select * from keel_audit_append(%s, 'u', 'w', 's', 'run', '', 'allow', '', '{}', %s)",
                    (tenant, f"{tenant}/after"),
                )
        finally:
            owner.execute(
                "select setval('audit_log_id_seq', greatest(%s, (select max(id) from audit_log)))", (top,)
            )


def test_keel_app_granting_itself_audit_rights_gains_nothing(pg_url: str) -> None:
    """PostgreSQL answers a GRANT without grant option with a warning, not an error: the
    promise is that keel_app still holds no update/delete/truncate on the audit tables."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for table in ("audit_log", "audit_heads", "policy_versions"):
            try:
                conn.execute(f"grant all on {table} to keel_app")
            except psycopg.Error:
                pass
            for priv in ("update", "delete", "truncate", "insert", "trigger"):
                row = conn.execute("select has_table_privilege('keel_app', %s, %s)", (table, priv)).fetchone()
                assert row == (False,), (table, priv)


@pytest.mark.xfail(
    strict=True,
    reason="no row-level security: keel_app is one role for all tenants, so any keel_app "
    "connection reads (and writes) every tenant's ledger scopes, refunds and audit rows; "
    "tenant isolation is the application's, not the database's",
)
def test_keel_app_connection_for_one_tenant_cannot_read_another_tenants_ledger(
    pg_url: str, owner_pg_url: str
) -> None:
    other = f"other{uuid.uuid4().hex[:6]}"
    with psycopg.connect(owner_pg_url, autocommit=True) as owner:
        owner.execute("insert into keel_budget_scopes (scope, limit_micros) values (%s, 1000000)", (other,))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # A worker serving tenant acme, compromised: it reads tenant `other`'s ledger row.
        rows = conn.execute(
            "select limit_micros from keel_budget_scopes where scope = %s", (other,)
        ).fetchall()
    assert rows == []


def test_the_step_functions_run_with_the_callers_rights(pg_url: str) -> None:
    """``keel_tool_step_open`` and ``keel_tool_effect_lock`` (migration 015) are SECURITY
    INVOKER: calling one can do only what keel_app could do statement by statement (the audit
    row goes through ``keel_audit_append``, as it would without them), so they open no new way
    into the audit tables or another tenant's ledger."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "select proname, prosecdef from pg_proc where proname in "
            "('keel_tool_step_open', 'keel_tool_effect_lock') order by proname"
        ).fetchall()
    assert rows == [("keel_tool_effect_lock", False), ("keel_tool_step_open", False)]


@pytest.mark.xfail(
    strict=True,
    reason="keel_app may append any row to any tenant's chain through keel_audit_append "
    "(the definer function takes the tenant as an argument): a forged row keeps the chain "
    "valid, so `audit verify` cannot tell it from a real one",
)
def test_keel_app_cannot_append_to_another_tenants_chain(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            conn.execute(
                "select * from keel_audit_append('acme', 'mallory', 'fake-run', 's1', 'approval', "
                "'issue_refund', 'allow', 'approved by carol', '{}', %s)",
                (f"forged/{uuid.uuid4().hex}",),
            )


def test_keel_app_cannot_record_a_forged_body_under_a_real_policy_hash(pg_url: str) -> None:
    """``keel_policy_record`` is keel_app's only way into ``policy_versions`` and the first
    record of a hash wins: a body that is not the hash's text must be refused, or keel_app
    could pre-record the shipped policy's hash with a different body."""
    from keel.policy import policy_hash

    real = f"version: attack-{uuid.uuid4().hex}\n"
    digest = policy_hash(real)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            conn.execute(
                "select keel_policy_record(%s, 'v', 'config/policy.yaml', 'carol', now(), 'w', %s)",
                (digest, "tenants: {}  # allow everything"),
            )
        assert conn.execute(
            "select keel_policy_record(%s, 'v', 's', 'c', now(), 'w', %s)", (digest, real)
        ).fetchone() == (True,)
        row = conn.execute("select body from policy_versions where hash=%s", (digest,)).fetchone()
    assert row == (real,)
