-- Operations tickets: the effect of the operations agent's open_ticket tool.
-- idempotency_key is the tool call's key: a retried call finds its ticket (exactly once).
create table if not exists tickets (
    id              bigserial primary key,
    tenant          text not null,
    title           text not null,
    body            text not null default '',
    sku             text,
    priority        text not null default 'normal',
    status          text not null default 'open',
    idempotency_key text not null unique,
    created_at      timestamptz not null default now(),
    closed_at       timestamptz
);
create index if not exists tickets_tenant on tickets (tenant, status);
