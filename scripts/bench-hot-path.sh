#!/usr/bin/env bash
# Benchmark of the metered hot path under production-shaped load: many distinct
# customers (each request carries the next of N enterprise users' keys), PostgreSQL with
# fsync on, runs long enough for the tracker's queue to reach a steady state.
#
# For each number of keys it starts the release server once per mode and loads it with
# wrk on loopback:
#   bare      the sample route without the middleware (--bench-unmetered): the baseline
#   alone     the full middleware, every recorded call dropped (--bench-discard-usage):
#             the middleware's own cost (key cache, quota, tracker queue)
#   metered   end to end: the same, every call written to the database
#   durable   (BENCH_DURABLE=1) metered plus the fsync'd spool (USAGE_SPOOL_DIR)
#   forward   (in BENCH_MODES) forward auth: the same decision and recording asked at
#             /api/forward-auth, as a proxy would (X-Forwarded-Uri: /v1/items/42)
#   forward-alone  (in BENCH_MODES) forward auth, every recorded call dropped
#   units     (in BENCH_MODES) metered, the handler reporting 1,234 `tokens` with each
#             response (--bench-report-units; the meter is created first): units checked,
#             stored with the call, added to the period's and day's meter usage
#   units-limit  (in BENCH_MODES) the same, every user also given their own blocking
#             tokens limit, far above what the run reaches: the tokens balance checked
#             and taken at the door and a RateLimit item for it on every response. Run it
#             after the other modes (it changes every user's terms).
# and prints requests/s, p50, p99, the ratios to bare, the server's own CPU per request
# (`srv us`, from /proc) and PostgreSQL's (`db us`), and the tracker's queue depth at
# half time and at the end. A run whose queue is still growing, or whose requests waited
# for room in the queue, is marked NOT SUSTAINED: its throughput is not one the database
# keeps up with.
#
# usage: scripts/bench-hot-path.sh [sqlite|postgres]
# env:   BENCH_KEYS ("1000"; several: "1 1000 10000 100000"), BENCH_DURATION (30s),
#        BENCH_BIN (a server binary to measure instead of building this tree's),
#        BENCH_CONNECTIONS (32), BENCH_THREADS (1), BENCH_DURABLE (0), BENCH_WARMUP (2s,
#        or 1 s per 1,000 keys above 2,000), BENCH_MODES
#        ("bare alone metered"), BENCH_PLAN (enterprise: no quota headers; pro: quota
#        headers and IETF fields on every response)
set -euo pipefail
cd "$(dirname "$0")/.."

backend=${1:-sqlite}
key_counts=${BENCH_KEYS:-1000}
duration=${BENCH_DURATION:-30s}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-1}
modes=${BENCH_MODES:-bare alone metered}
if [ "${BENCH_DURABLE:-0}" = 1 ]; then modes="$modes durable"; fi
source scripts/lib.sh
ensure_wrk
# BENCH_BIN: a server binary built elsewhere (another commit, to compare), else this tree's.
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --release -q -p usage-server
  bin=$PWD/target/release/usage-server
fi
work=$(mktemp -d /tmp/usage-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT

case "$backend" in
  sqlite)
    export DATABASE_URL="sqlite://$work/usage.db"
    ;;
  postgres)
    start_throwaway_postgres "$work/pg"
    export PSQL=${psql_cmd[0]}
    fsync=$("${psql_cmd[@]}" -c 'SHOW fsync')
    sync_commit=$("${psql_cmd[@]}" -c 'SHOW synchronous_commit')
    echo "== PostgreSQL fsync=$fsync synchronous_commit=$sync_commit"
    ;;
  *) echo "usage: $0 [sqlite|postgres]" >&2; exit 2 ;;
esac
export JWT_SECRET=bench-secret-bench-secret-bench-secret-0123
export RUST_LOG=warn

"$bin" migrate 2>/dev/null
most=$(printf '%s\n' $key_counts | sort -n | tail -1)
plan=${BENCH_PLAN:-enterprise}
python3 scripts/bench_seed.py "$DATABASE_URL" "$most" "$plan" >"$work/keys.all"
echo "== seeded $most $plan users, one key each"

start_server() { # $1: log file, rest: extra args; sets $port and $server_pid
  port=$(free_port)
  RUST_LOG=info "$bin" "${@:2}" serve --bind "127.0.0.1:$port" >"$1" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.1; done
  echo "server did not start:" >&2; cat "$1" >&2; exit 1
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; }
metric() { curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
# CPU ticks (user + system, every thread) a process has used so far.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# CPU ticks of every PostgreSQL process so far (0 on SQLite, which runs in the server).
db_ticks() {
  if [ "$backend" != postgres ]; then echo 0; return; fi
  local total=0 pid
  for pid in $(pgrep -x postgres); do total=$(( total + $(cpu_ticks "$pid" 2>/dev/null || echo 0) )); done
  echo "$total"
}
seconds_of() { awk -v d="$1" 'BEGIN { n = d + 0; if (d ~ /m$/) n *= 60; print n }'; }

run_wrk() { # $1: port, $2: out file, $3: keys file or "" (bare), $4: path (/api/v1/ping)
  local script=()
  if [ -n "$3" ]; then script=(-s scripts/rotate-keys.lua); fi
  local url="http://127.0.0.1:$1${4:-/api/v1/ping}"
  if [ -n "${4:-}" ]; then script+=(-H "X-Forwarded-Uri: /v1/items/42"); fi
  # Warm-up: 2 s, or a second per 1,000 keys (BENCH_WARMUP), so that the measured run is
  # not every customer's first call (which reads the database: not a steady state).
  local keys=1; [ -z "$3" ] || keys=$(wc -l <"$3")
  local warmup=${BENCH_WARMUP:-$(( keys > 2000 ? keys / 1000 : 2 ))s}
  wrk -t"$threads" -c"$connections" -d"$warmup" "${script[@]}" "$url" ${3:+-- "$3"} >/dev/null
  local half; half=$(awk -v s="$(seconds_of "$duration")" 'BEGIN { print s / 2 }')
  ( sleep "$half"; metric usage_tracker_queue_depth >"$2.mid" 2>/dev/null || echo 0 >"$2.mid" ) &
  local sampler=$!
  local cpu_before; cpu_before=$(cpu_ticks "$server_pid")
  local db_before; db_before=$(db_ticks)
  wrk -t"$threads" -c"$connections" -d"$duration" --latency "${script[@]}" "$url" ${3:+-- "$3"} >"$2"
  echo $(( $(cpu_ticks "$server_pid") - cpu_before )) >"$2.cpu"
  echo $(( $(db_ticks) - db_before )) >"$2.dbcpu"
  wait "$sampler" || true
  metric usage_tracker_queue_depth >"$2.end" 2>/dev/null || echo 0 >"$2.end"
  metric usage_tracker_queue_full_total >"$2.full" 2>/dev/null || echo 0 >"$2.full"
}
# Each mode starts on a quiet database: without this, the vacuum and checkpoint that the
# last end-to-end run's writes set off (or the seeding's) ran during the next mode, and
# slowed its baseline.
quiesce_database() {
  if [ "$backend" = postgres ]; then
    "${psql_cmd[@]}" -c 'VACUUM (ANALYZE)' >/dev/null
    "${psql_cmd[@]}" -c 'CHECKPOINT' >/dev/null
  fi
}
rps_of() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
pct_of() { to_ms "$(awk -v p="$2%" '$1 == p {print $2}' "$1")"; }

echo "== $backend, $(nproc) cores, wrk -t$threads -c$connections -d$duration, $plan keys rotated per request"
printf '%-7s %-13s %11s %8s %8s %8s %8s %8s %8s %8s  %s\n' keys mode "requests/s" "x bare" "p50 ms" "p99 ms" "srv us" "db us" "q mid" "q end" steady
for n in $key_counts; do
  head -n "$n" "$work/keys.all" >"$work/keys"
  for mode in $modes; do
    quiesce_database
    case "$mode" in
      # The same requests, key header included: wrk's own cost (the Lua script) is in
      # the baseline too.
      bare) start_server "$work/$mode.log" --bench-unmetered; run_wrk "$port" "$work/$mode.txt" "$work/keys" ;;
      alone) start_server "$work/$mode.log" --bench-discard-usage; run_wrk "$port" "$work/$mode.txt" "$work/keys" ;;
      metered) start_server "$work/$mode.log"; run_wrk "$port" "$work/$mode.txt" "$work/keys" ;;
      durable) USAGE_SPOOL_DIR="$work/spool" start_server "$work/$mode.log"; run_wrk "$port" "$work/$mode.txt" "$work/keys" ;;
      forward) start_server "$work/$mode.log"; run_wrk "$port" "$work/$mode.txt" "$work/keys" /api/forward-auth ;;
      forward-alone) start_server "$work/$mode.log" --bench-discard-usage; run_wrk "$port" "$work/$mode.txt" "$work/keys" /api/forward-auth ;;
      units|units-limit)
        printf '[[meters]]\nkey = "tokens"\nname = "Tokens"\nunit = "token"\naggregation = "sum"\n' >"$work/meters.toml"
        "$bin" plans apply "$work/meters.toml" >/dev/null
        if [ "$mode" = units-limit ]; then
          tokens_terms='{"limits": [{"meter": "tokens", "included": 1000000000000, "over_limit": "block"}]}'
          if [ "$backend" = postgres ]; then
            "${psql_cmd[@]}" -c "UPDATE eco_users SET overrides = '$tokens_terms'" >/dev/null
          else
            python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute("UPDATE eco_users SET overrides = ?", (sys.argv[2],)); c.commit()' \
              "${DATABASE_URL#sqlite://}" "$tokens_terms"
          fi
        fi
        start_server "$work/$mode.log" --bench-report-units; run_wrk "$port" "$work/$mode.txt" "$work/keys" ;;
    esac
    stop_server
    rps=$(rps_of "$work/$mode.txt"); p50=$(pct_of "$work/$mode.txt" 50); p99=$(pct_of "$work/$mode.txt" 99)
    if [ "$mode" = bare ]; then bare_rps=$rps; bare_p50=$p50; bare_p99=$p99; fi
    mid=$(cat "$work/$mode.txt.mid"); end=$(cat "$work/$mode.txt.end"); full=$(cat "$work/$mode.txt.full")
    steady=yes
    if [ "$mode" != bare ]; then
      # Requests held back by a full queue, or the queue growing between half time and the
      # end by more than the batches in flight make it swing (USAGE_MAX_BATCH, 20,000):
      # the database is not keeping up.
      if awk -v m="${mid:-0}" -v e="${end:-0}" 'BEGIN { exit !(e > m + 20000) }' || [ "${full:-0}" != 0 ]; then
        steady="NOT SUSTAINED (queue full waits: ${full:-0})"
      fi
      non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$mode.txt")
      [ -z "$non2xx" ] || { echo "$mode answered $non2xx non-2xx responses" >&2; exit 1; }
    fi
    # The server's own CPU per request (µs; wrk and the kernel's share for wrk are not in
    # it), and PostgreSQL's (SQLite's is the server's): from ticks during the measured run.
    requests=$(awk '/requests in/ { print $1 }' "$work/$mode.txt")
    per_request() {
      awk -v t="$1" -v r="$requests" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.2f", (r > 0 ? t / hz * 1e6 / r : 0) }'
    }
    srv_us=$(per_request "$(cat "$work/$mode.txt.cpu")")
    db_us=-; [ "$backend" != postgres ] || db_us=$(per_request "$(cat "$work/$mode.txt.dbcpu")")
    printf '%-7s %-13s %11.0f %8.2f %8.3f %8.3f %8s %8s %8s %8s  %s\n' "$n" "$mode" "$rps" \
      "$(awk -v a="$rps" -v b="${bare_rps:-$rps}" 'BEGIN { print a / b }')" "$p50" "$p99" \
      "$srv_us" "$db_us" "${mid:--}" "${end:--}" "$steady"
    if [ "$mode" != bare ] && [ -n "${bare_rps:-}" ]; then
      awk -v l="$mode" -v a50="$p50" -v a99="$p99" -v b50="$bare_p50" -v b99="$bare_p99" \
        'BEGIN { printf "                 %s adds p50 %+.3f ms, p99 %+.3f ms\n", l, a50 - b50, a99 - b99 }'
    fi
  done
done
# Every admitted call of the last end-to-end run was written: its own count at shutdown.
if [ -f "$work/metered.log" ]; then
  written=$(grep -o 'flushed_total=[0-9]*' "$work/metered.log" | tail -1 | cut -d= -f2)
  unwritten=$(grep -o 'unwritten=[0-9]*' "$work/metered.log" | tail -1 | cut -d= -f2)
  echo "last metered server: wrote $written events, left $unwritten unwritten at shutdown"
fi
