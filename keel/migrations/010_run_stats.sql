-- One row per finished run: its shape and spend, and the anomaly flags it raised.
-- finish_run reads the p95 spend of the tenant's latest runs of the same agent from here
-- (the cost_spike flag), then records the run; a retried finish_run changes nothing.
create table if not exists run_stats (
    workflow_id  text primary key,
    tenant       text not null,
    agent        text not null,
    outcome      text not null,
    spend_micros bigint not null,
    iterations   integer not null,
    tool_calls   integer not null,
    failed_calls integer not null,
    flags        text[] not null default '{}',
    finished_at  timestamptz not null default now()
);
create index if not exists run_stats_recent on run_stats (tenant, agent, finished_at desc);
