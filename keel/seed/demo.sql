-- Demo data: tenant acme's orders and stock for the demo tools (activities/tools/demo.py), and
-- one order of tenant globex. Not a migration: `keel dev up` / `make demo` and the test
-- fixtures apply it (keel.db.seed_demo); a production database starts without it. Idempotent,
-- and it never overwrites a row that exists (an order the demo refunded stays refunded).
insert into orders (id, tenant, customer_email, status, item_sku, total_micros) values
    ('ORD-123', 'acme', 'alice@example.com', 'shipped',    'SKU-KEEL-1', 42500000),
    ('ORD-124', 'acme', 'bob@example.com',   'processing', 'SKU-KEEL-2', 19990000),
    ('ORD-125', 'acme', 'carol@example.com', 'delivered',  'SKU-KEEL-3', 250000000),
    ('ORD-126', 'acme', 'dave@example.org',  'shipped',    'SKU-KEEL-1', 129000000),
    ('ORD-200', 'globex', 'erin@globex.test', 'shipped',   'SKU-GX-1',   75000000)
on conflict (id) do nothing;

insert into inventory (tenant, sku, name, quantity) values
    ('acme', 'SKU-KEEL-1', 'Keel mug', 120),
    ('acme', 'SKU-KEEL-2', 'Keel hoodie', 0),
    ('acme', 'SKU-KEEL-3', 'Keel sailboat kit', 4),
    ('globex', 'SKU-GX-1', 'Globex widget', 9)
on conflict do nothing;
