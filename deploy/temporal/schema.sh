#!/bin/sh
# Create and migrate Temporal's two databases on the stack's PostgreSQL (idempotent: `create`
# of an existing database is tolerated, every other failure stops the stack).
set -eu
: "${POSTGRES_SEEDS:?POSTGRES_SEEDS is required}"
: "${POSTGRES_USER:?POSTGRES_USER is required}"
export SQL_PASSWORD="${POSTGRES_PWD:?POSTGRES_PWD is required}"
port="${DB_PORT:-5432}"
tool() { temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -u "$POSTGRES_USER" -p "$port" "$@"; }

nc -z -w 10 "$POSTGRES_SEEDS" "$port"
for db in temporal temporal_visibility; do
  tool --db "$db" create 2>/dev/null || echo "database $db exists"
done
tool --db temporal setup-schema -v 0.0
tool --db temporal update-schema -d /etc/temporal/schema/postgresql/v12/temporal/versioned
tool --db temporal_visibility setup-schema -v 0.0
tool --db temporal_visibility update-schema -d /etc/temporal/schema/postgresql/v12/visibility/versioned
echo "temporal schema ready"
