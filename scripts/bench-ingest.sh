#!/usr/bin/env bash
# Ingest benchmark (crates/usage-store/examples/bench_ingest.rs): events/s the tracker
# stores for 1, 1,000, 10,000 and 100,000 distinct users, next to the raw multi-row
# INSERT ceiling measured in the same run, on a throwaway PostgreSQL with fsync on (or a
# SQLite file).
#
# usage: scripts/bench-ingest.sh [postgres|sqlite]
# env:   EVENTS (200000 per phase), USERS ("1 1000 10000 100000"), ROUNDS (3),
#        MAX_BATCH, CONCURRENCY, QUEUE (the server's defaults), BENCH_BIN (a bench_ingest
#        binary built elsewhere, to compare commits, instead of this tree's)
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-postgres}
source scripts/lib.sh
work=$(mktemp -d /tmp/usage-ingest.XXXXXX)
chmod 755 "$work"
cleanup() { stop_throwaway_postgres; rm -rf "$work"; }
trap cleanup EXIT
case "$backend" in
  postgres)
    start_throwaway_postgres "$work/pg"
    echo "== PostgreSQL fsync=$("${psql_cmd[@]}" -c 'SHOW fsync') synchronous_commit=$("${psql_cmd[@]}" -c 'SHOW synchronous_commit')"
    ;;
  sqlite) export DATABASE_URL="sqlite://$work/usage.db" ;;
  *) echo "usage: $0 [postgres|sqlite]" >&2; exit 2 ;;
esac
if [ -n "${BENCH_BIN:-}" ]; then
  "$BENCH_BIN"
else
  cargo run --release -q -p usage-store --example bench_ingest
fi
