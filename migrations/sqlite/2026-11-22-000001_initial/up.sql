-- The nexus-usage data model (SQLite). Same tables and columns as on PostgreSQL.
-- Timestamps are TEXT in one fixed-width UTC form, 2026-11-22T10:00:00.000000Z, so that
-- text order is time order; dates are TEXT YYYY-MM-DD; event ids are hyphenated UUIDs.

CREATE TABLE eco_users (
    id                 TEXT PRIMARY KEY NOT NULL,
    email              TEXT NOT NULL UNIQUE,
    plan               TEXT NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    stripe_customer_id TEXT,
    created_at         TEXT NOT NULL
);
CREATE INDEX eco_users_plan_idx ON eco_users (plan);
CREATE INDEX eco_users_created_at_idx ON eco_users (created_at);

CREATE TABLE eco_api_keys (
    id           TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT,
    expires_at   TEXT
);
CREATE INDEX eco_api_keys_user_idx ON eco_api_keys (user_id, created_at DESC);

CREATE TABLE eco_api_usage (
    id               INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL UNIQUE,
    -- No foreign keys on this append-only, high-volume table: the store checks once per
    -- batch that its users and keys exist, instead of twice per row.
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TEXT NOT NULL
);
CREATE INDEX eco_api_usage_user_time_idx ON eco_api_usage (user_id, created_at);
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);

CREATE TABLE eco_usage_records (
    id                     INTEGER PRIMARY KEY,
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start           TEXT NOT NULL,
    period_end             TEXT NOT NULL,
    api_calls              BIGINT NOT NULL DEFAULT 0 CHECK (api_calls >= 0),
    overage_calls          BIGINT NOT NULL DEFAULT 0 CHECK (overage_calls >= 0),
    overage_invoiced_calls BIGINT NOT NULL DEFAULT 0 CHECK (overage_invoiced_calls >= 0),
    updated_at             TEXT NOT NULL,
    UNIQUE (user_id, period_start)
);
CREATE INDEX eco_usage_records_period_idx ON eco_usage_records (period_start);

CREATE TABLE eco_usage_daily (
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    date                   TEXT NOT NULL,
    api_calls              BIGINT NOT NULL,
    error_calls            BIGINT NOT NULL,
    total_response_time_ms BIGINT NOT NULL,
    avg_response_time_ms   DOUBLE NOT NULL,
    top_endpoints          TEXT NOT NULL DEFAULT '[]',
    updated_at             TEXT NOT NULL,
    PRIMARY KEY (user_id, date)
);
CREATE INDEX eco_usage_daily_date_idx ON eco_usage_daily (date);

CREATE TABLE eco_overage_charges (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start           TEXT NOT NULL,
    calls_from             BIGINT NOT NULL,
    calls_to               BIGINT NOT NULL,
    amount_cents           BIGINT NOT NULL,
    idempotency_key        TEXT NOT NULL UNIQUE,
    status                 TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    stripe_invoice_item_id TEXT,
    attempts               INTEGER NOT NULL DEFAULT 0,
    last_error             TEXT,
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL,
    CHECK (calls_to > calls_from)
);
CREATE INDEX eco_overage_charges_user_idx ON eco_overage_charges (user_id, period_start);
