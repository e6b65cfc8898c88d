-- UPGRADE PATH ONLY. The ledger's current schema reads in one file, baseline/ledger.sql,
-- which a new database gets instead of 002, 008 and 009; this file upgrades databases that
-- applied the steps before it, and records why the step was taken.
--
-- Budget ledger, second cut: a lean hot path and batches.
--
-- Same contract as 002 (which stays the record of the tables): same functions, same answers,
-- same refusals. What changes is the cost per operation and how many operations share one
-- transaction:
--
--  * Lock order is now: key locks (the reserve advisory lock on the key, the reservation row
--    for commit / release / extend), then scope rows with ONE rule: a tenant row is locked
--    before any row under it, and tenant rows in sorted order. Every path includes its tenant,
--    so a wait for a non-tenant row is only ever possible by a transaction that already holds
--    that row's tenant, which the holder also holds: impossible. So waits happen only on
--    tenant rows, which everyone takes in sorted order: no deadlock. This lets the hot path
--    update the tenant row (which is the lock) and then the rest of the path in one plain
--    UPDATE, instead of locking every row in a sorted sub-select first (which cost an extra
--    WAL record per row and most of the old reserve's time).
--  * Missing scope rows are created only when an UPDATE finds fewer rows than the path has
--    (the first call of a run), not probed on every call.
--  * commit and release keep their idempotency record in the reservation row (commit_hash,
--    release_hash) instead of a second table; the answer is rebuilt from the row's columns.
--    keel_budget_ops still holds extend answers, no-op releases and pre-008 operations.
--  * Core functions return refusals as values ({"error": SQLSTATE, "message": ...}), so that
--    keel_budget_batch() can run many operations of one worker in ONE transaction (one WAL
--    flush, one round trip) without subtransactions; the public functions raise them as before.

alter table keel_budget_reservations
    add column if not exists commit_hash text,
    add column if not exists release_hash text;

-- The scopes plus all their ancestors, deduplicated and sorted (tenant first). String
-- operations only: the 002 version called a regexp per ancestor.
create or replace function keel_scope_closure(p_scopes text[]) returns text[]
language plpgsql immutable as $$
declare
    v_out   text[] := '{}';
    v_s     text;
    v_run   integer;
    v_parts text[];
    v_p     text;
    i       integer;
begin
    foreach v_s in array coalesce(p_scopes, '{}') loop
        if v_s is null or v_s = '' or v_s like '%//%' or v_s like '/%' then
            raise exception using errcode = '22023', message = format('invalid scope %L', v_s);
        end if;
        if v_s = any(v_out) then
            continue;
        end if;
        v_out := v_out || v_s;
        -- A run segment swallows everything after '/run:' (workflow ids may contain '/').
        v_run := strpos(v_s, '/run:');
        v_parts := string_to_array(case when v_run > 0 then left(v_s, v_run - 1) else v_s end, '/');
        v_p := v_parts[1];
        for i in 1 .. array_length(v_parts, 1) - case when v_run > 0 then 0 else 1 end loop
            if i > 1 then
                v_p := v_p || '/' || v_parts[i];
            end if;
            if not v_p = any(v_out) then
                v_out := v_out || v_p;
            end if;
        end loop;
    end loop;
    return array(select s from unnest(v_out) s order by s collate "C");
end $$;

-- Creates the missing rows of a closure (sorted, so concurrent creators queue in one order).
create or replace function keel_budget_ensure_scopes(p_scopes text[]) returns void
language sql as $$
    insert into keel_budget_scopes (scope, parent)
        select s, keel_scope_parent(s) from unnest(p_scopes) s
         where not exists (select 1 from keel_budget_scopes b where b.scope = s)
         order by s collate "C"
        on conflict (scope) do nothing
$$;

-- Locks tenant rows in sorted order (creating missing ones): the first scope-row locks of
-- any operation that does not take them by updating.
create or replace function keel_budget_lock_tenants(p_tenants text[]) returns void
language plpgsql as $$
declare
    v_t text;
begin
    foreach v_t in array array(select distinct t collate "C" from unnest(p_tenants) t order by 1) loop
        perform 1 from keel_budget_scopes where scope = v_t for no key update;
        if not found then
            insert into keel_budget_scopes (scope, parent) values (v_t, null)
                on conflict (scope) do nothing;
            perform 1 from keel_budget_scopes where scope = v_t for no key update;
        end if;
    end loop;
end $$;

create or replace function keel_budget_err(p_code text, p_message text) returns jsonb
language sql immutable as $$ select jsonb_build_object('error', p_code, 'message', p_message) $$;

-- Raises a core function's refusal; passes any other answer through.
create or replace function keel_budget_raise(p_answer jsonb) returns jsonb
language plpgsql as $$
begin
    if p_answer ? 'error' then
        raise exception using errcode = p_answer->>'error', message = p_answer->>'message';
    end if;
    return p_answer;
end $$;

-- Core of reserve. The caller holds the key's advisory lock (lock order: key first).
create or replace function keel_budget_reserve_core(
    p_key text, p_scopes text[], p_amount bigint, p_min bigint, p_max_tokens integer,
    p_ttl_seconds integer, p_kind text, p_subject text, p_run_id text, p_step_id text,
    p_tier text, p_hash text
) returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    v_prev_hash   text;
    v_prev_answer jsonb;
    v_scopes  text[];
    v_tenants text[];
    v_rest    text[];
    v_done    text[] := '{}';
    v_t       text;
    r         record;
    e_scopes  text[] := '{}'; e_limits bigint[] := '{}'; e_avail bigint[] := '{}';
    a_scopes  text[] := '{}'; a_limits bigint[] := '{}'; a_avail bigint[] := '{}';
    v_any_observe boolean := false;
    v_enf     jsonb;
    v_would   jsonb;
    v_observed boolean := false;
    v_grant   bigint;
    v_answer  jsonb;
begin
    if p_amount < 0 or p_min < 0 or p_min > p_amount or p_ttl_seconds <= 0 then
        return keel_budget_err('22023',
            'reserve needs 0 <= min_micros <= amount_micros and ttl_seconds > 0');
    end if;
    select payload_hash, answer into v_prev_hash, v_prev_answer
      from keel_budget_reservations where key = p_key;
    if found then
        if v_prev_hash <> p_hash then
            return keel_budget_err('KL001', format(
                'idempotency key %s was already used for a different reserve request', p_key));
        end if;
        return v_prev_answer || '{"replayed": true}';
    end if;

    v_scopes := keel_scope_closure(p_scopes);
    v_tenants := array(select s from unnest(v_scopes) s where strpos(s, '/') = 0);
    v_rest := array(select s from unnest(v_scopes) s where strpos(s, '/') > 0);
    -- Optimistic: hold the full amount while locking and reading; a DENY or a partial grant
    -- gives the difference back below. Tenant rows first, one by one in order (the UPDATE is
    -- the lock), then (the null group) the rest of the path in one statement (order free: see
    -- the header).
    for i in 0 .. 1 loop
        foreach v_t in array array_append(v_tenants, null) loop
            for r in update keel_budget_scopes b
                        set reserved_micros = b.reserved_micros + p_amount, updated_at = now()
                      where b.scope = any(case when v_t is null then v_rest else array[v_t] end)
                        and not (b.scope = any(v_done))
                  returning b.scope, b.limit_micros,
                            b.limit_micros - b.spent_micros - b.reserved_micros + p_amount as avail,
                            b.observe loop
                v_done := v_done || r.scope::text;
                if r.limit_micros is not null then
                    a_scopes := a_scopes || r.scope::text; a_limits := a_limits || r.limit_micros;
                    a_avail := a_avail || r.avail;
                    if r.observe then
                        v_any_observe := true;
                    else
                        e_scopes := e_scopes || r.scope::text; e_limits := e_limits || r.limit_micros;
                        e_avail := e_avail || r.avail;
                    end if;
                end if;
            end loop;
        end loop;
        exit when cardinality(v_done) = cardinality(v_scopes);
        -- First call on this path: create the missing rows (new rows appear unlimited),
        -- then the second pass charges just those.
        perform keel_budget_ensure_scopes(v_scopes);
    end loop;

    v_enf := keel_budget_decide(e_scopes, e_limits, e_avail, p_amount, p_min, p_max_tokens);
    if v_any_observe then
        v_would := keel_budget_decide(a_scopes, a_limits, a_avail, p_amount, p_min, p_max_tokens);
        v_observed := v_would->>'decision' <> v_enf->>'decision'
                      or (v_would->>'granted_micros')::bigint < (v_enf->>'granted_micros')::bigint;
    end if;
    v_grant := (v_enf->>'granted_micros')::bigint;  -- 0 on DENY
    if v_grant <> p_amount then
        update keel_budget_scopes  -- rows already locked above: order no longer matters
           set reserved_micros = reserved_micros - (p_amount - v_grant), updated_at = now()
         where scope = any(v_scopes);
    end if;

    v_answer := jsonb_build_object(
        'decision', v_enf->'decision', 'key', p_key, 'granted_micros', v_grant,
        'remaining_micros', v_enf->'remaining_micros', 'caps', v_enf->'caps',
        'reason', case when v_observed
                       then format('observe: would be %s (%s)', v_would->>'decision',
                                   v_would->>'reason')
                       else v_enf->>'reason' end,
        'observed', v_observed,
        'would_decision', case when v_observed then v_would->'decision' end,
        'replayed', false);
    insert into keel_budget_reservations (
        key, scopes, requested_micros, amount_micros, status, expires_at, kind, subject,
        run_id, step_id, tier, decision, would_decision, caps, reason, observed, answer,
        payload_hash)
    values (
        p_key, v_scopes, p_amount, v_grant,
        case when v_enf->>'decision' = 'DENY' then 'denied' else 'held' end,
        now() + make_interval(secs => p_ttl_seconds), p_kind, p_subject, p_run_id, p_step_id,
        p_tier, v_enf->>'decision', v_answer->>'would_decision', v_enf->'caps',
        v_answer->>'reason', v_observed, v_answer, p_hash);
    return v_answer;
end $$;

create or replace function keel_budget_reserve(
    p_key text, p_scopes text[], p_amount bigint, p_min bigint, p_max_tokens integer,
    p_ttl_seconds integer, p_kind text, p_subject text, p_run_id text, p_step_id text,
    p_tier text, p_hash text
) returns jsonb
language plpgsql as $$
begin
    -- Serialises concurrent calls with the same key (no row exists yet to lock).
    perform pg_advisory_xact_lock(hashtextextended(p_key, 7345002));
    return keel_budget_raise(keel_budget_reserve_core(
        p_key, p_scopes, p_amount, p_min, p_max_tokens, p_ttl_seconds, p_kind, p_subject,
        p_run_id, p_step_id, p_tier, p_hash));
end $$;

create or replace function keel_budget_commit_answer(
    p_key text, p_actual bigint, p_held bigint, p_extra bigint, p_debt bigint,
    p_over boolean, p_late boolean, p_replayed boolean
) returns jsonb
language sql immutable as $$
    select jsonb_build_object(
        'key', p_key, 'committed_micros', p_actual,
        'refunded_micros', greatest(p_held - p_actual, 0), 'overrun_micros', p_extra,
        'debt_micros', p_debt, 'over_limit', p_over, 'late', p_late, 'replayed', p_replayed)
$$;

-- Core of commit: locks the reservation row itself (key lock) if the caller did not.
create or replace function keel_budget_commit_core(p_key text, p_actual bigint, p_hash text)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    v_res      record;
    v_replay   jsonb;
    v_held     bigint;
    v_extra    bigint;
    v_rest     bigint;
    v_debt     bigint;
    v_beyond   bigint;
    v_max_debt bigint := 0;
    v_over     boolean := false;
    v_scopes   text[] := '{}';
    v_debts    bigint[] := '{}';
    v_beyonds  bigint[] := '{}';
    r          record;
begin
    if p_actual < 0 then
        return keel_budget_err('22023', 'actual_micros must be >= 0');
    end if;
    select status, amount_micros, actual_micros, scopes, commit_hash, overrun_micros,
           debt_micros, over_limit, late into v_res
      from keel_budget_reservations where key = p_key for update;
    if not found then
        return keel_budget_err('KL002', format('no reservation %s', p_key));
    end if;
    if v_res.status = 'committed' then
        if v_res.commit_hash is null then  -- committed before 008: answer in keel_budget_ops
            v_replay := keel_budget_op_replay(p_key || '/commit', p_hash);
            if v_replay is not null then
                return v_replay;
            end if;
        elsif v_res.commit_hash <> p_hash then
            return keel_budget_err('KL001', format(
                'idempotency key %s/commit was already used with a different payload', p_key));
        else
            return keel_budget_commit_answer(
                p_key, v_res.actual_micros,
                case when v_res.late then 0 else v_res.amount_micros end,
                v_res.overrun_micros, v_res.debt_micros, v_res.over_limit, v_res.late, true);
        end if;
    end if;
    if v_res.status not in ('held', 'expired') then
        return keel_budget_err('KL003', format(
            'reservation %s is %s; nothing to commit', p_key, v_res.status));
    end if;
    -- An expired hold already gave its money back: the whole actual is new spend (late).
    v_held := case when v_res.status = 'held' then v_res.amount_micros else 0 end;
    v_extra := greatest(p_actual - v_held, 0);
    if v_extra > 0 then
        -- Overrun: decide per scope how much fits, goes to debt, or is flagged over limit.
        -- Sorted order puts each tenant before the rows under it (the lock rule).
        for r in select scope, limit_micros, spent_micros, reserved_micros, debt_micros,
                        overdraft_micros, observe
                   from keel_budget_scopes where scope = any(v_res.scopes)
                  order by scope for no key update loop
            v_debt := 0;
            v_beyond := 0;
            if r.limit_micros is not null and not r.observe then
                -- The hold is already counted in reserved; only the extra needs new room.
                v_rest := greatest(v_extra - greatest(r.limit_micros - r.spent_micros
                                                      - r.reserved_micros, 0), 0);
                v_debt := least(v_rest, greatest(r.overdraft_micros - r.debt_micros, 0));
                v_beyond := v_rest - v_debt;
            end if;
            v_scopes := v_scopes || r.scope::text;
            v_debts := v_debts || v_debt;
            v_beyonds := v_beyonds || v_beyond;
            v_max_debt := greatest(v_max_debt, v_debt);
            v_over := v_over or v_beyond > 0;
        end loop;
        update keel_budget_scopes b
           set spent_micros = b.spent_micros + p_actual,
               reserved_micros = b.reserved_micros - v_held,
               debt_micros = b.debt_micros + x.debt,
               over_limit_micros = b.over_limit_micros + x.beyond,
               updated_at = now()
          from unnest(v_scopes, v_debts, v_beyonds) as x(scope, debt, beyond)
         where b.scope = x.scope;
    else
        -- Usual case: the tenant row (the lock), then the rest of the path.
        update keel_budget_scopes
           set spent_micros = spent_micros + p_actual, reserved_micros = reserved_micros - v_held,
               updated_at = now()
         where scope = v_res.scopes[1];
        update keel_budget_scopes
           set spent_micros = spent_micros + p_actual, reserved_micros = reserved_micros - v_held,
               updated_at = now()
         where scope = any(v_res.scopes[2:]);
    end if;
    update keel_budget_reservations
       set status = 'committed', actual_micros = p_actual, overrun_micros = v_extra,
           debt_micros = v_max_debt, over_limit = v_over, late = (v_res.status = 'expired'),
           commit_hash = p_hash, updated_at = now()
     where key = p_key;
    return keel_budget_commit_answer(p_key, p_actual, v_held, v_extra, v_max_debt, v_over,
                                     v_res.status = 'expired', false);
end $$;

create or replace function keel_budget_commit(p_key text, p_actual bigint, p_hash text)
returns jsonb
language sql as $$ select keel_budget_raise(keel_budget_commit_core(p_key, p_actual, p_hash)) $$;

create or replace function keel_budget_release_core(p_key text, p_reason text, p_hash text)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    v_res     record;
    v_replay  jsonb;
    v_result  jsonb;
begin
    select status, amount_micros, scopes, release_hash into v_res
      from keel_budget_reservations where key = p_key for update;
    if not found then
        return keel_budget_err('KL002', format('no reservation %s', p_key));
    end if;
    if v_res.status = 'released' and v_res.release_hash is not null then
        if v_res.release_hash <> p_hash then
            return keel_budget_err('KL001', format(
                'idempotency key %s/release was already used with a different payload', p_key));
        end if;
        return jsonb_build_object('key', p_key, 'released_micros', v_res.amount_micros,
                                  'status', 'released', 'replayed', true);
    end if;
    if v_res.status <> 'held' then
        -- A no-op (already committed, expired, denied, or released before 008): its first
        -- answer is kept in keel_budget_ops so a replay reports the same status.
        v_replay := keel_budget_op_replay(p_key || '/release', p_hash);
        if v_replay is not null then
            return v_replay;
        end if;
        v_result := jsonb_build_object('key', p_key, 'released_micros', 0,
                                       'status', v_res.status, 'replayed', false);
        insert into keel_budget_ops (op_key, reservation_key, op, payload_hash, result)
            values (p_key || '/release', p_key, 'release', p_hash, v_result);
        return v_result;
    end if;
    update keel_budget_scopes
       set reserved_micros = reserved_micros - v_res.amount_micros, updated_at = now()
     where scope = v_res.scopes[1];
    update keel_budget_scopes
       set reserved_micros = reserved_micros - v_res.amount_micros, updated_at = now()
     where scope = any(v_res.scopes[2:]);
    update keel_budget_reservations
       set status = 'released', release_reason = coalesce(p_reason, ''), release_hash = p_hash,
           updated_at = now()
     where key = p_key;
    return jsonb_build_object('key', p_key, 'released_micros', v_res.amount_micros,
                              'status', 'released', 'replayed', false);
end $$;

create or replace function keel_budget_release(p_key text, p_reason text, p_hash text)
returns jsonb
language sql as $$ select keel_budget_raise(keel_budget_release_core(p_key, p_reason, p_hash)) $$;

-- A batch run operation by operation through the single-operation cores: the reference
-- semantics of keel_budget_batch (the equivalence test compares the two), and its path for
-- the rare batch that names one key twice. Each element of p_ops is {"op": "reserve" |
-- "commit" | "release", "key", "hash", ...the op's fields}; the answer is an array in the
-- same order, refusals as {"error", "message"} values. Locks follow the ledger's order:
-- every key first (sorted), then every tenant (sorted).
create or replace function keel_budget_batch_serial(p_ops jsonb) returns jsonb
language plpgsql as $$
declare
    r      record;
    v_out  jsonb[] := '{}';
    v_keys text[];
begin
    perform pg_advisory_xact_lock(hashtextextended(k, 7345002))
       from (select distinct o->>'key' as k from jsonb_array_elements(p_ops) o
              where o->>'op' = 'reserve' order by 1) x;
    v_keys := array(select o->>'key' from jsonb_array_elements(p_ops) o where o->>'op' <> 'reserve');
    perform 1 from keel_budget_reservations where key = any(v_keys) order by key for update;
    perform keel_budget_lock_tenants(array(
        select split_part(s, '/', 1) from jsonb_array_elements(p_ops) o,
               jsonb_array_elements_text(o->'scopes') s
         where o->>'op' = 'reserve' and split_part(s, '/', 1) <> ''
        union
        select scopes[1] from keel_budget_reservations where key = any(v_keys)));
    for r in select * from jsonb_to_recordset(p_ops) as x(
                 op text, key text, hash text, scopes text[], amount bigint, min bigint,
                 max_tokens integer, ttl integer, kind text, subject text, run_id text,
                 step_id text, tier text, actual bigint, reason text) loop
        v_out := v_out || case r.op
            when 'reserve' then keel_budget_reserve_core(
                r.key, r.scopes, r.amount, r.min, r.max_tokens, r.ttl, r.kind, r.subject,
                r.run_id, r.step_id, r.tier, r.hash)
            when 'commit' then keel_budget_commit_core(r.key, r.actual, r.hash)
            when 'release' then keel_budget_release_core(r.key, r.reason, r.hash)
            else keel_budget_err('22023', format('unknown ledger op %L', r.op)) end;
    end loop;
    return to_jsonb(v_out);
end $$;

-- Many operations of one worker in ONE transaction: one round trip, one WAL flush and one
-- tenant-row lock for the lot, and set-based writes (one UPDATE of the scope rows, one
-- INSERT of the new reservations, one UPDATE per kind of settlement) instead of several
-- statements per operation. Decisions are made in order, in memory, on the locked rows, so
-- the answers and the final state are exactly those of keel_budget_batch_serial (same
-- input/output), which the test suite checks on random operation sequences.
create or replace function keel_budget_batch(p_ops jsonb) returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    o        record;
    q        record;
    i        integer := 0;
    k        integer;
    x        integer;
    v_n      integer := jsonb_array_length(p_ops);
    v_out    jsonb[] := '{}';
    v_ans    jsonb;
    -- the operations
    p_op     text[] := '{}'; p_key text[] := '{}'; p_hash text[] := '{}';
    p_amount bigint[] := '{}'; p_min bigint[] := '{}'; p_tokens integer[] := '{}';
    p_ttl    integer[] := '{}'; p_kind text[] := '{}'; p_subject text[] := '{}';
    p_run    text[] := '{}'; p_step text[] := '{}'; p_tier text[] := '{}';
    p_actual bigint[] := '{}'; p_reason text[] := '{}';
    p_cl     integer[] := '{}';  -- where op i's scopes start in c_flat (0 = none)
    p_cn     integer[] := '{}';  -- how many
    c_flat   text[] := '{}';
    v_cl     text[];
    -- reservations named by the batch, loaded once (and locked for commit / release)
    r_key    text[] := '{}'; r_status text[] := '{}'; r_amount bigint[] := '{}';
    r_actual bigint[] := '{}'; r_scopes text[] := '{}'; r_hash text[] := '{}';
    r_chash  text[] := '{}'; r_rhash text[] := '{}'; r_answer jsonb[] := '{}';
    r_overrun bigint[] := '{}'; r_debt bigint[] := '{}'; r_over boolean[] := '{}';
    r_late   boolean[] := '{}';
    ri       integer;
    -- scope rows, loaded once after the tenant locks, and the deltas to write back
    s_name   text[]; s_limit bigint[]; s_spent bigint[]; s_res bigint[]; s_debt bigint[];
    s_odraft bigint[]; s_over bigint[]; s_obs boolean[];
    d_spent  bigint[]; d_res bigint[]; d_debt bigint[]; d_over bigint[];
    v_all    text[];
    si       integer;
    -- one reservation's decision
    e_scopes text[]; e_limits bigint[]; e_avail bigint[];
    a_scopes text[]; a_limits bigint[]; a_avail bigint[];
    v_any_observe boolean;
    v_enf    jsonb; v_would jsonb; v_observed boolean; v_grant bigint;
    -- one commit's settlement
    v_held   bigint; v_extra bigint; v_rest bigint; v_d bigint; v_b bigint;
    v_maxdebt bigint; v_isover boolean;
    -- rows to write
    n_key    text[] := '{}'; n_scopes text[] := '{}'; n_req bigint[] := '{}';
    n_amount bigint[] := '{}'; n_status text[] := '{}'; n_ttl integer[] := '{}';
    n_kind   text[] := '{}'; n_subject text[] := '{}'; n_run text[] := '{}';
    n_step   text[] := '{}'; n_tier text[] := '{}'; n_dec text[] := '{}';
    n_would  text[] := '{}'; n_caps jsonb[] := '{}'; n_reason text[] := '{}';
    n_obs    boolean[] := '{}'; n_answer jsonb[] := '{}'; n_hash text[] := '{}';
    m_key    text[] := '{}'; m_actual bigint[] := '{}'; m_overrun bigint[] := '{}';
    m_debt   bigint[] := '{}'; m_over boolean[] := '{}'; m_late boolean[] := '{}';
    m_hash   text[] := '{}';
    l_key    text[] := '{}'; l_reason text[] := '{}'; l_hash text[] := '{}';
    v_keys   text[];
begin
    if v_n = 0 then
        return '[]';
    end if;
    -- (Arrays, not sub-selects over p_ops, in the statements below: a generic plan cannot
    -- size a set-returning function and would scan the whole reservations table.)
    v_keys := array(select distinct e->>'key' from jsonb_array_elements(p_ops) e order by 1);
    if cardinality(v_keys) < v_n then
        return keel_budget_batch_serial(p_ops);  -- one key twice: order-dependent, run serially
    end if;
    -- Key locks, sorted: advisory for reservations, the rows for settlements.
    perform pg_advisory_xact_lock(hashtextextended(e->>'key', 7345002))
       from jsonb_array_elements(p_ops) e where e->>'op' = 'reserve' order by e->>'key';
    for q in select key, status, amount_micros, actual_micros, scopes, payload_hash,
                    commit_hash, release_hash, answer, overrun_micros, debt_micros,
                    over_limit, late
               from keel_budget_reservations where key = any(v_keys)
              order by key for update loop
        r_key := r_key || q.key; r_status := r_status || q.status;
        r_amount := r_amount || q.amount_micros; r_actual := r_actual || q.actual_micros;
        r_scopes := r_scopes || array_to_string(q.scopes, chr(31)); r_hash := r_hash || q.payload_hash;
        r_chash := r_chash || q.commit_hash; r_rhash := r_rhash || q.release_hash;
        r_answer := r_answer || q.answer; r_overrun := r_overrun || q.overrun_micros;
        r_debt := r_debt || q.debt_micros; r_over := r_over || q.over_limit; r_late := r_late || q.late;
    end loop;

    -- Unpack the operations and find every scope they touch.
    for o in select * from jsonb_to_recordset(p_ops) as y(
                 op text, key text, hash text, scopes text[], amount bigint, min bigint,
                 max_tokens integer, ttl integer, kind text, subject text, run_id text,
                 step_id text, tier text, actual bigint, reason text) loop
        i := i + 1;
        p_op := p_op || o.op; p_key := p_key || o.key; p_hash := p_hash || o.hash;
        p_amount := p_amount || o.amount; p_min := p_min || o.min; p_tokens := p_tokens || o.max_tokens;
        p_ttl := p_ttl || o.ttl; p_kind := p_kind || o.kind; p_subject := p_subject || o.subject;
        p_run := p_run || o.run_id; p_step := p_step || o.step_id; p_tier := p_tier || o.tier;
        p_actual := p_actual || o.actual; p_reason := p_reason || o.reason;
        ri := array_position(r_key, o.key);
        v_cl := null;
        if o.op = 'reserve' and ri is null then
            v_cl := keel_scope_closure(o.scopes);
        elsif o.op in ('commit', 'release') and ri is not null then
            v_cl := string_to_array(r_scopes[ri], chr(31));
        end if;
        if v_cl is null then
            p_cl := p_cl || 0; p_cn := p_cn || 0;
        else
            p_cl := p_cl || (cardinality(c_flat) + 1); p_cn := p_cn || cardinality(v_cl);
            c_flat := c_flat || v_cl;
        end if;
    end loop;

    -- Scope rows: tenants locked first (sorted), then everything read once. Rows under a
    -- locked tenant cannot change under us (every writer takes the tenant first).
    v_all := array(select distinct s collate "C" from unnest(c_flat) s order by 1);
    perform keel_budget_lock_tenants(array(select s from unnest(v_all) s where strpos(s, '/') = 0));
    for x in 1 .. 2 loop
        select array_agg(scope order by scope), array_agg(limit_micros order by scope),
               array_agg(spent_micros order by scope), array_agg(reserved_micros order by scope),
               array_agg(debt_micros order by scope), array_agg(overdraft_micros order by scope),
               array_agg(over_limit_micros order by scope), array_agg(observe order by scope)
          into s_name, s_limit, s_spent, s_res, s_debt, s_odraft, s_over, s_obs
          from keel_budget_scopes where scope = any(v_all);
        exit when coalesce(cardinality(s_name), 0) = cardinality(v_all);
        perform keel_budget_ensure_scopes(v_all);  -- first use of some path: create, reload
    end loop;
    s_name := coalesce(s_name, '{}');
    d_spent := array_fill(0::bigint, array[cardinality(s_name)]);
    d_res := d_spent; d_debt := d_spent; d_over := d_spent;

    for i in 1 .. v_n loop
        ri := array_position(r_key, p_key[i]);
        if p_op[i] = 'reserve' then
            if ri is not null then
                v_ans := case when r_hash[ri] <> p_hash[i] then keel_budget_err('KL001', format(
                                  'idempotency key %s was already used for a different reserve request',
                                  p_key[i]))
                              else r_answer[ri] || '{"replayed": true}' end;
            elsif p_amount[i] < 0 or p_min[i] < 0 or p_min[i] > p_amount[i] or p_ttl[i] <= 0 then
                v_ans := keel_budget_err('22023',
                    'reserve needs 0 <= min_micros <= amount_micros and ttl_seconds > 0');
            else
                e_scopes := '{}'; e_limits := '{}'; e_avail := '{}';
                a_scopes := '{}'; a_limits := '{}'; a_avail := '{}';
                v_any_observe := false; v_observed := false; v_would := null;
                for k in p_cl[i] .. p_cl[i] + p_cn[i] - 1 loop
                    si := array_position(s_name, c_flat[k]);
                    if s_limit[si] is not null then
                        a_scopes := a_scopes || s_name[si]; a_limits := a_limits || s_limit[si];
                        a_avail := a_avail || (s_limit[si] - s_spent[si] - s_res[si]);
                        if s_obs[si] then
                            v_any_observe := true;
                        else
                            e_scopes := e_scopes || s_name[si]; e_limits := e_limits || s_limit[si];
                            e_avail := e_avail || (s_limit[si] - s_spent[si] - s_res[si]);
                        end if;
                    end if;
                end loop;
                v_enf := keel_budget_decide(e_scopes, e_limits, e_avail, p_amount[i], p_min[i], p_tokens[i]);
                if v_any_observe then
                    v_would := keel_budget_decide(a_scopes, a_limits, a_avail, p_amount[i], p_min[i],
                                                  p_tokens[i]);
                    v_observed := v_would->>'decision' <> v_enf->>'decision'
                                  or (v_would->>'granted_micros')::bigint
                                     < (v_enf->>'granted_micros')::bigint;
                end if;
                v_grant := (v_enf->>'granted_micros')::bigint;
                if v_grant <> 0 then
                    for k in p_cl[i] .. p_cl[i] + p_cn[i] - 1 loop
                        si := array_position(s_name, c_flat[k]);
                        s_res[si] := s_res[si] + v_grant; d_res[si] := d_res[si] + v_grant;
                    end loop;
                end if;
                v_ans := jsonb_build_object(
                    'decision', v_enf->'decision', 'key', p_key[i], 'granted_micros', v_grant,
                    'remaining_micros', v_enf->'remaining_micros', 'caps', v_enf->'caps',
                    'reason', case when v_observed
                                   then format('observe: would be %s (%s)', v_would->>'decision',
                                               v_would->>'reason')
                                   else v_enf->>'reason' end,
                    'observed', v_observed,
                    'would_decision', case when v_observed then v_would->'decision' end,
                    'replayed', false);
                n_key := n_key || p_key[i];
                n_scopes := n_scopes || array_to_string(c_flat[p_cl[i]:p_cl[i] + p_cn[i] - 1], chr(31));
                n_req := n_req || p_amount[i]; n_amount := n_amount || v_grant;
                n_status := n_status || case when v_enf->>'decision' = 'DENY' then 'denied' else 'held' end;
                n_ttl := n_ttl || p_ttl[i]; n_kind := n_kind || p_kind[i];
                n_subject := n_subject || p_subject[i]; n_run := n_run || p_run[i];
                n_step := n_step || p_step[i]; n_tier := n_tier || p_tier[i];
                n_dec := n_dec || (v_enf->>'decision'); n_would := n_would || (v_ans->>'would_decision');
                n_caps := n_caps || (v_enf->'caps'); n_reason := n_reason || (v_ans->>'reason');
                n_obs := n_obs || v_observed; n_answer := n_answer || v_ans; n_hash := n_hash || p_hash[i];
            end if;
        elsif p_op[i] = 'commit' then
            if ri is null then
                v_ans := keel_budget_err('KL002', format('no reservation %s', p_key[i]));
            elsif p_actual[i] < 0 then
                v_ans := keel_budget_err('22023', 'actual_micros must be >= 0');
            elsif r_status[ri] = 'committed' and r_chash[ri] is null then
                v_ans := coalesce(keel_budget_op_replay(p_key[i] || '/commit', p_hash[i]),
                                  keel_budget_err('KL003', format(
                                      'reservation %s is committed; nothing to commit', p_key[i])));
            elsif r_status[ri] = 'committed' then
                v_ans := case when r_chash[ri] <> p_hash[i] then keel_budget_err('KL001', format(
                                  'idempotency key %s/commit was already used with a different payload',
                                  p_key[i]))
                              else keel_budget_commit_answer(
                                  p_key[i], r_actual[ri], case when r_late[ri] then 0 else r_amount[ri] end,
                                  r_overrun[ri], r_debt[ri], r_over[ri], r_late[ri], true) end;
            elsif r_status[ri] not in ('held', 'expired') then
                v_ans := keel_budget_err('KL003', format(
                    'reservation %s is %s; nothing to commit', p_key[i], r_status[ri]));
            else
                v_held := case when r_status[ri] = 'held' then r_amount[ri] else 0 end;
                v_extra := greatest(p_actual[i] - v_held, 0);
                v_maxdebt := 0; v_isover := false;
                for k in p_cl[i] .. p_cl[i] + p_cn[i] - 1 loop
                    si := array_position(s_name, c_flat[k]);
                    v_d := 0; v_b := 0;
                    if v_extra > 0 and s_limit[si] is not null and not s_obs[si] then
                        v_rest := greatest(v_extra - greatest(s_limit[si] - s_spent[si] - s_res[si], 0), 0);
                        v_d := least(v_rest, greatest(s_odraft[si] - s_debt[si], 0));
                        v_b := v_rest - v_d;
                    end if;
                    v_maxdebt := greatest(v_maxdebt, v_d);
                    v_isover := v_isover or v_b > 0;
                    s_spent[si] := s_spent[si] + p_actual[i]; d_spent[si] := d_spent[si] + p_actual[i];
                    s_res[si] := s_res[si] - v_held; d_res[si] := d_res[si] - v_held;
                    s_debt[si] := s_debt[si] + v_d; d_debt[si] := d_debt[si] + v_d;
                    s_over[si] := s_over[si] + v_b; d_over[si] := d_over[si] + v_b;
                end loop;
                m_key := m_key || p_key[i]; m_actual := m_actual || p_actual[i];
                m_overrun := m_overrun || v_extra; m_debt := m_debt || v_maxdebt;
                m_over := m_over || v_isover; m_late := m_late || (r_status[ri] = 'expired');
                m_hash := m_hash || p_hash[i];
                v_ans := keel_budget_commit_answer(p_key[i], p_actual[i], v_held, v_extra, v_maxdebt,
                                                   v_isover, r_status[ri] = 'expired', false);
            end if;
        elsif p_op[i] = 'release' then
            if ri is null then
                v_ans := keel_budget_err('KL002', format('no reservation %s', p_key[i]));
            elsif r_status[ri] = 'released' and r_rhash[ri] is not null then
                v_ans := case when r_rhash[ri] <> p_hash[i] then keel_budget_err('KL001', format(
                                  'idempotency key %s/release was already used with a different payload',
                                  p_key[i]))
                              else jsonb_build_object('key', p_key[i], 'released_micros', r_amount[ri],
                                                      'status', 'released', 'replayed', true) end;
            elsif r_status[ri] <> 'held' then
                v_ans := keel_budget_release_core(p_key[i], p_reason[i], p_hash[i]);  -- no-op: rare
            else
                for k in p_cl[i] .. p_cl[i] + p_cn[i] - 1 loop
                    si := array_position(s_name, c_flat[k]);
                    s_res[si] := s_res[si] - r_amount[ri]; d_res[si] := d_res[si] - r_amount[ri];
                end loop;
                l_key := l_key || p_key[i]; l_reason := l_reason || coalesce(p_reason[i], '');
                l_hash := l_hash || p_hash[i];
                v_ans := jsonb_build_object('key', p_key[i], 'released_micros', r_amount[ri],
                                            'status', 'released', 'replayed', false);
            end if;
        else
            v_ans := keel_budget_err('22023', format('unknown ledger op %L', p_op[i]));
        end if;
        v_out := v_out || v_ans;
    end loop;

    -- Write back: one statement per table and kind.
    update keel_budget_scopes b
       set spent_micros = b.spent_micros + d.spent, reserved_micros = b.reserved_micros + d.res,
           debt_micros = b.debt_micros + d.debt, over_limit_micros = b.over_limit_micros + d.over,
           updated_at = now()
      from unnest(s_name, d_spent, d_res, d_debt, d_over) as d(scope, spent, res, debt, over)
     where b.scope = d.scope and (d.spent <> 0 or d.res <> 0 or d.debt <> 0 or d.over <> 0);
    if cardinality(n_key) > 0 then
        insert into keel_budget_reservations (
            key, scopes, requested_micros, amount_micros, status, expires_at, kind, subject,
            run_id, step_id, tier, decision, would_decision, caps, reason, observed, answer,
            payload_hash)
        select w.key, string_to_array(w.scopes, chr(31)), w.req, w.amount, w.status,
               now() + make_interval(secs => w.ttl), w.kind, w.subject, w.run, w.step, w.tier,
               w.dec, w.would, w.caps, w.reason, w.obs, w.answer, w.hash
          from unnest(n_key, n_scopes, n_req, n_amount, n_status, n_ttl, n_kind, n_subject, n_run,
                      n_step, n_tier, n_dec, n_would, n_caps, n_reason, n_obs, n_answer, n_hash)
               as w(key, scopes, req, amount, status, ttl, kind, subject, run, step, tier, dec,
                    would, caps, reason, obs, answer, hash);
    end if;
    if cardinality(m_key) > 0 then
        update keel_budget_reservations r
           set status = 'committed', actual_micros = m.actual, overrun_micros = m.overrun,
               debt_micros = m.debt, over_limit = m.over, late = m.late, commit_hash = m.hash,
               updated_at = now()
          from unnest(m_key, m_actual, m_overrun, m_debt, m_over, m_late, m_hash)
               as m(key, actual, overrun, debt, over, late, hash)
         where r.key = m.key;
    end if;
    if cardinality(l_key) > 0 then
        update keel_budget_reservations r
           set status = 'released', release_reason = l.reason, release_hash = l.hash,
               updated_at = now()
          from unnest(l_key, l_reason, l_hash) as l(key, reason, hash)
         where r.key = l.key;
    end if;
    return to_jsonb(v_out);
end $$;

-- Sweep: as before, but scope rows follow the lock rule (sorted order keeps tenants first).
create or replace function keel_budget_sweep(p_batch integer default 500) returns integer
language plpgsql as $$
declare
    v_n       integer;
    v_scopes  text[];
    v_amounts bigint[];
begin
    with due as (
        select key from keel_budget_reservations
         where status = 'held' and expires_at < now()
         order by expires_at limit p_batch
           for update skip locked
    ), upd as (
        update keel_budget_reservations r
           set status = 'expired', updated_at = now()
          from due where r.key = due.key
        returning r.scopes, r.amount_micros
    ), per_scope as (
        select s, sum(upd.amount_micros)::bigint as total
          from upd, unnest(upd.scopes) s group by s
    )
    select (select count(*) from upd),
           (select array_agg(s order by s collate "C") from per_scope),
           (select array_agg(total order by s collate "C") from per_scope)
      into v_n, v_scopes, v_amounts;
    if v_n > 0 then
        perform keel_budget_lock_tenants(array(
            select s from unnest(v_scopes) s where strpos(s, '/') = 0));
        update keel_budget_scopes b
           set reserved_micros = b.reserved_micros - x.total, updated_at = now()
          from unnest(v_scopes, v_amounts) as x(s, total)
         where b.scope = x.s;
    end if;
    return v_n;
end $$;

-- open_run and set_limit create scopes: tenant lock first, then the rest of the closure.
create or replace function keel_budget_open_run(p_scopes text[], p_run_limit bigint)
returns jsonb
language plpgsql as $$
declare
    v_run     text := p_scopes[array_length(p_scopes, 1)];
    v_closure text[] := keel_scope_closure(p_scopes);
    v_row     keel_budget_scopes%rowtype;
begin
    perform keel_budget_lock_tenants(array(
        select s from unnest(v_closure) s where strpos(s, '/') = 0));
    perform keel_budget_ensure_scopes(v_closure);
    update keel_budget_scopes set limit_micros = p_run_limit, updated_at = now()
     where scope = v_run and limit_micros is null and p_run_limit is not null;
    select * into v_row from keel_budget_scopes where scope = v_run;
    return jsonb_build_object('scope', v_run, 'limit_micros', v_row.limit_micros,
                              'spent_micros', v_row.spent_micros,
                              'reserved_micros', v_row.reserved_micros);
end $$;

create or replace function keel_budget_set_limit(
    p_scope text, p_limit bigint, p_observe boolean, p_overdraft bigint
) returns void
language plpgsql as $$
declare
    v_closure text[] := keel_scope_closure(array[p_scope]);
begin
    perform keel_budget_lock_tenants(array(
        select s from unnest(v_closure) s where strpos(s, '/') = 0));
    perform keel_budget_ensure_scopes(v_closure);
    update keel_budget_scopes
       set limit_micros = p_limit,
           observe = p_observe,
           overdraft_micros = coalesce(p_overdraft, overdraft_micros),
           debt_micros = case when p_limit is null then 0
                              else least(debt_micros, greatest(spent_micros - p_limit, 0)) end,
           updated_at = now()
     where scope = p_scope;
end $$;
