-- Append-only, hash-chained audit log (see activities/audit.py for the hash definition).
--
-- Chains are PER TENANT: each tenant has one head row in audit_heads that an append locks
-- (select ... for update) in the same transaction as its inserts, so appends within a tenant
-- are serialised and gap-free while different tenants never wait for each other.
create table if not exists audit_log (
    id           bigserial primary key,
    tenant       text not null,
    seq          bigint not null check (seq > 0),
    ts           timestamptz not null,
    "user"       text not null default '',
    workflow_id  text not null default '',
    step_id      text not null default '',
    kind         text not null check (kind in
                   ('permission', 'budget', 'approval', 'guardrail', 'compensation', 'tool', 'run')),
    subject      text not null default '',
    decision     text not null,
    reason       text not null default '',
    data         jsonb not null default '{}'::jsonb,
    idem_key     text not null unique,
    prev_hash    text not null,
    hash         text not null,
    unique (tenant, seq)
);
create index if not exists audit_log_workflow on audit_log (workflow_id, id);

create table if not exists audit_heads (
    tenant  text primary key,
    seq     bigint not null default 0,
    hash    text not null default ''
);

-- Rows can be added, never changed or removed, unless a maintenance session says so
-- explicitly (set keel.audit_maintenance = 'on'); tests use that to simulate tampering.
create or replace function keel_audit_append_only() returns trigger language plpgsql as $$
begin
    if coalesce(current_setting('keel.audit_maintenance', true), '') = 'on' then
        return coalesce(new, old);
    end if;
    raise exception 'audit log is append-only (% on %)', tg_op, tg_table_name
        using errcode = 'insufficient_privilege';
end $$;

drop trigger if exists audit_log_append_only on audit_log;
create trigger audit_log_append_only before update or delete on audit_log
    for each row execute function keel_audit_append_only();
drop trigger if exists audit_log_no_truncate on audit_log;
create trigger audit_log_no_truncate before truncate on audit_log
    for each statement execute function keel_audit_append_only();
-- Heads move forward on every append but are never deleted outside maintenance.
drop trigger if exists audit_heads_no_delete on audit_heads;
create trigger audit_heads_no_delete before delete on audit_heads
    for each row execute function keel_audit_append_only();
