-- Runs once, when the PostgreSQL volume is created: Keel's own database and role, beside
-- Temporal's (auto-setup creates "temporal" and "temporal_visibility" itself).
create role keel login password 'keel';
create database keel owner keel;
