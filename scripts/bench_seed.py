#!/usr/bin/env python3
"""Seeds N users with one API key each straight into a migrated nexus-usage database, for
the benchmarks, and prints the keys (one per line). The keys have the real shape and only
their SHA-256 is stored, as `usage-server keys create` does; seeding 100,000 users through
the CLI would start 200,000 processes.

usage: bench_seed.py URL N [PLAN] > keys.txt
  URL   sqlite://PATH, or postgres://... (loaded with psql's COPY; psql must be on PATH or
        given in $PSQL)
  SEED_PRINT=users prints the user ids instead of the keys (for the events benchmark).
"""

import hashlib
import os
import secrets
import string
import subprocess
import sys
from datetime import datetime, timezone

ALPHABET = string.ascii_letters + string.digits


def random_base62(n):
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def rows(n, plan, run):
    now = datetime.now(timezone.utc)
    for i in range(n):
        key = "eco_live_" + random_base62(40)
        yield {
            "user": "eco_usr_" + random_base62(20),
            "email": f"bench-{run}-{i}@example.com",
            "plan": plan,
            "key_id": "eco_key_" + random_base62(20),
            "prefix": key[:13],
            "hash": hashlib.sha256(key.encode()).hexdigest(),
            "key": key,
            "now": now,
        }


def seed_sqlite(path, seeded):
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA busy_timeout = 30000")
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with db:
        db.executemany(
            "INSERT INTO eco_users (id, email, plan, created_at) VALUES (?, ?, ?, ?)",
            [(r["user"], r["email"], r["plan"], stamp(r["now"])) for r in seeded],
        )
        db.executemany(
            "INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at) "
            "VALUES (?, ?, 'bench', ?, ?, ?)",
            [(r["key_id"], r["user"], r["prefix"], r["hash"], stamp(r["now"])) for r in seeded],
        )
    db.close()


def seed_postgres(url, seeded):
    psql = os.environ.get("PSQL", "psql")
    users = "".join(
        f"{r['user']}\t{r['email']}\t{r['plan']}\t{r['now'].isoformat()}\n" for r in seeded
    )
    keys = "".join(
        f"{r['key_id']}\t{r['user']}\tbench\t{r['prefix']}\t{r['hash']}\t{r['now'].isoformat()}\n"
        for r in seeded
    )
    for table, columns, data in [
        ("eco_users", "id, email, plan, created_at", users),
        ("eco_api_keys", "id, user_id, name, prefix, key_hash, created_at", keys),
    ]:
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", f"COPY {table} ({columns}) FROM STDIN"],
            input=data.encode(),
            check=True,
        )


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    url, n = sys.argv[1], int(sys.argv[2])
    plan = sys.argv[3] if len(sys.argv) > 3 else "enterprise"
    seeded = list(rows(n, plan, random_base62(6)))
    if url.startswith("sqlite://"):
        seed_sqlite(url[len("sqlite://"):], seeded)
    elif url.startswith("postgres"):
        seed_postgres(url, seeded)
    else:
        sys.exit(f"unsupported URL {url}")
    field = "user" if os.environ.get("SEED_PRINT") == "users" else "key"
    sys.stdout.write("".join(r[field] + "\n" for r in seeded))


if __name__ == "__main__":
    main()
