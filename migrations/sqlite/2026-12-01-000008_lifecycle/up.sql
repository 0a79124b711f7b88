-- Which days' aggregates are current (see the PostgreSQL migration of the same name).
CREATE TABLE eco_usage_days (
    date              TEXT PRIMARY KEY,
    late_writes       INTEGER NOT NULL DEFAULT 0,
    aggregated_writes INTEGER,
    aggregated_at     TEXT
);
-- Days aggregated before this table existed are taken as current, as they were.
INSERT INTO eco_usage_days (date, late_writes, aggregated_writes, aggregated_at)
SELECT DISTINCT date, 0, 0, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now') FROM eco_usage_daily;
-- Audit retention removes the oldest entries by time.
CREATE INDEX eco_admin_audit_log_created_at_idx ON eco_admin_audit_log (created_at);
-- Calls the store refused for good, kept for an operator to look at and replay.
CREATE TABLE eco_usage_dead_letters (
    event_id         TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TEXT NOT NULL,
    included_calls   INTEGER,
    reason           TEXT NOT NULL,
    failed_at        TEXT NOT NULL
);
