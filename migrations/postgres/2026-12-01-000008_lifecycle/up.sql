-- Which days' aggregates are current. A batch that stores calls of a day that has ended
-- (or ends within five minutes) adds one to `late_writes`; an aggregation run after the
-- day ended copies the value it saw into `aggregated_writes`. A day's rows in
-- eco_usage_daily are current when the two are equal; otherwise readers count the raw
-- events and the next catch-up aggregates the day again.
CREATE TABLE eco_usage_days (
    date              DATE PRIMARY KEY,
    late_writes       BIGINT NOT NULL DEFAULT 0,
    aggregated_writes BIGINT,
    aggregated_at     TIMESTAMPTZ
);
-- Days aggregated before this table existed are taken as current, as they were: without
-- this, the first start after the upgrade would aggregate every past day again.
INSERT INTO eco_usage_days (date, late_writes, aggregated_writes, aggregated_at)
SELECT DISTINCT date, 0, 0, now() FROM eco_usage_daily;
-- Audit retention removes the oldest entries by time.
CREATE INDEX eco_admin_audit_log_created_at_idx ON eco_admin_audit_log (created_at);
-- Calls the store refused for good (their user or key is gone), kept for an operator to
-- look at and replay (`usage-server dead-letters`). No foreign keys: that is the point.
CREATE TABLE eco_usage_dead_letters (
    event_id         UUID PRIMARY KEY,
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    included_calls   BIGINT,
    reason           TEXT NOT NULL,
    failed_at        TIMESTAMPTZ NOT NULL
);
