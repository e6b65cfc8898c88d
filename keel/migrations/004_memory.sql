-- Session memory: every turn in full, plus a rolling summary the planner sees.
create table if not exists memory_turns (
    id          bigserial primary key,
    tenant      text not null,
    session     text not null,
    workflow_id text not null,
    role        text not null check (role in ('user', 'assistant')),
    content     text not null,
    created_at  timestamptz not null default now(),
    unique (workflow_id, role)
);
create index if not exists memory_turns_session on memory_turns (tenant, session, id);

create table if not exists memory_summaries (
    tenant      text not null,
    session     text not null,
    summary     text not null,
    turns       integer not null,
    updated_at  timestamptz not null default now(),
    primary key (tenant, session)
);
