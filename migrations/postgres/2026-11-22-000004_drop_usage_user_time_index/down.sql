CREATE INDEX CONCURRENTLY IF NOT EXISTS eco_api_usage_user_time_idx ON eco_api_usage (user_id, created_at);
