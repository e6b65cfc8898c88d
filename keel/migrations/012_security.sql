-- Issue 17: an audit trail the application's own database role cannot bend, and a record
-- of every policy version a worker ran with.
--
-- Roles (cluster-wide, created once):
--   keel_audit_owner  NOLOGIN. Owns audit_log, audit_heads and the functions that write them.
--   keel_app          LOGIN. The role workers should connect as in production: full use of
--                     Keel's other tables, SELECT on the audit tables, and appends ONLY through
--                     keel_audit_append (SECURITY DEFINER, runs as keel_audit_owner).
-- keel_app cannot update, delete or truncate audit rows, move a chain head, disable the
-- append-only trigger (only an owner can) or replace the trigger function. The session
-- setting keel.audit_maintenance that used to switch the trigger off is gone: there is no
-- session-settable bypass. A superuser can still do anything; `audit checkpoint` exports
-- HMAC-signed chain heads so that even a superuser's rewrite of the newest rows and the
-- head is detected by `audit verify --checkpoint`.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'keel_audit_owner') then
        create role keel_audit_owner nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'keel_app') then
        create role keel_app login;
    end if;
end $$;

alter table audit_log drop constraint if exists audit_log_kind_check;
alter table audit_log add constraint audit_log_kind_check check (kind in
    ('permission', 'budget', 'approval', 'guardrail', 'compensation', 'tool', 'run', 'policy'));

-- No bypass: the trigger refuses every update, delete and truncate, whoever asks.
create or replace function keel_audit_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'audit log is append-only (% on %)', tg_op, tg_table_name
        using errcode = 'insufficient_privilege';
end $$;

-- A head moves only forward, one row at a time, to the hash of the row it now names.
create or replace function keel_audit_head_forward() returns trigger language plpgsql as $$
begin
    if new.tenant <> old.tenant or new.seq <> old.seq + 1 or new.hash is distinct from
       (select a.hash from audit_log a where a.tenant = new.tenant and a.seq = new.seq) then
        raise exception 'audit head of % may only advance to the row just appended', old.tenant
            using errcode = 'insufficient_privilege';
    end if;
    return new;
end $$;
drop trigger if exists audit_heads_forward on audit_heads;
create trigger audit_heads_forward before update on audit_heads
    for each row execute function keel_audit_head_forward();
drop trigger if exists audit_heads_no_truncate on audit_heads;
create trigger audit_heads_no_truncate before truncate on audit_heads
    for each statement execute function keel_audit_append_only();

alter function keel_audit_append(text, text, text, text, text, text, text, text, jsonb, text)
    security definer;
alter function keel_audit_append(text, text, text, text, text, text, text, text, jsonb, text)
    set search_path = public, pg_temp;

-- Every policy text a worker ran with, once per content hash (first sight wins).
create table if not exists policy_versions (
    hash        text primary key,
    version     text not null,
    source      text not null,
    changed_by  text not null,
    changed_at  timestamptz not null,
    loaded_by   text not null,
    first_seen  timestamptz not null default now(),
    body        text not null
);

alter table audit_log owner to keel_audit_owner;
alter table audit_heads owner to keel_audit_owner;
alter table policy_versions owner to keel_audit_owner;
alter function keel_audit_append_only() owner to keel_audit_owner;
alter function keel_audit_head_forward() owner to keel_audit_owner;
alter function keel_audit_field(text) owner to keel_audit_owner;
alter function keel_audit_hash(text, text, bigint, timestamptz, text, text, text, text, text, text, text,
    jsonb, text) owner to keel_audit_owner;
alter function keel_audit_append(text, text, text, text, text, text, text, text, jsonb, text)
    owner to keel_audit_owner;

-- Policy versions are recorded through a definer function too (insert once, never update).
create or replace function keel_policy_record(
    p_hash text, p_version text, p_source text, p_changed_by text, p_changed_at timestamptz,
    p_loaded_by text, p_body text) returns boolean
language plpgsql security definer set search_path = public, pg_temp as $$
begin
    insert into policy_versions (hash, version, source, changed_by, changed_at, loaded_by, body)
    values (p_hash, p_version, p_source, p_changed_by, p_changed_at, p_loaded_by, p_body)
    on conflict (hash) do nothing;
    return found;
end $$;
alter function keel_policy_record(text, text, text, text, timestamptz, text, text) owner to keel_audit_owner;
drop trigger if exists policy_versions_append_only on policy_versions;
create trigger policy_versions_append_only before update or delete on policy_versions
    for each row execute function keel_audit_append_only();

grant usage on schema public to keel_app;
grant select, insert, update, delete on all tables in schema public to keel_app;
grant usage, select, update on all sequences in schema public to keel_app;
alter default privileges in schema public grant select, insert, update, delete on tables to keel_app;
alter default privileges in schema public grant usage, select, update on sequences to keel_app;
revoke all on audit_log, audit_heads, policy_versions from public, keel_app;
grant select on audit_log, audit_heads, policy_versions to keel_app;

-- Memory per (tenant, user, session): `owner` is the user whose memory a turn belongs to
-- ('' = a session the tenant's policy shares across users), `author` who made the request.
alter table memory_turns add column if not exists owner text not null default '';
alter table memory_turns add column if not exists author text not null default '';
alter table memory_summaries add column if not exists owner text not null default '';
alter table memory_summaries drop constraint if exists memory_summaries_pkey;
alter table memory_summaries add primary key (tenant, owner, session);
drop index if exists memory_turns_session;
create index if not exists memory_turns_owner_session on memory_turns (tenant, owner, session, id);
