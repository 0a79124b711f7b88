#!/usr/bin/env bash
# Benchmark of the metered hot path. Starts the release server twice in one run: the
# sample route bare (--bench-unmetered) and the same route behind the full middleware
# (key check, quota, tracking into the real database), and a third time in durable mode
# (USAGE_SPOOL_DIR: every call fdatasync'd to a local spool before its response), loads
# each with wrk on loopback, and prints requests/s, p50 and p99 for each and the ratios.
# The spool lives under the system's temporary directory: check it is a real disk
# (`df -T`), or the fsync cost is not measured.
#
# usage: scripts/bench-hot-path.sh [sqlite|postgres]
# env:   BENCH_DURATION (10s), BENCH_CONNECTIONS (32), BENCH_THREADS (1), BENCH_ROUNDS (3)
set -euo pipefail
cd "$(dirname "$0")/.."

backend=${1:-sqlite}
duration=${BENCH_DURATION:-10s}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-1}
rounds=${BENCH_ROUNDS:-3}
source scripts/lib.sh
ensure_wrk
cargo build --release -q -p usage-server
bin=$PWD/target/release/usage-server
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
    ;;
  *) echo "usage: $0 [sqlite|postgres]" >&2; exit 2 ;;
esac
export JWT_SECRET=bench-secret-bench-secret-bench-secret-0123
export RUST_LOG=warn

# One pro user and key (pro: quota headers and overage counting on every call).
user=$("$bin" users create --email bench@example.com --plan pro)
key=$("$bin" keys create --user "$user" --name bench)

start_server() { # $1: log file, rest: extra args; sets $port and $server_pid
  port=$(free_port)
  RUST_LOG=info "$bin" "${@:2}" serve --bind "127.0.0.1:$port" >"$1" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.1; done
  echo "server did not start:" >&2; cat "$1" >&2; exit 1
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; }

run_wrk() { # $1: port, $2: out file, rest: wrk header args
  wrk -t"$threads" -c"$connections" -d2s "${@:3}" "http://127.0.0.1:$1/api/v1/ping" >/dev/null  # warm-up
  wrk -t"$threads" -c"$connections" -d"$duration" --latency "${@:3}" "http://127.0.0.1:$1/api/v1/ping" >"$2"
}
rps_of() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
pct_of() { to_ms "$(awk -v p="$2%" '$1 == p {print $2}' "$1")"; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "== $backend, $(nproc) cores, wrk -t$threads -c$connections -d$duration, $rounds rounds (bare and metered alternate)"
printf '%-8s %-10s %12s %10s %10s\n' round server "requests/s" "p50 ms" "p99 ms"
: >"$work/results"
total_admitted=0
for round in $(seq "$rounds"); do
  for mode in bare metered durable; do
    if [ "$mode" = bare ]; then
      start_server "$work/$mode.log" --bench-unmetered
      run_wrk "$port" "$work/$mode.txt"
    elif [ "$mode" = metered ]; then
      start_server "$work/$mode.log"
      run_wrk "$port" "$work/$mode.txt" -H "X-API-Key: $key"
    else
      USAGE_SPOOL_DIR="$work/spool" start_server "$work/$mode.log"
      run_wrk "$port" "$work/$mode.txt" -H "X-API-Key: $key"
    fi
    stop_server
    rps=$(rps_of "$work/$mode.txt"); p50=$(pct_of "$work/$mode.txt" 50); p99=$(pct_of "$work/$mode.txt" 99)
    printf '%-8s %-10s %12.0f %10.3f %10.3f\n' "$round" "$mode" "$rps" "$p50" "$p99"
    echo "$mode $rps $p50 $p99" >>"$work/results"
    if [ "$mode" != bare ]; then
      non2xx=$(awk '/Non-2xx/ {print $5}' "$work/$mode.txt")
      [ -z "$non2xx" ] || { echo "metered run answered $non2xx non-2xx responses" >&2; exit 1; }
    fi
  done
done
col() { awk -v m="$1" -v c="$2" '$1 == m { print $c }' "$work/results" | median; }
bare_rps=$(col bare 2); metered_rps=$(col metered 2)
bare_p50=$(col bare 3); metered_p50=$(col metered 3)
bare_p99=$(col bare 4); metered_p99=$(col metered 4)
durable_rps=$(col durable 2); durable_p50=$(col durable 3); durable_p99=$(col durable 4)
printf '%-8s %-10s %12.0f %10.3f %10.3f\n' median bare "$bare_rps" "$bare_p50" "$bare_p99"
printf '%-8s %-10s %12.0f %10.3f %10.3f\n' median metered "$metered_rps" "$metered_p50" "$metered_p99"
printf '%-8s %-10s %12.0f %10.3f %10.3f\n' median durable "$durable_rps" "$durable_p50" "$durable_p99"
ratio() { # $1 label, then rps, p50, p99 of the measured and of the baseline
  awk -v l="$1" -v m="$2" -v m50="$3" -v m99="$4" -v b="$5" -v b50="$6" -v b99="$7" \
    'BEGIN { printf "%s: throughput %.1f%%, p50 %+.3f ms, p99 %+.3f ms (medians)\n", l, 100*m/b, m50-b50, m99-b99 }'
}
ratio "metered/bare" "$metered_rps" "$metered_p50" "$metered_p99" "$bare_rps" "$bare_p50" "$bare_p99"
ratio "durable/bare" "$durable_rps" "$durable_p50" "$durable_p99" "$bare_rps" "$bare_p50" "$bare_p99"
ratio "durable/metered (the spool's cost)" "$durable_rps" "$durable_p50" "$durable_p99" "$metered_rps" "$metered_p50" "$metered_p99"

# Every admitted call was written: the server's own count at its last shutdown.
written=$(grep -o 'flushed_total=[0-9]*' "$work/metered.log" | tail -1 | cut -d= -f2)
unwritten=$(grep -o 'unwritten=[0-9]*' "$work/metered.log" | tail -1 | cut -d= -f2)
echo "last metered server: wrote $written events, left $unwritten unwritten at shutdown"
