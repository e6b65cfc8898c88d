-- Found by tests/test_attack_app_role.py: 012 granted keel_app `update` on ALL sequences
-- before revoking the audit tables, and the audit table's own id sequence was among them.
-- With it keel_app could `setval('audit_log_id_seq', 1)`: every later append, of every
-- tenant, then collides on audit_log's primary key and fails (no gate decision can be
-- recorded, so no run can act). The sequence belongs to keel_audit_owner with its table;
-- keel_audit_append (security definer) still draws ids from it, keel_app cannot move it.
revoke all on sequence audit_log_id_seq from public, keel_app;
alter sequence audit_log_id_seq owner to keel_audit_owner;

-- Found by the same tests: keel_policy_record took the hash on the caller's word, so keel_app
-- could record, under the hash of a real policy text, a different body (first sight wins:
-- the real text, loaded later, was then never recorded). The hash is the text's sha256
-- (keel.policy.policy_hash); a record whose hash is not its body's is refused.
create or replace function keel_policy_record(
    p_hash text, p_version text, p_source text, p_changed_by text, p_changed_at timestamptz,
    p_loaded_by text, p_body text) returns boolean
language plpgsql security definer set search_path = public, pg_temp as $$
begin
    if p_hash is distinct from encode(sha256(convert_to(p_body, 'UTF8')), 'hex') then
        raise exception 'policy version hash % is not the sha256 of its body', p_hash
            using errcode = 'check_violation';
    end if;
    insert into policy_versions (hash, version, source, changed_by, changed_at, loaded_by, body)
    values (p_hash, p_version, p_source, p_changed_by, p_changed_at, p_loaded_by, p_body)
    on conflict (hash) do nothing;
    return found;
end $$;
alter function keel_policy_record(text, text, text, text, timestamptz, text, text) owner to keel_audit_owner;
