-- Effects of the test tools (activities/tools/testing.py, loaded only with KEEL_TEST_TOOLS=1).
-- Recovery tests count these rows to prove that a side effect happened exactly once and that
-- its compensation ran; the table is empty and unused in production.
create table if not exists test_effects (
    id               bigserial primary key,
    tool             text not null,
    note             text not null default '',
    idempotency_key  text not null unique,
    status           text not null default 'done' check (status in ('done', 'undone')),
    created_at       timestamptz not null default now(),
    undone_at        timestamptz
);
