DROP TABLE eco_usage_retention;
-- Back to one table (copies every row).
ALTER TABLE eco_api_usage RENAME TO eco_api_usage_partitioned;
ALTER INDEX eco_api_usage_time_idx RENAME TO eco_api_usage_partitioned_time_idx;
ALTER INDEX eco_api_usage_user_time_cover_idx RENAME TO eco_api_usage_partitioned_user_time_cover_idx;
CREATE TABLE eco_api_usage (
    id               BIGSERIAL PRIMARY KEY,
    event_id         UUID NOT NULL,
    user_id          TEXT NOT NULL,
    api_key_id       TEXT NOT NULL,
    endpoint         TEXT NOT NULL,
    method           TEXT NOT NULL,
    status_code      INTEGER NOT NULL,
    response_time_ms INTEGER NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    CONSTRAINT eco_api_usage_event_id_key UNIQUE (event_id)
);
INSERT INTO eco_api_usage
    (event_id, user_id, api_key_id, endpoint, method, status_code, response_time_ms, created_at)
SELECT event_id, user_id, api_key_id, endpoint, method, status_code, response_time_ms, created_at
FROM eco_api_usage_partitioned ORDER BY created_at;
DROP TABLE eco_api_usage_partitioned;
CREATE INDEX eco_api_usage_time_idx ON eco_api_usage (created_at);
CREATE INDEX eco_api_usage_user_time_cover_idx ON eco_api_usage (user_id, created_at)
    INCLUDE (endpoint, method, status_code, response_time_ms);
