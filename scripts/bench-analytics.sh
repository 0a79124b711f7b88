#!/usr/bin/env bash
# Analytics at scale on PostgreSQL: loads USERS users and ROWS usage rows spread over the
# last 30 days into a throwaway PostgreSQL, times the daily aggregation of each past day,
# then loads each user endpoint with wrk (rotating over 100 users' tokens) and each admin
# endpoint (the first user is the admin) and prints requests/s, p50 and p99.
#
# usage: scripts/bench-analytics.sh      env: USERS (10000), ROWS (10000000), BENCH_DURATION (10s),
#        ONLY_DASHBOARD (0; 1 skips the JSON endpoints and measures the dashboard's admin pages only)
# The admin issue's figures: USERS=100000 scripts/bench-analytics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

users=${USERS:-10000}
rows=${ROWS:-10000000}
duration=${BENCH_DURATION:-10s}
ensure_wrk
cargo build --release -q -p usage-server
bin=$PWD/target/release/usage-server
work=$(mktemp -d /tmp/usage-bench-analytics.XXXXXX)
chmod 755 "$work"
server_pid=""
cleanup() {
  [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT

start_throwaway_postgres "$work/pg"
export JWT_SECRET=bench-secret-bench-secret-bench-secret-0123 RUST_LOG=warn DAILY_AGGREGATION=false
# The admin of the admin endpoints, without the admin rate limit getting in the way.
export ADMIN_ECO_IDS=eco_usr_bench000001 ADMIN_RATE_LIMIT_PER_SEC=10000 ADMIN_RATE_LIMIT_BURST=10000
"$bin" migrate 2>/dev/null

echo "== loading $users users and $rows usage rows over 30 days"
started=$(date +%s)
"${psql_cmd[@]}" <<SQL
INSERT INTO eco_users (id, email, plan, created_at)
SELECT 'eco_usr_bench' || lpad(i::text, 6, '0'), 'user' || i || '@bench.example',
       CASE WHEN i % 20 = 0 THEN 'enterprise' WHEN i % 3 = 0 THEN 'pro' ELSE 'free' END,
       now() - interval '60 days'
FROM generate_series(1, $users) i;
INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at)
SELECT 'eco_key_bench' || lpad(i::text, 6, '0'), 'eco_usr_bench' || lpad(i::text, 6, '0'),
       'bench', 'eco_live_bnch', md5(i::text) || md5((i + 1)::text), now() - interval '60 days'
FROM generate_series(1, $users) i;
-- Bulk load without the indexes, then build them.
DROP INDEX eco_api_usage_event_key;
DROP INDEX eco_api_usage_user_time_cover_idx;
DROP INDEX eco_api_usage_time_idx;
INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, method, status_code,
                           response_time_ms, created_at)
SELECT gen_random_uuid(),
       'eco_usr_bench' || lpad((1 + i % $users)::text, 6, '0'),
       'eco_key_bench' || lpad((1 + i % $users)::text, 6, '0'),
       (ARRAY['/api/v1/ping', '/api/v1/items', '/api/v1/items/{id}', '/api/v1/search',
              '/api/v1/orders'])[1 + (i / 7) % 5],
       CASE WHEN i % 3 = 0 THEN 'POST' ELSE 'GET' END,
       CASE WHEN i % 50 = 0 THEN 500 WHEN i % 40 = 0 THEN 404 ELSE 200 END,
       1 + i % 97,
       date_trunc('day', now()) - interval '29 days'
         + (i::double precision / $rows) * (now() - (date_trunc('day', now()) - interval '29 days'))
FROM generate_series(1, $rows) i;
CREATE UNIQUE INDEX eco_api_usage_event_key ON eco_api_usage (event_id, created_at);
CREATE INDEX eco_api_usage_user_time_cover_idx ON eco_api_usage (user_id, created_at)
  INCLUDE (endpoint, method, status_code, response_time_ms);
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);
INSERT INTO eco_usage_records (user_id, period_start, period_end, api_calls, updated_at)
SELECT user_id, date_trunc('month', now(), 'UTC'),
       date_trunc('month', now(), 'UTC') + interval '1 month', count(*), now()
FROM eco_api_usage WHERE created_at >= date_trunc('month', now(), 'UTC')
GROUP BY user_id;
VACUUM (ANALYZE);
SQL
echo "loaded in $(( $(date +%s) - started )) s"

echo "== daily aggregation, each of the 29 past days"
: >"$work/agg"
for back in $(seq 29 -1 1); do
  day=$(date -u -d "-$back day" +%F)
  t0=$(date +%s.%N)
  "$bin" aggregate --date "$day" >"$work/agg-out"
  t1=$(date +%s.%N)
  echo "$day $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $(cat "$work/agg-out")" >>"$work/agg"
done
rows_per_day=$("${psql_cmd[@]}" -c "SELECT count(*) FROM eco_api_usage WHERE created_at >= date_trunc('day', now()) - interval '1 day' AND created_at < date_trunc('day', now())")
awk '{ print $2 }' "$work/agg" | sort -g | awk -v r="$rows_per_day" '{ v[NR] = $1 } END {
  printf "one day (%d rows): min %.2f s, median %.2f s, max %.2f s (CLI process included)\n", r, v[1], v[int((NR + 1) / 2)], v[NR] }'

# Measure the steady state: the aggregation just wrote ~290k daily rows and the load
# dirtied gigabytes; let vacuum and a checkpoint happen now rather than under wrk.
"${psql_cmd[@]}" -c "VACUUM (ANALYZE)" -c "CHECKPOINT"

echo "== user endpoints under load (wrk -t1 -c8 -d$duration, 100 users' tokens in turn)"
for i in $(seq 1 100); do
  "$bin" token --user "eco_usr_bench$(printf '%06d' $((i * 97 % users + 1)))" --ttl-secs 3600
done >"$work/tokens"
cat >"$work/rotate.lua" <<'LUA'
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do tokens[#tokens + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. tokens[n % #tokens + 1] })
end
LUA
port=$(free_port)
"$bin" serve --bind "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
printf '%-48s %12s %10s %10s %8s\n' endpoint "requests/s" "p50 ms" "p99 ms" non-2xx
"$bin" token --user eco_usr_bench000001 --ttl-secs 3600 >"$work/admin-token"
measure() { # tokens file, path[, connections]
  local c=${3:-8}
  TOKENS_FILE=$1 wrk -t1 -c"$c" -d2s -s "$work/rotate.lua" "http://127.0.0.1:$port$2" >/dev/null
  TOKENS_FILE=$1 wrk -t1 -c"$c" -d"$duration" --latency -s "$work/rotate.lua" \
    "http://127.0.0.1:$port$2" >"$work/wrk.txt"
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.txt")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$work/wrk.txt")
  printf '%-48s %12.0f %10.3f %10.3f %8s\n' "$2" "$rps" "$p50" "$p99" "${non2xx:-0}"
}
only_dashboard=${ONLY_DASHBOARD:-0}
if [ "$only_dashboard" != 1 ]; then
for path in /api/usage/current "/api/usage/history?days=30" "/api/usage/endpoints?days=7" /api/usage/overage; do
  measure "$work/tokens" "$path"
done
# One admin dashboard at a time (-c1: the admin rate limit is 5/s by default), then 8
# requests at once.
for c in 1 8; do
echo "== admin endpoints (wrk -t1 -c$c -d$duration, one admin)"
for path in /api/admin/analytics/overview \
  "/api/admin/analytics/users?sort=api_calls&order=desc" \
  "/api/admin/analytics/users?sort=created_at&order=desc" \
  "/api/admin/analytics/users?sort=email&order=asc" \
  "/api/admin/analytics/users?sort=revenue&order=desc" \
  "/api/admin/analytics/users?plan=pro&sort=api_calls&page=50" \
  "/api/admin/analytics/users?q=user4242"; do
  measure "$work/admin-token" "$path" "$c"
done
done
fi

# The dashboard's admin pages (HTML), one admin at a time: a session from a one-time link.
echo "== dashboard admin pages (wrk -t1 -c1 -d$duration, one admin session)"
link=$(PUBLIC_URL="http://127.0.0.1:$port" "$bin" login-link --user eco_usr_bench000001)
# The link's page posts its token back (same origin), which starts the session.
session=$(curl -s -o /dev/null -D - -X POST -H "Origin: http://127.0.0.1:$port" \
    --data-urlencode "token=${link##*token=}" "http://127.0.0.1:$port/dashboard/login" \
  | awk -F'[=;]' 'tolower($1) ~ /^set-cookie: usage_session/ { print $2 }')
[ -n "$session" ] || { echo "no dashboard session" >&2; exit 1; }
cat >"$work/cookie.lua" <<LUA
request = function()
  return wrk.format("GET", nil, { ["Cookie"] = "usage_session=$session" })
end
LUA
for path in /dashboard/admin \
  "/dashboard/admin/users?sort=api_calls&order=desc" \
  "/dashboard/admin/users?sort=created_at&order=desc" \
  "/dashboard/admin/users?sort=email&order=asc" \
  "/dashboard/admin/users?sort=revenue&order=desc" \
  "/dashboard/admin/users?plan=pro&sort=api_calls&page=50" \
  "/dashboard/admin/users?q=user4242" \
  /dashboard/admin/users/eco_usr_bench004242 \
  /dashboard/admin/audit; do
  wrk -t1 -c1 -d2s -s "$work/cookie.lua" "http://127.0.0.1:$port$path" >/dev/null
  wrk -t1 -c1 -d"$duration" --latency -s "$work/cookie.lua" "http://127.0.0.1:$port$path" >"$work/wrk.txt"
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.txt")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$work/wrk.txt")
  printf '%-52s %12.0f %10.3f %10.3f %8s\n' "$path" "$rps" "$p50" "$p99" "${non2xx:-0}"
done

