-- Issue 23: a tool step's first two round trips in one. run_tool used to send, before the
-- tool ran, ten statements in two pipelined round trips: the key's record and the breaker's
-- state (one transaction), then the permission decision's audit row, the step's hold, COMMIT,
-- and the effect transaction's BEGIN, advisory lock and second look at the record. Each
-- statement costs the worker client CPU, each round trip a wait. These two functions let it
-- send four statements in ONE round trip with the same transactions and the same order:
--
--   begin; select ... from keel_tool_step_open(...);   -- decision + hold
--   commit and chain;                                  -- committed; the effect's begins
--   select keel_tool_effect_lock(key);                 -- its lock, and the record under it
--
-- Both are SECURITY INVOKER: they run with the caller's rights and do nothing the caller
-- could not do statement by statement (the audit row is appended through
-- keel_audit_append, the definer function keel_app already calls; the hold through
-- keel_budget_reserve). So they open no new way to write the audit tables: a forged row
-- costs exactly what a direct keel_audit_append call costs. search_path is pinned so a
-- temporary table of the caller's cannot stand in for tool_effects or circuit_breakers.

-- The key's record and the breaker's row; only when the key has no record, the permission
-- row (keel_audit_append: idempotent by its idem_key) and the step's hold
-- (keel_budget_reserve: idempotent by its key; a ledger refusal raises its KL00x error and
-- aborts the caller's transaction, the audit row with it). A replay (a record exists)
-- appends no row and places no hold. The caller commits: neither the tenant's audit head nor
-- the budget rows stay locked past that commit.
create or replace function keel_tool_step_open(
    p_key text, p_scope text,
    p_tenant text, p_user text, p_workflow_id text, p_step_id text, p_kind text,
    p_subject text, p_decision text, p_reason text, p_data jsonb, p_idem_key text,
    p_res_key text, p_scopes text[], p_amount bigint, p_min bigint, p_max_tokens integer,
    p_ttl_seconds integer, p_res_kind text, p_res_subject text, p_run_id text,
    p_res_step_id text, p_tier text, p_hash text)
returns table (o_record jsonb, o_state text, o_opened_until timestamptz,
               o_probe_lease_until timestamptz, o_now timestamptz, o_failures integer,
               o_reserved jsonb)
language plpgsql set search_path = public, pg_temp as $$
begin
    o_record := (select e.result from tool_effects e where e.idempotency_key = p_key);
    select b.state, b.opened_until, b.probe_lease_until, b.consecutive_failures
      into o_state, o_opened_until, o_probe_lease_until, o_failures
      from circuit_breakers b where b.scope = p_scope;
    o_now := now();
    if o_record is null then
        perform keel_audit_append(p_tenant, p_user, p_workflow_id, p_step_id, p_kind,
                                  p_subject, p_decision, p_reason, p_data, p_idem_key);
        o_reserved := keel_budget_reserve(p_res_key, p_scopes, p_amount, p_min, p_max_tokens,
                                        p_ttl_seconds, p_res_kind, p_res_subject, p_run_id,
                                        p_res_step_id, p_tier, p_hash);
    end if;
    return next;
end $$;

-- The effect transaction's first statement: the key's advisory lock (the one
-- activities/tools/effects.py takes), then the key's record, read AFTER the lock is held (a
-- volatile function's every query takes a fresh snapshot, so an attempt that committed while
-- this one waited is seen). Null: no record, the tool may run under the lock.
create or replace function keel_tool_effect_lock(p_key text) returns jsonb
language plpgsql set search_path = public, pg_temp as $$
begin
    perform pg_advisory_xact_lock(hashtextextended(p_key, 7));
    return (select e.result from tool_effects e where e.idempotency_key = p_key);
end $$;
