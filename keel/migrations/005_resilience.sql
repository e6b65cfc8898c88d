-- Resilience state shared by every worker: circuit breakers, their transitions, run slots.
--
-- All times come from the database clock (now()), never from a worker's clock, so workers
-- with skewed clocks still agree on when a cooldown ends or a lease expires.

-- One row per breaker scope: 'tool:<name>' or 'model:<provider>'. A missing row is a closed
-- breaker with no failures (the fast path of a healthy tool is one indexed read).
create table if not exists circuit_breakers (
    scope                 text collate "C" primary key,
    state                 text not null default 'closed'
                          check (state in ('closed', 'open', 'half_open')),
    consecutive_failures  integer not null default 0 check (consecutive_failures >= 0),
    opened_until          timestamptz,          -- end of the cooldown while open
    probe_owner           text,                 -- the one call let through while half-open
    probe_lease_until     timestamptz,          -- a dead prober frees the probe after this
    last_error            text not null default '',
    opened_count          bigint not null default 0,
    updated_at            timestamptz not null default now()
);

-- Append-only history of state changes: what operators read with `starter.py breakers`,
-- and the evidence that a fallback or a failed step was caused by an open circuit.
create table if not exists breaker_events (
    id          bigserial primary key,
    scope       text collate "C" not null,
    from_state  text not null,
    to_state    text not null,
    reason      text not null default '',
    worker      text not null default '',
    at          timestamptz not null default now()
);
create index if not exists breaker_events_scope on breaker_events (scope, id);

-- In-flight runs per tenant (the per-tenant concurrency limit). A slot is a lease: a run
-- whose worker died frees its slot when expires_at passes, even if finish_run never runs.
create table if not exists run_slots (
    workflow_id  text primary key,
    tenant       text not null,
    acquired_at  timestamptz not null default now(),
    expires_at   timestamptz not null
);
create index if not exists run_slots_tenant on run_slots (tenant, expires_at);
