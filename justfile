# Everyday recipes. Every one is a plain cargo or bash command underneath, so nothing
# here is needed to build, run or test (see README.md).

default:
    @just --list

# --- run ---

# Serve on the embedded SQLite default (sqlite://data/usage.db)
run *ARGS:
    cargo run --release -p usage-server -- {{ARGS}}

# Apply pending migrations to $DATABASE_URL (default: the SQLite file)
migrate:
    cargo run --release -p usage-server -- migrate

# --- check ---

# Format every crate
fmt:
    cargo fmt --all
    rustfmt --edition 2024 crates/usage-store/src/repositories.rs

# Fail if formatting is off
fmt-check:
    cargo fmt --all -- --check
    rustfmt --edition 2024 --check crates/usage-store/src/repositories.rs

# Clippy with warnings as errors
lint:
    cargo clippy --workspace --all-targets -- -D warnings

# Only usage-store may depend on diesel
check-deps:
    bash scripts/check-diesel-boundary.sh

# Every test (PostgreSQL tests start their own server)
test:
    cargo test --workspace

# The scale-out and fault tests, with their counts printed (two instances on one database,
# PostgreSQL stopped 30 s and restarted -m immediate, SIGTERM and SIGKILL under load); they
# are part of `cargo test --workspace` too
fault-tests:
    cargo test -p usage-server --test scale_out --test outage --test faults --test signals -- --nocapture --test-threads 1

# Build the API docs of every crate
doc:
    cargo doc --workspace --no-deps

# Line coverage of the whole workspace (every test, PostgreSQL ones included), per file
# and in total. Installs cargo-llvm-cov and Debian's llvm-22 (rustc's LLVM) when missing.
coverage:
    command -v cargo-llvm-cov >/dev/null || cargo install cargo-llvm-cov --locked
    command -v llvm-cov-22 >/dev/null || (apt-get update -qq && apt-get install -y -qq llvm-22)
    LLVM_COV=/usr/bin/llvm-cov-22 LLVM_PROFDATA=/usr/bin/llvm-profdata-22 cargo llvm-cov --workspace --summary-only

# What CI runs
ci:
    bash .ci/run

# --- measure ---

# Hot-path benchmark: bare route, middleware alone, end to end, with BENCH_KEYS distinct
# customers (default 1000; e.g. BENCH_KEYS="1 1000 10000 100000") (BACKEND: sqlite or postgres)
bench-hot-path BACKEND="sqlite":
    bash scripts/bench-hot-path.sh {{BACKEND}}

# Forward auth against the bare route, alone (calls dropped) and end to end (BACKEND: sqlite or postgres)
bench-forward-auth BACKEND="postgres":
    BENCH_MODES="bare alone forward-alone metered forward" bash scripts/bench-hot-path.sh {{BACKEND}}

# The doors suite: actix, forward auth, nginx auth_request, axum, on both backends
test-doors:
    cargo test -p usage-server --test doors -- --nocapture

# Screenshots of every dashboard page into docs/screenshots/ (the browser test on SQLite)
screenshots:
    DASHBOARD_SCREENSHOTS="$PWD/docs/screenshots" cargo test -p usage-server --test dashboard sqlite

# Mutation testing of the money and quota path (cargo-mutants; tens of minutes, not in CI):
# each file's mutants against its own crate's tests. Extra args go to cargo mutants.
mutants *ARGS:
    command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked
    cargo mutants --no-shuffle -p usage-billing -f crates/usage-billing/src/service.rs -f crates/usage-billing/src/stripe.rs {{ARGS}}
    cargo mutants --no-shuffle -p usage-core -f crates/usage-core/src/money.rs -f crates/usage-core/src/plan.rs -f crates/usage-core/src/period.rs -f crates/usage-core/src/quota.rs {{ARGS}}
    cargo mutants --no-shuffle -p usage-auth -f crates/usage-auth/src/keys.rs -f crates/usage-auth/src/jwt.rs -f crates/usage-auth/src/verify.rs {{ARGS}}

# The metering's own CPU per call (key check, quota, headers, record), no HTTP, one thread.
bench-meter KEYS="1000":
    cargo run --release -q -p usage-embed --example bench_meter -- {{KEYS}}

# Ingest: events/s the tracker stores for 1 to 100,000 users vs the raw INSERT ceiling
bench-ingest BACKEND="postgres":
    bash scripts/bench-ingest.sh {{BACKEND}}

# Partitioned vs plain ingest, a month removed by partition drop vs DELETE, export rows/s and memory (PostgreSQL).
bench-lifecycle:
    bash scripts/bench-lifecycle.sh

# Analytics at scale on PostgreSQL (USERS=10000 ROWS=10000000 by default)
bench-analytics:
    bash scripts/bench-analytics.sh

# Schemathesis against a live server on SQLite and PostgreSQL, 1,000 examples per operation (CI runs 100)
fuzz-api EXAMPLES="1000":
    FUZZ_EXAMPLES={{EXAMPLES}} bash scripts/fuzz-api.sh

# Memory soak: 100,000 distinct users through one server, twice; prints resident memory
# before, at each peak and after idle state is forgotten
soak-memory:
    cargo test --release -p usage-server --test soak_memory -- --ignored --nocapture

# Overage billing of USERS=10000 pro users against a local fake Stripe, on PostgreSQL
bench-billing:
    cargo run --release -p usage-billing --example bench_billing
