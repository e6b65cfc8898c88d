-- Runs once, when the PostgreSQL volume is created: Keel's own database and role, beside
-- Temporal's (auto-setup creates "temporal" and "temporal_visibility" itself).
create role keel login password 'keel';
create database keel owner keel;
-- Issue 17 (migration 012): the audit tables belong to keel_audit_owner, and workers should
-- connect as keel_app, which can append to the audit log only through a SECURITY DEFINER
-- function. Created here because the keel role (which runs migrations) cannot create roles;
-- keel is a member of keel_audit_owner so that its migrations can hand the tables over.
create role keel_audit_owner nologin;
create role keel_app login password 'keel_app';
grant keel_audit_owner to keel;
