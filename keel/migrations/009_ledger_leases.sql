-- Budget ledger, third cut: holds are leases, spend is durable.
--
-- A hold is soft state by design: it has a TTL, and a hold whose worker dies expires and
-- gives its money back. 009 lets a worker treat it as such. A transaction that only places
-- holds may commit without waiting for its WAL flush (synchronous_commit = off for that
-- transaction, chosen by the caller: activities/ledger_batch.py with KEEL_LEDGER_HOLDS=lease,
-- the default). Everything that records money spent or returned (commit, release, extend,
-- sweep) stays durable, and a durable commit flushes every earlier WAL record with it,
-- including the holds before it. What a PostgreSQL crash (not a worker or application
-- crash) can lose is therefore only holds placed shortly before it and not yet followed by
-- any durable commit: the WAL writer flushes them within 3 x wal_writer_delay (600 ms by
-- default) unless the disk itself stalls. For the ledger that is as if they had expired
-- early: for a moment after the crash their money is not held, so other reservations may be
-- granted against it.
--
-- A commit must then still record the spend of a hold it cannot find. Commits now carry the
-- hold's scopes (and kind): a commit whose reservation row does not exist, but which names
-- scopes, records the reservation as an expired hold of nothing (payload_hash '') and
-- charges the whole actual as late spend, through the same overrun rules as a commit after
-- expiry: booked into the overdraft, and beyond it recorded and flagged over_limit (so a
-- crash can push a scope past its overdraft: flagged, never dropped, not prevented). Its
-- answer says "lost_hold": true. A commit without scopes for an unknown key is refused as
-- before (KL002): that includes a 3-argument commit from a worker started before 009 (a
-- rolling upgrade), whose own holds are durable but which may commit a lease hold placed by
-- a new worker for the same run. A release of a lost hold answers KL002; the workflow's
-- release activity treats that as nothing held (activities/budget.py).
--
-- Functions: keel_budget_commit_core takes the two new arguments (its 3-argument form is
-- dropped: only these functions call it); keel_budget_commit gains a 5-argument form, and its
-- 3-argument form (what workers started before 009 call, during a rolling upgrade) now goes
-- through the new core; keel_budget_batch_serial passes the new fields; keel_budget_batch
-- sends a batch holding a commit for a missing hold down the serial path.

drop function if exists keel_budget_commit_core(text, bigint, text);

-- What a commit's answer adds when its hold was lost: the recorded row has no reserve
-- payload (payload_hash ''), which no reserve ever writes.
create or replace function keel_budget_lost_hold(p_payload_hash text) returns jsonb
language sql immutable as $$
    select case when p_payload_hash = '' then '{"lost_hold": true}'::jsonb else '{}'::jsonb end
$$;

create or replace function keel_budget_commit_core(
    p_key text, p_actual bigint, p_hash text, p_scopes text[], p_kind text
) returns jsonb
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
    v_closure  text[];
    r          record;
begin
    if p_actual < 0 then
        return keel_budget_err('22023', 'actual_micros must be >= 0');
    end if;
    select status, amount_micros, actual_micros, scopes, commit_hash, overrun_micros,
           debt_micros, over_limit, late, payload_hash into v_res
      from keel_budget_reservations where key = p_key for update;
    if not found and cardinality(p_scopes) > 0 then
        -- The hold is gone (lost in a database crash while it was a lease: see the header).
        -- Under the key's lock (a retried reserve may be writing it), record it as an expired
        -- hold of nothing; the late-commit path below then charges the whole actual. The
        -- crash may have taken the path's new scope rows too: tenants first, then the rest.
        perform pg_advisory_xact_lock(hashtextextended(p_key, 7345002));
        perform 1 from keel_budget_reservations where key = p_key;
        if not found then
            v_closure := keel_scope_closure(p_scopes);
            perform keel_budget_lock_tenants(array(
                select s from unnest(v_closure) s where strpos(s, '/') = 0));
            perform keel_budget_ensure_scopes(v_closure);
            insert into keel_budget_reservations (
                key, scopes, requested_micros, amount_micros, status, expires_at, kind,
                decision, caps, reason, answer, payload_hash)
            values (
                p_key, v_closure, 0, 0, 'expired', now(),
                coalesce(p_kind, 'model'), 'ALLOW', '{}',
                'hold not found at commit (lost in a database crash): actual charged as late spend',
                '{}', '');
        end if;
        select status, amount_micros, actual_micros, scopes, commit_hash, overrun_micros,
               debt_micros, over_limit, late, payload_hash into v_res
          from keel_budget_reservations where key = p_key for update;
    end if;
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
                v_res.overrun_micros, v_res.debt_micros, v_res.over_limit, v_res.late, true)
                || keel_budget_lost_hold(v_res.payload_hash);
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
                                     v_res.status = 'expired', false)
           || keel_budget_lost_hold(v_res.payload_hash);
end $$;

create or replace function keel_budget_commit(
    p_key text, p_actual bigint, p_hash text, p_scopes text[], p_kind text
) returns jsonb
language sql as $$
    select keel_budget_raise(keel_budget_commit_core(p_key, p_actual, p_hash, p_scopes, p_kind))
$$;

create or replace function keel_budget_commit(p_key text, p_actual bigint, p_hash text)
returns jsonb
language sql as $$ select keel_budget_commit(p_key, p_actual, p_hash, null, null) $$;

create or replace function keel_budget_batch_serial(p_ops jsonb) returns jsonb
language plpgsql as $$
declare
    r      record;
    v_out  jsonb[] := '{}';
    v_keys text[];
begin
    perform pg_advisory_xact_lock(hashtextextended(k, 7345002))
       from (select distinct o->>'key' as k from jsonb_array_elements(p_ops) o
              where o->>'op' = 'reserve'
                 or (o->>'op' = 'commit' and jsonb_array_length(o->'scopes') > 0)
              order by 1) x;
    v_keys := array(select o->>'key' from jsonb_array_elements(p_ops) o where o->>'op' <> 'reserve');
    perform 1 from keel_budget_reservations where key = any(v_keys) order by key for update;
    perform keel_budget_lock_tenants(array(
        select split_part(s, '/', 1) from jsonb_array_elements(p_ops) o,
               jsonb_array_elements_text(o->'scopes') s
         where o->>'op' in ('reserve', 'commit') and split_part(s, '/', 1) <> ''
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
            when 'commit' then keel_budget_commit_core(r.key, r.actual, r.hash, r.scopes, r.kind)
            when 'release' then keel_budget_release_core(r.key, r.reason, r.hash)
            else keel_budget_err('22023', format('unknown ledger op %L', r.op)) end;
    end loop;
    return to_jsonb(v_out);
end $$;

-- keel_budget_batch as in 008, plus: a commit naming scopes takes its key's advisory lock
-- with the reservations' (the same keys, in the same single sorted pass, as the serial
-- path), and a batch holding a commit whose hold is missing then runs serially
-- (keel_budget_commit_core records the lost hold): by then it holds every key lock the
-- serial path takes, so falling back adds no key lock after a row lock.
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
    -- Key locks, sorted: advisory for reservations and scoped commits, then the rows.
    perform pg_advisory_xact_lock(hashtextextended(e->>'key', 7345002))
       from jsonb_array_elements(p_ops) e
      where e->>'op' = 'reserve' or (e->>'op' = 'commit' and jsonb_array_length(e->'scopes') > 0)
      order by e->>'key';
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
    -- A commit naming scopes for a hold that is not there (lost as a lease): the rare path.
    if exists (select 1 from jsonb_array_elements(p_ops) e
                where e->>'op' = 'commit' and jsonb_array_length(e->'scopes') > 0
                  and not e->>'key' = any(r_key)) then
        return keel_budget_batch_serial(p_ops);
    end if;

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
                                  r_overrun[ri], r_debt[ri], r_over[ri], r_late[ri], true)
                                   || keel_budget_lost_hold(r_hash[ri]) end;
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
