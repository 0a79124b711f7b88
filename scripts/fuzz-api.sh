#!/usr/bin/env bash
# Fuzzes the HTTP API with Schemathesis from its own OpenAPI document, against a live
# server on SQLite and on PostgreSQL, with real credentials for every security scheme (an
# enterprise API key, a user token, an admin token, the cron secret) and every check on.
# Exits non-zero on any failure.
#
# usage: scripts/fuzz-api.sh [sqlite|postgres|both]   (default both)
# env:   FUZZ_EXAMPLES (examples per operation, default 30; `just fuzz-api` runs 300),
#        USAGE_SERVER (the binary; default: cargo build, debug profile)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
backends=${1:-both}
[ "$backends" = both ] && backends="sqlite postgres"
examples=${FUZZ_EXAMPLES:-30}
if ! command -v st >/dev/null 2>&1; then
  echo "== installing schemathesis"
  python3 -m pip install -q schemathesis
fi
if [ -z "${USAGE_SERVER:-}" ]; then
  cargo build -q -p usage-server
  USAGE_SERVER=target/debug/usage-server
fi
bin=$(realpath "$USAGE_SERVER")
config=$(realpath scripts/fuzz/schemathesis.toml)
work=$(mktemp -d /tmp/usage-fuzz.XXXXXX)
chmod 755 "$work"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT
failed=0
for backend in $backends; do
  echo "== schemathesis on $backend, $examples examples per operation"
  case "$backend" in
    sqlite) export DATABASE_URL="sqlite://$work/usage.db" ;;
    postgres) start_throwaway_postgres "$work/pg" ;;
    *) echo "unknown backend $backend" >&2; exit 2 ;;
  esac
  export JWT_SECRET=fuzz-secret-fuzz-secret-fuzz-secret-fuzz
  export FUZZ_CRON_SECRET=fuzz-cron-secret-fuzz-cron-secret-0123
  export FUZZ_INGEST_SECRET=fuzz-ingest-secret-fuzz-ingest-secret-01
  metered=$("$bin" users create --email "metered-$backend@example.com" --plan enterprise)
  export FUZZ_API_KEY=$("$bin" keys create --user "$metered")
  user=$("$bin" users create --email "user-$backend@example.com" --plan pro)
  export FUZZ_SUBJECT_ID=$("$bin" users create --email "subject-$backend@example.com" --plan free)
  export FUZZ_USER_TOKEN=$("$bin" token --user "$user" --ttl-secs 7200)
  admin=$("$bin" users create --email "admin-$backend@example.com" --plan enterprise)
  export FUZZ_ADMIN_TOKEN=$("$bin" token --user "$admin" --ttl-secs 7200)
  # The plan the archive endpoint and the meter the meter endpoint are fuzzed on
  # (schemathesis.toml).
  printf '[[meters]]\nkey = "scratch"\nname = "Scratch"\nunit = "unit"\naggregation = "sum"\n[[plans]]\nkey = "scratch"\nname = "Scratch"\nprice_cents = 0\n' > "$work/scratch.toml"
  "$bin" plans apply "$work/scratch.toml" > /dev/null
  port=$(free_port)
  # Stripe configured (never reached: no user has overage), so that a live billing run is
  # a 200, not the 503 of a server without Stripe.
  CRON_SECRET=$FUZZ_CRON_SECRET INGEST_SECRET=$FUZZ_INGEST_SECRET ADMIN_ECO_IDS=$admin \
    STRIPE_SECRET_KEY=sk_test_fuzz STRIPE_API_BASE=http://127.0.0.1:9 \
    STRIPE_WEBHOOK_SECRET=whsec_fuzz_fuzz_fuzz_fuzz_fuzz_fuzz_fuzz \
    ADMIN_RATE_LIMIT_PER_SEC=10000 ADMIN_RATE_LIMIT_BURST=10000 RUST_LOG=warn \
    "$bin" serve --bind "127.0.0.1:$port" > "$work/server-$backend.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.2
  done
  if ! st --config-file "$config" run "http://127.0.0.1:$port/api/openapi.json" \
      --checks all --max-examples "$examples" --phases examples,coverage,fuzzing \
      --workers 1 --no-color; then
    failed=1
    echo "== server log ($backend), last lines:"
    tail -20 "$work/server-$backend.log"
  fi
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
  stop_throwaway_postgres; pg_ctl=""
done
exit $failed
