# Helpers shared by the benchmark scripts (sourced, not run).

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ensure_wrk() {
  if ! command -v wrk >/dev/null 2>&1; then
    echo "== installing wrk"
    as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq wrk >/dev/null
  fi
}

# Starts a throwaway PostgreSQL in "$1" (a directory) and sets DATABASE_URL, pg_ctl and
# pg_run (the prefix to run its tools as the right user). Stop it with stop_throwaway_postgres.
start_throwaway_postgres() {
  local dir=$1 bindir port
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$bindir/initdb" ] || { echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2; exit 1; }
  pg_ctl=$bindir/pg_ctl
  pg_dir=$dir
  pg_run=""
  if [ "$(id -u)" -eq 0 ]; then pg_run="runuser -u postgres --"; fi
  mkdir -p "$dir"
  if [ -n "$pg_run" ]; then chown postgres "$dir"; fi
  $pg_run "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  port=$(free_port)
  $pg_run "$pg_ctl" -D "$dir" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_buffers=512MB" start >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  psql_cmd=("$bindir/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
}

stop_throwaway_postgres() {
  if [ -n "${pg_ctl:-}" ]; then $pg_run "$pg_ctl" -D "$pg_dir" -m immediate stop >/dev/null 2>&1 || true; fi
}

to_ms() { # wrk latency like 812.00us / 1.23ms / 1.02s
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}
