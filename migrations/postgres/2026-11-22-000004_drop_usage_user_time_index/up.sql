-- Superseded by eco_api_usage_user_time_cover_idx (same key).
DROP INDEX CONCURRENTLY IF EXISTS eco_api_usage_user_time_idx;
