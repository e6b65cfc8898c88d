-- Found by tests/test_attack_app_role.py: 012 granted keel_app `update` on ALL sequences
-- before revoking the audit tables, and the audit table's own id sequence was among them.
-- With it keel_app could `setval('audit_log_id_seq', 1)`: every later append, of every
-- tenant, then collides on audit_log's primary key and fails (no gate decision can be
-- recorded, so no run can act). The sequence belongs to keel_audit_owner with its table;
-- keel_audit_append (security definer) still draws ids from it, keel_app cannot move it.
revoke all on sequence audit_log_id_seq from public, keel_app;
alter sequence audit_log_id_seq owner to keel_audit_owner;
