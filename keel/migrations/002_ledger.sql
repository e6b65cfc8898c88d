-- UPGRADE PATH ONLY. The ledger's current schema reads in one file, baseline/ledger.sql,
-- which a new database gets instead of 002, 008 and 009; this file upgrades databases that
-- applied the steps before it, and records why the step was taken.
--
-- Budget ledger: hierarchical scopes, reserve -> commit / release, TTL leases, idempotency.
--
-- Every worker shares this ledger, so the database is the only authority: each operation is
-- ONE plpgsql call (one round trip) and all money is integer micro-USD (bigint).
--
-- Scope names (see keel/budget.py):
--   acme                                        tenant
--   acme/ws:default                             workspace
--   acme/ws:default/user:bob                    user
--   acme/ws:default/user:bob/run:<workflow_id>  run (the workflow id may itself contain '/')
--   acme/tool:issue_refund                      per-tool, under the tenant
--   acme/model:openai:gpt-4o-mini               per-model, under the tenant
-- A reservation always charges the closure of its scopes (every ancestor is added here, so no
-- client can bypass a tenant limit by naming only its run scope).
--
-- Lock order, which makes the ledger deadlock-free: the reserve advisory lock on the key,
-- then reservation rows, then scope rows sorted by name (collation "C"). No function takes
-- a lock of an earlier kind after one of a later kind.
--
-- Accounting per scope row (the invariant keel_check_invariant() verifies):
--   reserved_micros   = sum(amount_micros) of its 'held' reservations
--   spent_micros      = sum(actual_micros) of its 'committed' reservations (always the truth)
--   debt_micros       = part of commit overruns booked beyond the limit, inside the overdraft
--   over_limit_micros = part of commit overruns beyond even the overdraft (flagged, not hidden)
--   enforced limited scopes: spent + reserved <= limit + overdraft + over_limit_micros

create table if not exists keel_budget_scopes (
    scope              text collate "C" primary key,
    parent             text collate "C",
    limit_micros       bigint check (limit_micros is null or limit_micros >= 0),
    spent_micros       bigint not null default 0,
    reserved_micros    bigint not null default 0 check (reserved_micros >= 0),
    debt_micros        bigint not null default 0 check (debt_micros >= 0),
    overdraft_micros   bigint not null default 0 check (overdraft_micros >= 0),
    over_limit_micros  bigint not null default 0 check (over_limit_micros >= 0),
    observe            boolean not null default false,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now()
) with (fillfactor = 50);  -- hot rows are updated constantly: leave room for HOT updates

create index if not exists keel_budget_scopes_parent on keel_budget_scopes (parent);

create table if not exists keel_budget_reservations (
    key               text primary key,
    scopes            text[] not null,
    requested_micros  bigint not null check (requested_micros >= 0),
    amount_micros     bigint not null check (amount_micros >= 0),
    actual_micros     bigint check (actual_micros >= 0),
    status            text not null
                      check (status in ('held', 'committed', 'released', 'expired', 'denied')),
    expires_at        timestamptz not null,
    kind              text not null check (kind in ('model', 'tool')),
    subject           text not null default '',
    run_id            text not null default '',
    step_id           text not null default '',
    tier              text not null default '',
    decision          text not null check (decision in ('ALLOW', 'ALLOW_WITH_CAPS', 'DENY')),
    would_decision    text,
    caps              jsonb not null,
    reason            text not null default '',
    observed          boolean not null default false,
    answer            jsonb not null,
    payload_hash      text not null,
    overrun_micros    bigint not null default 0,
    debt_micros       bigint not null default 0,
    over_limit        boolean not null default false,
    late              boolean not null default false,
    release_reason    text not null default '',
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);

create index if not exists keel_budget_res_expiry on keel_budget_reservations (expires_at)
    where status = 'held';
-- History per scope: scopes[1] is always the tenant (the closure is sorted and the tenant is a
-- prefix of every other scope). A btree rather than GIN on scopes: it is cheaper on the hot
-- path (no pending list, no entries per scope) and unchanged by commits.
create index if not exists keel_budget_res_tenant on keel_budget_reservations
    ((scopes[1]), created_at);

-- First answer of every commit / release / extend, keyed '<reservation key>/<op>'.
create table if not exists keel_budget_ops (
    op_key           text primary key,
    reservation_key  text not null,
    op               text not null,
    payload_hash     text not null,
    result           jsonb not null,
    created_at       timestamptz not null default now()
);

-- Parent of a scope by the naming grammar: a run segment swallows everything after '/run:'.
create or replace function keel_scope_parent(p_scope text) returns text
language sql immutable parallel safe as $$
    select case
        when strpos(p_scope, '/run:') > 0 then left(p_scope, strpos(p_scope, '/run:') - 1)
        when strpos(p_scope, '/') > 0 then regexp_replace(p_scope, '/[^/]*$', '')
    end
$$;

-- The scopes plus all their ancestors, deduplicated and sorted in lock order.
create or replace function keel_scope_closure(p_scopes text[]) returns text[]
language plpgsql immutable as $$
declare
    v_out text[] := '{}';
    v_s   text;
begin
    foreach v_s in array coalesce(p_scopes, '{}') loop
        if v_s is null or v_s = '' or v_s like '%//%' or v_s like '/%' then
            raise exception using errcode = '22023', message = format('invalid scope %L', v_s);
        end if;
        while v_s is not null and not (v_s = any(v_out)) loop
            v_out := v_out || v_s;
            v_s := keel_scope_parent(v_s);
        end loop;
    end loop;
    return array(select s from unnest(v_out) s order by s collate "C");
end $$;

-- Pure decision over the limited scopes of a path (no I/O). Rules, in order:
--  * no limited scope                         -> ALLOW the full amount, remaining null
--  * amount fits the tightest scope           -> ALLOW, unless some scope would keep less than
--    20% of its limit afterwards (low water)  -> ALLOW_WITH_CAPS: max_tier fast, optional steps
--    off, max_tokens scaled by (left after / low-water mark), never below a quarter
--  * only min_micros fits                     -> ALLOW_WITH_CAPS granting what fits, same caps,
--    max_tokens scaled by granted / requested
--  * otherwise                                -> DENY, naming the tightest scope
create or replace function keel_budget_decide(
    p_scopes text[], p_limits bigint[], p_avail bigint[],
    p_amount bigint, p_min bigint, p_max_tokens integer
) returns jsonb
language plpgsql immutable as $$
declare
    c_low_water_pct constant integer := 20;
    n        integer := coalesce(array_length(p_scopes, 1), 0);
    i        integer;
    v_ti     integer;
    v_grant  bigint;
    v_after  bigint;
    v_lw     bigint;
    v_li     integer;
    v_ratio  numeric;
    v_best   numeric;
    v_tokens integer;
    v_rem    bigint;
    v_reason text := '';
    v_caps   jsonb := '{}';
begin
    if n = 0 then
        return jsonb_build_object('decision', 'ALLOW', 'granted_micros', p_amount,
                                  'remaining_micros', null, 'caps', v_caps, 'reason', '');
    end if;
    for i in 1..n loop
        -- Ties name the most specific scope, whatever order the rows came in.
        if v_ti is null or p_avail[i] < p_avail[v_ti]
           or (p_avail[i] = p_avail[v_ti] and length(p_scopes[i]) > length(p_scopes[v_ti])) then
            v_ti := i;
        end if;
    end loop;
    if p_amount <= p_avail[v_ti] then
        v_grant := p_amount;
    elsif p_min > 0 and p_min <= p_avail[v_ti] then
        v_grant := p_avail[v_ti];
    else
        return jsonb_build_object(
            'decision', 'DENY', 'granted_micros', 0,
            'remaining_micros', greatest(p_avail[v_ti], 0), 'caps', v_caps,
            'reason', format('budget scope %s has %s micro-USD left of its %s limit; '
                             'request needs %s (minimum %s)', p_scopes[v_ti],
                             greatest(p_avail[v_ti], 0), p_limits[v_ti], p_amount, p_min));
    end if;
    -- Low water: the scope keeping the smallest share of its limit after this grant.
    for i in 1..n loop
        v_after := p_avail[i] - v_grant;
        v_lw := p_limits[i] * c_low_water_pct / 100;
        v_rem := least(coalesce(v_rem, v_after), v_after);
        if v_after < v_lw then
            v_ratio := v_after::numeric / v_lw;
            if v_best is null or v_ratio < v_best
               or (v_ratio = v_best and length(p_scopes[i]) > length(p_scopes[v_li])) then
                v_best := v_ratio;
                v_li := i;
            end if;
        end if;
    end loop;
    if v_grant < p_amount then
        v_tokens := case when p_max_tokens is null then null
                         else greatest(1, floor(p_max_tokens::numeric * v_grant / p_amount))::int end;
        v_reason := format('partial grant: budget scope %s has only %s of the %s micro-USD '
                           'requested', p_scopes[v_ti], v_grant, p_amount);
    elsif v_li is not null then
        v_tokens := case when p_max_tokens is null then null
                         else greatest(1, floor(p_max_tokens * greatest(0.25, least(1, v_best))))::int end;
        v_reason := format('low water: budget scope %s keeps %s of its %s micro-USD limit '
                           'after this reservation (below %s%%)', p_scopes[v_li],
                           greatest(p_avail[v_li] - v_grant, 0), p_limits[v_li], c_low_water_pct);
    else
        return jsonb_build_object('decision', 'ALLOW', 'granted_micros', v_grant,
                                  'remaining_micros', v_rem, 'caps', v_caps, 'reason', '');
    end if;
    v_caps := jsonb_build_object('max_tier', 'fast', 'max_tokens', v_tokens,
                                 'disable_optional', true);
    return jsonb_build_object('decision', 'ALLOW_WITH_CAPS', 'granted_micros', v_grant,
                              'remaining_micros', v_rem, 'caps', v_caps, 'reason', v_reason);
end $$;

create or replace function keel_budget_reserve(
    p_key text, p_scopes text[], p_amount bigint, p_min bigint, p_max_tokens integer,
    p_ttl_seconds integer, p_kind text, p_subject text, p_run_id text, p_step_id text,
    p_tier text, p_hash text
) returns jsonb
language plpgsql
-- Custom plans would be re-planned on every call (array parameters); generic ones are cached.
set plan_cache_mode = force_generic_plan as $$
declare
    v_prev_hash   text;
    v_prev_answer jsonb;
    v_scopes  text[];
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
        raise exception using errcode = '22023',
            message = 'reserve needs 0 <= min_micros <= amount_micros and ttl_seconds > 0';
    end if;
    -- Serialises concurrent calls with the same key (no row exists yet to lock).
    perform pg_advisory_xact_lock(hashtextextended(p_key, 7345002));
    select payload_hash, answer into v_prev_hash, v_prev_answer
      from keel_budget_reservations where key = p_key;
    if found then
        if v_prev_hash <> p_hash then
            raise exception using errcode = 'KL001', message = format(
                'idempotency key %s was already used for a different reserve request', p_key);
        end if;
        return v_prev_answer || '{"replayed": true}';
    end if;

    v_scopes := keel_scope_closure(p_scopes);
    -- Missing scopes appear unlimited. Inserted before any row lock is taken, in sorted
    -- order, so creation stays deadlock-free; the NOT EXISTS keeps the usual case read-only.
    insert into keel_budget_scopes (scope, parent)
        select s, keel_scope_parent(s) from unnest(v_scopes) s
         where not exists (select 1 from keel_budget_scopes b where b.scope = s)
         order by s collate "C"
        on conflict (scope) do nothing;
    -- Optimistic: hold the full amount while locking (in scope order) and reading, one
    -- statement; a DENY or a partial grant gives the difference back below.
    for r in update keel_budget_scopes b
                set reserved_micros = b.reserved_micros + p_amount, updated_at = now()
               from (select scope from keel_budget_scopes where scope = any(v_scopes)
                      order by scope for no key update) l
              where b.scope = l.scope
          returning b.scope, b.limit_micros,
                    b.limit_micros - b.spent_micros - b.reserved_micros + p_amount as avail,
                    b.observe loop
        if r.limit_micros is not null then
            a_scopes := a_scopes || r.scope::text;
            a_limits := a_limits || r.limit_micros;
            a_avail := a_avail || r.avail;
            if r.observe then
                v_any_observe := true;
            else
                e_scopes := e_scopes || r.scope::text;
                e_limits := e_limits || r.limit_micros;
                e_avail := e_avail || r.avail;
            end if;
        end if;
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

-- Returns the recorded first answer of an op, or null; refuses the same op key with a
-- different payload. Call only while holding the reservation row lock.
create or replace function keel_budget_op_replay(p_op_key text, p_hash text) returns jsonb
language plpgsql as $$
declare
    v_hash   text;
    v_result jsonb;
begin
    select payload_hash, result into v_hash, v_result from keel_budget_ops where op_key = p_op_key;
    if not found then
        return null;
    end if;
    if v_hash <> p_hash then
        raise exception using errcode = 'KL001', message = format(
            'idempotency key %s was already used with a different payload', p_op_key);
    end if;
    return v_result || '{"replayed": true}';
end $$;

create or replace function keel_budget_commit(p_key text, p_actual bigint, p_hash text)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    v_res      record;
    v_op_key   text := p_key || '/commit';
    v_replay   jsonb;
    v_held     bigint;
    v_extra    bigint;
    v_rest     bigint;
    v_debt     bigint;
    v_beyond   bigint;
    v_max_debt bigint := 0;
    v_over     boolean := false;
    v_result   jsonb;
    v_scopes   text[] := '{}';
    v_debts    bigint[] := '{}';
    v_beyonds  bigint[] := '{}';
    r          record;
begin
    if p_actual < 0 then
        raise exception using errcode = '22023', message = 'actual_micros must be >= 0';
    end if;
    select status, amount_micros, scopes into v_res
      from keel_budget_reservations where key = p_key for update;
    if not found then
        raise exception using errcode = 'KL002', message = format('no reservation %s', p_key);
    end if;
    v_replay := keel_budget_op_replay(v_op_key, p_hash);
    if v_replay is not null then
        return v_replay;
    end if;
    if v_res.status not in ('held', 'expired') then
        raise exception using errcode = 'KL003', message = format(
            'reservation %s is %s; nothing to commit', p_key, v_res.status);
    end if;
    -- An expired hold already gave its money back: the whole actual is new spend (late).
    v_held := case when v_res.status = 'held' then v_res.amount_micros else 0 end;
    v_extra := greatest(p_actual - v_held, 0);
    if v_extra > 0 then
        -- Overrun: decide per scope how much fits, goes to debt, or is flagged over limit.
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
    end if;
    update keel_budget_reservations
       set status = 'committed', actual_micros = p_actual, overrun_micros = v_extra,
           debt_micros = v_max_debt, over_limit = v_over, late = (v_res.status = 'expired'),
           updated_at = now()
     where key = p_key;
    v_result := jsonb_build_object(
        'key', p_key, 'committed_micros', p_actual,
        'refunded_micros', greatest(v_held - p_actual, 0), 'overrun_micros', v_extra,
        'debt_micros', v_max_debt, 'over_limit', v_over,
        'late', v_res.status = 'expired', 'replayed', false);
    insert into keel_budget_ops (op_key, reservation_key, op, payload_hash, result)
        values (v_op_key, p_key, 'commit', p_hash, v_result);
    if v_extra = 0 then
        -- Usual case, done last so the shared (hot) scope rows stay locked only until the
        -- commit: lock in scope order and update in one statement.
        update keel_budget_scopes b
           set spent_micros = b.spent_micros + p_actual,
               reserved_micros = b.reserved_micros - v_held, updated_at = now()
          from (select scope from keel_budget_scopes where scope = any(v_res.scopes)
                 order by scope for no key update) l
         where b.scope = l.scope;
    else
        update keel_budget_scopes b
           set spent_micros = b.spent_micros + p_actual,
               reserved_micros = b.reserved_micros - v_held,
               debt_micros = b.debt_micros + x.debt,
               over_limit_micros = b.over_limit_micros + x.beyond,
               updated_at = now()
          from unnest(v_scopes, v_debts, v_beyonds) as x(scope, debt, beyond)
         where b.scope = x.scope;
    end if;
    return v_result;
end $$;

create or replace function keel_budget_release(p_key text, p_reason text, p_hash text)
returns jsonb
language plpgsql
set plan_cache_mode = force_generic_plan as $$
declare
    v_res     record;
    v_op_key  text := p_key || '/release';
    v_replay  jsonb;
    v_amount  bigint := 0;
    v_status  text;
    v_result  jsonb;
begin
    select status, amount_micros, scopes into v_res
      from keel_budget_reservations where key = p_key for update;
    if not found then
        raise exception using errcode = 'KL002', message = format('no reservation %s', p_key);
    end if;
    v_replay := keel_budget_op_replay(v_op_key, p_hash);
    if v_replay is not null then
        return v_replay;
    end if;
    v_status := v_res.status;
    if v_res.status = 'held' then
        v_amount := v_res.amount_micros;
        update keel_budget_scopes b
           set reserved_micros = b.reserved_micros - v_amount, updated_at = now()
          from (select scope from keel_budget_scopes where scope = any(v_res.scopes)
                 order by scope for no key update) l
         where b.scope = l.scope;
        update keel_budget_reservations
           set status = 'released', release_reason = coalesce(p_reason, ''), updated_at = now()
         where key = p_key;
        v_status := 'released';
    end if;
    v_result := jsonb_build_object('key', p_key, 'released_micros', v_amount,
                                   'status', v_status, 'replayed', false);
    insert into keel_budget_ops (op_key, reservation_key, op, payload_hash, result)
        values (v_op_key, p_key, 'release', p_hash, v_result);
    return v_result;
end $$;

create or replace function keel_budget_extend(
    p_key text, p_ttl_seconds integer, p_seq integer, p_hash text
) returns jsonb
language plpgsql as $$
declare
    v_res     keel_budget_reservations%rowtype;
    v_op_key  text := p_key || '/extend:' || p_seq;
    v_replay  jsonb;
    v_expires timestamptz;
    v_result  jsonb;
begin
    if p_ttl_seconds <= 0 then
        raise exception using errcode = '22023', message = 'ttl_seconds must be > 0';
    end if;
    select * into v_res from keel_budget_reservations where key = p_key for update;
    if not found then
        raise exception using errcode = 'KL002', message = format('no reservation %s', p_key);
    end if;
    v_replay := keel_budget_op_replay(v_op_key, p_hash);
    if v_replay is not null then
        return v_replay;
    end if;
    v_expires := v_res.expires_at;
    if v_res.status = 'held' then
        v_expires := greatest(v_res.expires_at, now() + make_interval(secs => p_ttl_seconds));
        update keel_budget_reservations set expires_at = v_expires, updated_at = now()
         where key = p_key;
    end if;
    v_result := jsonb_build_object('key', p_key, 'status', v_res.status,
                                   'expires_at', v_expires,
                                   'extended', v_res.status = 'held', 'replayed', false);
    insert into keel_budget_ops (op_key, reservation_key, op, payload_hash, result)
        values (v_op_key, p_key, 'extend', p_hash, v_result);
    return v_result;
end $$;

-- Returns the money of holds whose lease passed (database clock only). Idempotent and cheap
-- (partial index on held expiry); SKIP LOCKED lets every worker run it without contention.
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
           (select array_agg(s order by s) from per_scope),
           (select array_agg(total order by s) from per_scope)
      into v_n, v_scopes, v_amounts;
    if v_n > 0 then
        perform 1 from keel_budget_scopes where scope = any(v_scopes)
          order by scope for no key update;
        update keel_budget_scopes b
           set reserved_micros = b.reserved_micros - x.total, updated_at = now()
          from unnest(v_scopes, v_amounts) as x(s, total)
         where b.scope = x.s;
    end if;
    return v_n;
end $$;

-- Creates the run's scopes (and ancestors) and gives the run scope its limit; the first
-- limit wins, so a retried or replayed open_run changes nothing.
create or replace function keel_budget_open_run(p_scopes text[], p_run_limit bigint)
returns jsonb
language plpgsql as $$
declare
    v_run  text := p_scopes[array_length(p_scopes, 1)];
    v_row  keel_budget_scopes%rowtype;
begin
    insert into keel_budget_scopes (scope, parent)
        select s, keel_scope_parent(s) from unnest(keel_scope_closure(p_scopes)) s
         order by s collate "C"
        on conflict (scope) do nothing;
    update keel_budget_scopes set limit_micros = p_run_limit, updated_at = now()
     where scope = v_run and limit_micros is null and p_run_limit is not null;
    select * into v_row from keel_budget_scopes where scope = v_run;
    return jsonb_build_object('scope', v_run, 'limit_micros', v_row.limit_micros,
                              'spent_micros', v_row.spent_micros,
                              'reserved_micros', v_row.reserved_micros);
end $$;

-- Sets (or clears, with null) a scope's limit, observe flag and overdraft. Raising a limit
-- forgives debt that now fits under it.
create or replace function keel_budget_set_limit(
    p_scope text, p_limit bigint, p_observe boolean, p_overdraft bigint
) returns void
language plpgsql as $$
begin
    insert into keel_budget_scopes (scope, parent)
        select s, keel_scope_parent(s) from unnest(keel_scope_closure(array[p_scope])) s
         order by s collate "C"
        on conflict (scope) do nothing;
    perform 1 from keel_budget_scopes where scope = p_scope for no key update;
    update keel_budget_scopes
       set limit_micros = p_limit,
           observe = p_observe,
           overdraft_micros = coalesce(p_overdraft, overdraft_micros),
           debt_micros = case when p_limit is null then 0
                              else least(debt_micros, greatest(spent_micros - p_limit, 0)) end,
           updated_at = now()
     where scope = p_scope;
end $$;

create or replace function keel_check_invariant() returns setof text
language sql stable as $$
    with held as (
        select s, sum(amount_micros)::bigint as total
          from keel_budget_reservations r, unnest(r.scopes) s
         where r.status = 'held' group by s
    ), spent as (
        select s, sum(actual_micros)::bigint as total
          from keel_budget_reservations r, unnest(r.scopes) s
         where r.status = 'committed' group by s
    )
    select format('scope %s: reserved %s but held reservations sum to %s',
                  b.scope, b.reserved_micros, coalesce(h.total, 0))
      from keel_budget_scopes b left join held h on h.s = b.scope
     where b.reserved_micros <> coalesce(h.total, 0)
    union all
    select format('scope %s: spent %s but committed actuals sum to %s',
                  b.scope, b.spent_micros, coalesce(c.total, 0))
      from keel_budget_scopes b left join spent c on c.s = b.scope
     where b.spent_micros <> coalesce(c.total, 0)
    union all
    select format('scope %s: spent %s + reserved %s exceeds limit %s + overdraft %s '
                  '(+ flagged over-limit %s)', scope, spent_micros, reserved_micros,
                  limit_micros, overdraft_micros, over_limit_micros)
      from keel_budget_scopes
     where limit_micros is not null and not observe
       and spent_micros + reserved_micros > limit_micros + overdraft_micros + over_limit_micros
    union all
    select format('scope %s: debt %s outside [0, overdraft %s]', scope, debt_micros,
                  overdraft_micros)
      from keel_budget_scopes where debt_micros < 0 or debt_micros > overdraft_micros
    union all
    select format('reservation %s charges missing scope %s', r.key, s)
      from keel_budget_reservations r, unnest(r.scopes) s
     where r.status in ('held', 'committed')
       and not exists (select 1 from keel_budget_scopes b where b.scope = s)
$$;
