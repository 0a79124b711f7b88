-- eco_api_usage becomes a table partitioned by month of created_at (docs/OPERATIONS.md,
-- "Usage data lifecycle"). The existing table is not copied: it becomes one partition,
-- `eco_api_usage_legacy`, covering everything up to the end of the current month (or of
-- its newest row), and is removed by retention once all of it has expired. New months get
-- partitions of their own, created ahead by the server (at start and daily); a DEFAULT
-- partition takes any call no partition covers, so that no call is ever refused.
--
-- Cost on a large table: one unique index build over (event_id, created_at) and one scan
-- to check the partition bound, while writes wait. To keep that stop short, build the
-- index beforehand while the service runs:
--   CREATE UNIQUE INDEX CONCURRENTLY eco_api_usage_event_time_key
--       ON eco_api_usage (event_id, created_at);
-- (this migration then finds it and only scans).
ALTER TABLE eco_api_usage RENAME TO eco_api_usage_legacy;
ALTER INDEX eco_api_usage_time_idx RENAME TO eco_api_usage_legacy_time_idx;
ALTER INDEX eco_api_usage_user_time_cover_idx RENAME TO eco_api_usage_legacy_user_time_cover_idx;
CREATE UNIQUE INDEX IF NOT EXISTS eco_api_usage_event_time_key
    ON eco_api_usage_legacy (event_id, created_at);
-- A replayed event carries its original time: (event_id, created_at) dedupes as event_id did.
ALTER TABLE eco_api_usage_legacy DROP CONSTRAINT eco_api_usage_event_id_key;
-- The row id was never read; a partitioned table's keys must include the partition key.
ALTER TABLE eco_api_usage_legacy DROP COLUMN id;

CREATE TABLE eco_api_usage (
    event_id         UUID NOT NULL,
    -- No foreign keys on this append-only, high-volume table: the store checks once per
    -- batch that its users and keys exist, instead of twice per row.
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL
) PARTITION BY RANGE (created_at);
CREATE UNIQUE INDEX eco_api_usage_event_key ON eco_api_usage (event_id, created_at);
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);
CREATE INDEX eco_api_usage_user_time_cover_idx ON eco_api_usage (user_id, created_at)
    INCLUDE (endpoint, method, status_code, response_time_ms);

DO $$
DECLARE
    -- Month arithmetic in UTC, whatever the session's time zone.
    this_month TIMESTAMP := date_trunc('month', now() AT TIME ZONE 'UTC');
    newest TIMESTAMP;
    bound TIMESTAMP;
BEGIN
    SELECT max(created_at) AT TIME ZONE 'UTC' INTO newest FROM eco_api_usage_legacy;
    IF newest IS NULL THEN
        DROP TABLE eco_api_usage_legacy;
    ELSE
        bound := greatest(this_month, date_trunc('month', newest)) + interval '1 month';
        EXECUTE format(
            'ALTER TABLE eco_api_usage ATTACH PARTITION eco_api_usage_legacy '
            'FOR VALUES FROM (MINVALUE) TO (%L)',
            (bound AT TIME ZONE 'UTC'));
    END IF;
END $$;
CREATE TABLE eco_api_usage_default PARTITION OF eco_api_usage DEFAULT;

-- Retention's bound: raw calls before it were removed. A day before it keeps its daily
-- aggregate; calls of that day stored later are added to the aggregate, not rebuilt from.
CREATE TABLE eco_usage_retention (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_before TIMESTAMPTZ NOT NULL
);
