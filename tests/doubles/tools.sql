-- Effects of the test tools (tests/doubles/tools.py). Recovery tests count these rows to prove
-- that a side effect happened exactly once and that its compensation ran. Applied by the test
-- fixtures after Keel's migrations (tests/conftest.py); production databases never have this
-- table (migration 013 drops the copy that migration 006 created before it moved here).
create table if not exists test_effects (
    id               bigserial primary key,
    tool             text not null,
    note             text not null default '',
    idempotency_key  text not null unique,
    status           text not null default 'done' check (status in ('done', 'undone')),
    created_at       timestamptz not null default now(),
    undone_at        timestamptz
);
