-- The test tools' table leaves the production schema. Migration 006_testing.sql created
-- test_effects in every database; the test tools and their table now live under tests/
-- (tests/doubles/tools.py, tests/doubles/tools.sql, applied by the test fixtures), and 006 is
-- gone from keel/migrations. A database that applied 006 keeps that name in keel_migrations
-- (nothing re-reads it: the migrator and `keel doctor` only look for files not yet applied)
-- and loses the table here; only the test tools ever wrote to it, so production copies are
-- empty. A new database never had it, and this is a no-op there.
drop table if exists test_effects;
