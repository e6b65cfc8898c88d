-- One-round-trip audit appends: the chain head is locked, the row hashed and inserted by the
-- database itself. Rows appended this way carry hash version 2:
--   hash = hex(sha256(utf8( f(prev_hash) f(tenant) f(seq) f(ts) f(user) f(workflow_id)
--          f(step_id) f(kind) f(subject) f(decision) f(reason) f(data::text) f(idem_key) )))
--   where f(v) = length(v) || ':' || v || ';'   (length-prefixed: no field can bleed into
--   the next) and ts is rendered in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ.
-- Version 1 rows (hashed by the application, see activities/audit.py) stay verifiable.
alter table audit_log add column if not exists hash_version smallint not null default 1;

create or replace function keel_audit_field(v text) returns text
language sql immutable parallel safe as $$ select length(v)::text || ':' || v || ';' $$;

create or replace function keel_audit_hash(
    prev text, tenant text, seq bigint, ts timestamptz, u text, w text, st text, k text,
    su text, d text, r text, data jsonb, i text) returns text
language sql immutable parallel safe as $$
    select encode(sha256(convert_to(
        keel_audit_field(prev) || keel_audit_field(tenant) || keel_audit_field(seq::text) ||
        keel_audit_field(to_char(ts at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) ||
        keel_audit_field(u) || keel_audit_field(w) || keel_audit_field(st) ||
        keel_audit_field(k) || keel_audit_field(su) || keel_audit_field(d) ||
        keel_audit_field(r) || keel_audit_field(data::text) || keel_audit_field(i),
        'UTF8')), 'hex')
$$;

create or replace function keel_audit_append(
    p_tenant text, p_user text, p_workflow_id text, p_step_id text, p_kind text,
    p_subject text, p_decision text, p_reason text, p_data jsonb, p_idem_key text)
returns table (id bigint, seq bigint, ts timestamptz, prev_hash text, hash text,
               existing boolean)
language plpgsql as $$
declare
    v_seq bigint;
    v_prev text;
    v_ts timestamptz;
    v_id bigint;
begin
    return query select a.id, a.seq, a.ts, a.prev_hash, a.hash, true from audit_log a
        where a.idem_key = p_idem_key and a.tenant = p_tenant;
    if found then return; end if;
    insert into audit_heads as h (tenant) values (p_tenant) on conflict do nothing;
    select h.seq, h.hash into v_seq, v_prev from audit_heads h
        where h.tenant = p_tenant for update;
    -- Under the lock: a concurrent append of the same key may have committed meanwhile.
    return query select a.id, a.seq, a.ts, a.prev_hash, a.hash, true from audit_log a
        where a.idem_key = p_idem_key and a.tenant = p_tenant;
    if found then return; end if;
    v_seq := v_seq + 1;
    v_ts := clock_timestamp();
    insert into audit_log as a (tenant, seq, ts, "user", workflow_id, step_id, kind, subject,
                                decision, reason, data, idem_key, prev_hash, hash, hash_version)
    values (p_tenant, v_seq, v_ts, p_user, p_workflow_id, p_step_id, p_kind, p_subject,
            p_decision, p_reason, p_data, p_idem_key, v_prev,
            keel_audit_hash(v_prev, p_tenant, v_seq, v_ts, p_user, p_workflow_id, p_step_id,
                            p_kind, p_subject, p_decision, p_reason, p_data, p_idem_key), 2)
    returning a.id into v_id;
    update audit_heads h set seq = v_seq,
        hash = (select a.hash from audit_log a where a.id = v_id)
        where h.tenant = p_tenant;
    return query select a.id, a.seq, a.ts, a.prev_hash, a.hash, false from audit_log a
        where a.id = v_id;
end $$;
