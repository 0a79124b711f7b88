#!/usr/bin/env bash
# Benchmark of POST /api/events: sustained events/s of CloudEvents batches (1,000 events a
# request, every id new, subjects taken in turn from USERS distinct users, one `tokens`
# quantity each) sent by wrk to the release server, on a throwaway PostgreSQL with fsync
# on or a SQLite file. Compare with the tracker's own ceiling at the same number of users
# (scripts/bench-ingest.sh): events are validated, deduplicated by (source, id) and added
# to each user's period and day of the meter in the request's own transaction.
#
# usage: scripts/bench-events.sh [sqlite|postgres]
# env:   USERS (1000), BATCH (1000 events a request), BENCH_DURATION (20s),
#        BENCH_CONNECTIONS (4), BENCH_BIN (a server binary built elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-sqlite}
users=${USERS:-1000}
batch=${BATCH:-1000}
duration=${BENCH_DURATION:-20s}
connections=${BENCH_CONNECTIONS:-4}
source scripts/lib.sh
ensure_wrk
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --release -q -p usage-server
  bin=$PWD/target/release/usage-server
fi
work=$(mktemp -d /tmp/usage-events.XXXXXX)
chmod 755 "$work"
server_pid=
cleanup() {
  [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT
case "$backend" in
  sqlite) export DATABASE_URL="sqlite://$work/usage.db" ;;
  postgres)
    start_throwaway_postgres "$work/pg"
    export PSQL=${psql_cmd[0]}
    echo "== PostgreSQL fsync=$("${psql_cmd[@]}" -c 'SHOW fsync') synchronous_commit=$("${psql_cmd[@]}" -c 'SHOW synchronous_commit')"
    ;;
  *) echo "usage: $0 [sqlite|postgres]" >&2; exit 2 ;;
esac
export JWT_SECRET=bench-secret-bench-secret-bench-secret-0123
export INGEST_SECRET=bench-ingest-secret-bench-ingest-secret-01
export RUST_LOG=warn
"$bin" migrate 2>/dev/null
printf '[[meters]]\nkey = "tokens"\nname = "Tokens"\nunit = "token"\naggregation = "sum"\n' >"$work/meters.toml"
"$bin" plans apply "$work/meters.toml" >/dev/null
SEED_PRINT=users python3 scripts/bench_seed.py "$DATABASE_URL" "$users" enterprise >"$work/users"
port=$(free_port)
"$bin" serve --bind "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/api/events"
args=(-s scripts/post-events.lua "$url" -- "$work/users" "$INGEST_SECRET" "$batch")
wrk -t1 -c"$connections" -d2s "${args[@]}" warm >/dev/null
wrk -t1 -c"$connections" -d"$duration" --latency "${args[@]}" measured >"$work/wrk.txt"
rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.txt")
p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
errors=$(awk '/Non-2xx/ {print $5}' "$work/wrk.txt")
[ -z "$errors" ] || { echo "non-2xx answers: $errors" >&2; cat "$work/wrk.txt" >&2; exit 1; }
awk -v r="$rps" -v b="$batch" -v u="$users" -v c="$connections" -v p50="$p50" -v p99="$p99" -v be="$backend" \
  'BEGIN { printf "%s, %d users, %d connections, %d events a request: %.0f events/s (%.1f requests/s), p50 %s, p99 %s\n", be, u, c, b, r * b, r, p50, p99 }'
