-- UPGRADE PATH ONLY. The ledger's current schema reads in one file, baseline/ledger.sql,
-- which a new database gets instead of 002, 008 and 009; this file upgrades databases that
-- applied the steps before it, and records why the step was taken.
--
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
-- Functions: 008's engines stay as they are and gain wrappers. keel_budget_commit_lost
-- records a missing hold, then runs 008's keel_budget_commit_core; keel_budget_commit gains a
-- 5-argument form through it (the 3-argument form, what workers started before 009 call, is
-- unchanged); keel_budget_batch_serial passes the new fields; and keel_budget_batch becomes a
-- wrapper around 008's set-based engine (renamed keel_budget_batch_engine) that takes the
-- new key locks and sends the rare batch with a lost hold down the serial path.

-- 008's commit core, preceded by the lost-hold record when the hold is missing and the commit
-- names scopes. Lock order as 008: the key (advisory, as a reserve takes it; a retried reserve
-- may be writing the row), then tenants (sorted), then rows under them.
create or replace function keel_budget_commit_lost(
    p_key text, p_actual bigint, p_hash text, p_scopes text[], p_kind text
) returns jsonb
language plpgsql as $$
declare
    v_hash    text;
    v_closure text[];
    v_answer  jsonb;
begin
    select payload_hash into v_hash from keel_budget_reservations where key = p_key;
    if not found and cardinality(p_scopes) > 0 and p_actual >= 0 then
        perform pg_advisory_xact_lock(hashtextextended(p_key, 7345002));
        select payload_hash into v_hash from keel_budget_reservations where key = p_key;
        if not found then
            -- The crash may have taken the path's new scope rows too: create them, tenants
            -- first; then the hold, as expired, so that 008's late-commit path charges the
            -- whole actual.
            v_closure := keel_scope_closure(p_scopes);
            perform keel_budget_lock_tenants(array(
                select s from unnest(v_closure) s where strpos(s, '/') = 0));
            perform keel_budget_ensure_scopes(v_closure);
            insert into keel_budget_reservations (
                key, scopes, requested_micros, amount_micros, status, expires_at, kind,
                decision, caps, reason, answer, payload_hash)
            values (
                p_key, v_closure, 0, 0, 'expired', now(), coalesce(p_kind, 'model'), 'ALLOW', '{}',
                'hold not found at commit (lost in a database crash): actual charged as late spend',
                '{}', '');
            v_hash := '';
        end if;
    end if;
    v_answer := keel_budget_commit_core(p_key, p_actual, p_hash);
    -- No reserve writes payload_hash '': the row records a lost hold (this call or a replay).
    if v_hash = '' and not v_answer ? 'error' then
        v_answer := v_answer || '{"lost_hold": true}';
    end if;
    return v_answer;
end $$;

create or replace function keel_budget_commit(
    p_key text, p_actual bigint, p_hash text, p_scopes text[], p_kind text
) returns jsonb
language sql as $$
    select keel_budget_raise(keel_budget_commit_lost(p_key, p_actual, p_hash, p_scopes, p_kind))
$$;

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
            when 'commit' then keel_budget_commit_lost(r.key, r.actual, r.hash, r.scopes, r.kind)
            when 'release' then keel_budget_release_core(r.key, r.reason, r.hash)
            else keel_budget_err('22023', format('unknown ledger op %L', r.op)) end;
    end loop;
    return to_jsonb(v_out);
end $$;


-- 008's set-based engine keeps its body under a new name; keel_budget_batch wraps it.
alter function keel_budget_batch(jsonb) rename to keel_budget_batch_engine;

create or replace function keel_budget_batch(p_ops jsonb) returns jsonb
language plpgsql as $$
declare
    v_scoped text[];
begin
    -- Key locks in one sorted pass: the reservations' (which the engine takes again, already
    -- held) and those of commits naming scopes, as the serial path takes them. Falling back
    -- to the serial path below then adds no key lock after a row lock.
    perform pg_advisory_xact_lock(hashtextextended(e->>'key', 7345002))
       from jsonb_array_elements(p_ops) e
      where e->>'op' = 'reserve' or (e->>'op' = 'commit' and jsonb_array_length(e->'scopes') > 0)
      order by e->>'key';
    -- A commit naming scopes whose hold is missing (lost as a lease) or was recorded for a
    -- lost hold: the rare case, run serially through keel_budget_commit_lost. Under the key
    -- locks no reserve can create those rows meanwhile, and rows are never deleted.
    v_scoped := array(select distinct e->>'key' from jsonb_array_elements(p_ops) e
                       where e->>'op' = 'commit' and jsonb_array_length(e->'scopes') > 0);
    if cardinality(v_scoped) > (select count(*) from keel_budget_reservations
                                 where key = any(v_scoped) and payload_hash <> '') then
        return keel_budget_batch_serial(p_ops);
    end if;
    return keel_budget_batch_engine(p_ops);
end $$;
