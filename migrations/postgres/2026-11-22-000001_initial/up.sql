-- The nexus-usage data model (PostgreSQL). Table names are those of the original design.

CREATE TABLE eco_users (
    id                 TEXT PRIMARY KEY,
    email              TEXT NOT NULL,
    plan               TEXT NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    stripe_customer_id TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_users_email_key UNIQUE (email)
);
CREATE INDEX eco_users_plan_idx ON eco_users (plan);
CREATE INDEX eco_users_created_at_idx ON eco_users (created_at);

CREATE TABLE eco_api_keys (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    expires_at   TIMESTAMPTZ,
    CONSTRAINT eco_api_keys_key_hash_key UNIQUE (key_hash)
);
CREATE INDEX eco_api_keys_user_idx ON eco_api_keys (user_id, created_at DESC);

-- One row per admitted call.
CREATE TABLE eco_api_usage (
    id               BIGSERIAL PRIMARY KEY,
    event_id         UUID NOT NULL,
    -- No foreign keys on this append-only, high-volume table: the store checks once per
    -- batch that its users and keys exist, instead of twice per row.
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_api_usage_event_id_key UNIQUE (event_id)
);
-- Per-user time-range queries (analytics, counts).
CREATE INDEX eco_api_usage_user_time_idx ON eco_api_usage (user_id, created_at);
-- Whole-day scans (daily aggregation, admin figures).
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);

-- One row per user and billing period; grows only by the events actually inserted.
CREATE TABLE eco_usage_records (
    id                     BIGSERIAL PRIMARY KEY,
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start           TIMESTAMPTZ NOT NULL,
    period_end             TIMESTAMPTZ NOT NULL,
    api_calls              BIGINT NOT NULL DEFAULT 0 CHECK (api_calls >= 0),
    overage_calls          BIGINT NOT NULL DEFAULT 0 CHECK (overage_calls >= 0),
    overage_invoiced_calls BIGINT NOT NULL DEFAULT 0 CHECK (overage_invoiced_calls >= 0),
    updated_at             TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_usage_records_user_period_key UNIQUE (user_id, period_start)
);
CREATE INDEX eco_usage_records_period_idx ON eco_usage_records (period_start);

-- One row per user and UTC day, rebuilt by the daily aggregation.
CREATE TABLE eco_usage_daily (
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    date                   DATE NOT NULL,
    api_calls              BIGINT NOT NULL,
    error_calls            BIGINT NOT NULL,
    total_response_time_ms BIGINT NOT NULL,
    avg_response_time_ms   DOUBLE PRECISION NOT NULL,
    top_endpoints          JSONB NOT NULL DEFAULT '[]',
    updated_at             TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_usage_daily_pkey PRIMARY KEY (user_id, date)
);
CREATE INDEX eco_usage_daily_date_idx ON eco_usage_daily (date);

-- One row per charge attempt; the idempotency key is also sent to Stripe.
CREATE TABLE eco_overage_charges (
    id                     BIGSERIAL PRIMARY KEY,
    user_id                TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start           TIMESTAMPTZ NOT NULL,
    calls_from             BIGINT NOT NULL,
    calls_to               BIGINT NOT NULL,
    amount_cents           BIGINT NOT NULL,
    idempotency_key        TEXT NOT NULL,
    status                 TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    stripe_invoice_item_id TEXT,
    attempts               INTEGER NOT NULL DEFAULT 0,
    last_error             TEXT,
    created_at             TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_overage_charges_idempotency_key_key UNIQUE (idempotency_key),
    CHECK (calls_to > calls_from)
);
CREATE INDEX eco_overage_charges_user_idx ON eco_overage_charges (user_id, period_start);
