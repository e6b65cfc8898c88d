-- Business tables of the demo tools and the record of every tool effect.
create table if not exists orders (
    id              text primary key,
    tenant          text not null,
    customer_email  text not null,
    status          text not null,
    item_sku        text not null,
    total_micros    bigint not null check (total_micros >= 0),
    created_at      timestamptz not null default now()
);

create table if not exists inventory (
    tenant    text not null,
    sku       text not null,
    name      text not null,
    quantity  integer not null,
    primary key (tenant, sku)
);

-- One row per refund; the idempotency key makes a retried call return the first refund.
create table if not exists refunds (
    id               bigserial primary key,
    tenant           text not null,
    order_id         text not null references orders(id),
    amount_micros    bigint not null check (amount_micros > 0),
    reason           text not null default '',
    idempotency_key  text not null unique,
    status           text not null default 'issued' check (status in ('issued', 'voided')),
    created_at       timestamptz not null default now(),
    voided_at        timestamptz
);

-- Outgoing mail is written to an outbox in the same transaction as its effect record, and a
-- relay delivers it: sending becomes exactly-once even though SMTP itself is not idempotent.
create table if not exists email_outbox (
    id               bigserial primary key,
    tenant           text not null,
    to_addr          text not null,
    subject          text not null,
    body             text not null,
    idempotency_key  text not null unique,
    created_at       timestamptz not null default now()
);

-- Every tool effect, keyed by workflow_id/step_id: a retry or a second worker finds it here.
create table if not exists tool_effects (
    idempotency_key  text primary key,
    tool             text not null,
    tenant           text not null,
    ok               boolean not null,
    result           jsonb not null,
    created_at       timestamptz not null default now()
);

-- The demo tenants' orders and stock are not migrations: keel/seed/demo.sql (keel.db.seed_demo,
-- applied by `keel dev up` and the tests). Databases created before the move keep their rows.
