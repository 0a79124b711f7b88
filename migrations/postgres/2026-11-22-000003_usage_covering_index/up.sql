-- Per-user analytics (endpoint statistics, today's history) read endpoint, method, status
-- and latency of a user's recent rows. With them in the index, PostgreSQL answers from the
-- index alone instead of visiting one heap page per row (a user's rows are scattered among
-- everyone's). Built concurrently, alone in its migration (PostgreSQL refuses CONCURRENTLY
-- in a transaction or a multi-statement query): writes continue on a large live table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS eco_api_usage_user_time_cover_idx
    ON eco_api_usage (user_id, created_at)
    INCLUDE (endpoint, method, status_code, response_time_ms);
