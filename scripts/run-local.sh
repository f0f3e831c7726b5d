#!/usr/bin/env bash
# Runs the exporter against the local PostgreSQL (127.0.0.1:5432, user postgres, trust auth).
# Creates the database nvsentinel_dev with NVSentinel's schema if it does not exist (the
# exporter itself never runs DDL), then streams new health events to the sink named in
# examples/config-local.toml (http://127.0.0.1:8080/api/v1/events, no authentication).
set -euo pipefail
cd "$(dirname "$0")/.."
database="${DATASTORE_DATABASE:-nvsentinel_dev}"
psql_admin=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt)
if [ -z "$("${psql_admin[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
  "${psql_admin[@]}" -d postgres -c "CREATE DATABASE \"$database\""
  "${psql_admin[@]}" -d "$database" -f sql/nvsentinel-schema.sql
  echo "created database $database with NVSentinel's schema" >&2
fi
export DATASTORE_PROVIDER=postgresql DATASTORE_HOST=127.0.0.1 DATASTORE_PORT=5432 \
  DATASTORE_DATABASE="$database" DATASTORE_USERNAME=postgres DATASTORE_SSLMODE=disable
exec cargo run --release -- --config=examples/config-local.toml --metrics-port=2112 \
  --log-format=text "$@"
