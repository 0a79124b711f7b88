#!/usr/bin/env bash
# Usage data lifecycle on PostgreSQL (fsync on), every figure next to its baseline from the
# same run:
#   1. ingest into the partitioned eco_api_usage vs the same table unpartitioned
#      (crates/usage-store/examples/bench_ingest.rs on two databases of one cluster);
#   2. removing one month of ROWS calls: dropping its partition vs DELETE on the plain
#      table (seconds and WAL written);
#   3. `usage-server export` of EXPORT_ROWS calls of one user (and a tenth of them):
#      rows/s and peak memory, NDJSON and CSV.
#
# usage: scripts/bench-lifecycle.sh
# env:   ROWS (10000000), EXPORT_ROWS (1000000), EVENTS and USERS as bench-ingest.sh
#        (200000, "1000 10000"), PARTS ("1 2 3": which of the three to run)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
rows=${ROWS:-10000000}
parts=" ${PARTS:-1 2 3} "
part() { [[ "$parts" == *" $1 "* ]]; }
export_rows=${EXPORT_ROWS:-1000000}
export EVENTS=${EVENTS:-200000} USERS=${USERS:-"1000 10000"}
work=$(mktemp -d /tmp/usage-lifecycle.XXXXXX)
chmod 755 "$work"
cleanup() { stop_throwaway_postgres; rm -rf "$work"; }
trap cleanup EXIT
start_throwaway_postgres "$work/pg"
base_url=$DATABASE_URL
echo "== PostgreSQL fsync=$("${psql_cmd[@]}" -c 'SHOW fsync') synchronous_commit=$("${psql_cmd[@]}" -c 'SHOW synchronous_commit'), $(nproc) cores"
"${psql_cmd[@]}" -c "CREATE DATABASE parted" -c "CREATE DATABASE plain"
parted_url=${base_url%/postgres}/parted
plain_url=${base_url%/postgres}/plain
cargo build --release -q -p usage-server
cargo build --release -q -p usage-store --example bench_ingest
bin=target/release/usage-server
DATABASE_URL=$parted_url JWT_SECRET=bench-secret-bench-secret-bench-secret $bin migrate >/dev/null
DATABASE_URL=$plain_url JWT_SECRET=bench-secret-bench-secret-bench-secret $bin migrate >/dev/null
psql_on() { # $1 database, then psql arguments
  local db=$1 cmd=("${psql_cmd[@]}")
  shift
  cmd[${#cmd[@]}-1]=$db
  "${cmd[@]}" "$@"
}
# The plain layout: the same columns and indexes in one table, as before partitioning.
psql_on plain -c "
DROP TABLE eco_api_usage;
CREATE TABLE eco_api_usage (
    event_id UUID NOT NULL, user_id TEXT NOT NULL, api_key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL, method TEXT NOT NULL, status_code INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL, created_at TIMESTAMPTZ NOT NULL);
CREATE UNIQUE INDEX eco_api_usage_event_key ON eco_api_usage (event_id, created_at);
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);
CREATE INDEX eco_api_usage_user_time_cover_idx ON eco_api_usage (user_id, created_at)
    INCLUDE (endpoint, method, status_code, response_time_ms);"

if part 1; then
echo
echo "== 1. ingest: partitioned (this month's partition) vs one plain table"
for layout in parted plain; do
  url=${base_url%/postgres}/$layout
  echo "-- $layout"
  DATABASE_URL=$url target/release/examples/bench_ingest | tee "$work/ingest-$layout.txt"
done
python3 - "$work/ingest-parted.txt" "$work/ingest-plain.txt" <<'EOF'
import sys
def rates(path):
    out = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            out[int(parts[0])] = (float(parts[1]), float(parts[2]))
    return out
parted, plain = rates(sys.argv[1]), rates(sys.argv[2])
print(f"{'users':>8} {'tracker parted/plain':>22} {'raw parted/plain':>18}")
for users in sorted(parted):
    print(f"{users:>8} {parted[users][0] / plain[users][0]:>21.2f}x {parted[users][1] / plain[users][1]:>17.2f}x")
EOF
fi

if part 2; then
echo
echo "== 2. removing a month of $rows calls (January 2025)"
load() { # $1 database
  psql_on "$1" -c "
    INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, method, status_code,
                               response_time_ms, created_at)
    SELECT gen_random_uuid(), 'eco_usr_bench' || (i % 1000), 'eco_key_bench' || (i % 1000),
           '/api/v1/ping', 'GET', 200, 1 + i % 97,
           '2025-01-01'::timestamptz + (i::float8 / $rows) * interval '31 days'
    FROM generate_series(0, $rows - 1) i;
    CHECKPOINT;"
}
psql_on parted -c "CREATE TABLE eco_api_usage_p2025_01 PARTITION OF eco_api_usage
                   FOR VALUES FROM ('2025-01-01 00:00:00+00') TO ('2025-02-01 00:00:00+00')"
started=$(date +%s); load parted; echo "loaded the partition in $(( $(date +%s) - started )) s"
started=$(date +%s); load plain; echo "loaded the plain table in $(( $(date +%s) - started )) s"
psql_on parted -c "SELECT 'storage per call: ' || round(pg_total_relation_size('eco_api_usage_p2025_01')::numeric / $rows) || ' bytes (heap ' || round(pg_relation_size('eco_api_usage_p2025_01')::numeric / $rows) || ', indexes the rest)'"
measure() { # $1 database, $2 label, $3 SQL; prints seconds and WAL bytes
  local lsn0 t0 t1 lsn1
  lsn0=$(psql_on "$1" -c "SELECT pg_current_wal_lsn()")
  t0=$(date +%s.%N)
  psql_on "$1" -c "$3" >/dev/null
  t1=$(date +%s.%N)
  lsn1=$(psql_on "$1" -c "SELECT pg_current_wal_lsn()")
  local wal
  wal=$(psql_on "$1" -c "SELECT pg_wal_lsn_diff('$lsn1', '$lsn0')::bigint")
  python3 -c "print(f'{\"$2\":<34} {($t1 - $t0):>9.3f} s {int($wal) / 1048576:>10.1f} MiB WAL')"
  python3 -c "print($t1 - $t0)" > "$work/$2.secs"
}
# What the upgrade migration costs on this table: one unique index build and one scan
# checking the partition bound (the index can be built beforehand, CONCURRENTLY).
measure plain "migration: unique index build" \
  "DROP INDEX eco_api_usage_event_key;
   CREATE UNIQUE INDEX eco_api_usage_event_key ON eco_api_usage (event_id, created_at)"
measure plain "migration: bound check scan" \
  "SET enable_indexscan = off; SET enable_bitmapscan = off;
   SELECT count(*) FROM eco_api_usage WHERE NOT (created_at < '2027-01-01')"
measure parted "partition drop (prune-usage)" \
  "SET lock_timeout = '5s'; DROP TABLE eco_api_usage_p2025_01"
measure plain "DELETE on the plain table" \
  "DELETE FROM eco_api_usage WHERE created_at < '2025-02-01'"
# The space a DELETE frees is only reusable once vacuumed: part of its cost.
measure plain "VACUUM after the DELETE" "VACUUM eco_api_usage"
python3 -c "
d = float(open('$work/partition drop (prune-usage).secs').read())
x = float(open('$work/DELETE on the plain table.secs').read())
v = float(open('$work/VACUUM after the DELETE.secs').read())
print(f'partition drop takes {d / x:.3f}x the time of DELETE alone, {d / (x + v):.3f}x DELETE + VACUUM')"
fi

if part 3; then
echo
echo "== 3. export of one user's calls"
user=$(DATABASE_URL=$parted_url JWT_SECRET=bench-secret-bench-secret-bench-secret $bin users create --email export@example.com --plan pro)
key=eco_key_export
psql_on parted -c "
  INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at)
  VALUES ('$key', '$user', 'export', 'eco_live_expt', md5('export') || md5('export2'), now());
  INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, method, status_code,
                             response_time_ms, created_at)
  SELECT gen_random_uuid(), '$user', '$key', '/api/v1/items/{id}', 'GET', 200, 1 + i % 97,
         date_trunc('month', now()) + (i::float8 / $export_rows) * (now() - date_trunc('month', now()))
  FROM generate_series(0, $export_rows - 1) i;"
psql_on parted -c "VACUUM ANALYZE eco_api_usage"
echo "$(printf '%-8s %10s %12s %12s %14s' format rows seconds 'rows/s' 'peak RSS MiB')"
for format in ndjson csv; do
  for n in $((export_rows / 10)) $export_rows; do
    # The tenth: the newest calls (from the time that leaves a tenth).
    from=$(psql_on parted -c "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                             FROM eco_api_usage WHERE user_id = '$user'
                             ORDER BY created_at DESC OFFSET $((n - 1)) LIMIT 1")
    DATABASE_URL=$parted_url JWT_SECRET=bench-secret-bench-secret-bench-secret \
      /usr/bin/time -f '%e %M' -o "$work/time" \
      $bin export --user "$user" --from "$from" --format $format > "$work/out"
    read -r secs kib < "$work/time"
    lines=$(wc -l < "$work/out")
    [ "$format" = csv ] && lines=$((lines - 1))
    python3 -c "print(f'{\"$format\":<8} {$lines:>10} {$secs:>12.2f} {$lines / max($secs, 0.001):>12.0f} {$kib / 1024:>14.1f}')"
  done
done
fi
