#!/usr/bin/env bash
# Library crates other than usage-store must not depend on diesel (normal dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for crate in usage-core usage-auth usage-billing usage-analytics; do
  tree=$(cargo tree -p "$crate" -e normal --prefix none)
  if grep -qE '^diesel(-async|_migrations)? ' <<<"$tree"; then
    echo "error: $crate depends on diesel; only usage-store may" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "ok: no library crate but usage-store depends on diesel"
exit "$status"
