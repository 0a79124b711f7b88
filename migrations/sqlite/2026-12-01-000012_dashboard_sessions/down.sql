DROP TABLE eco_login_links;
DROP TABLE eco_dashboard_sessions;
ALTER TABLE eco_usage_days DROP COLUMN error_calls;
ALTER TABLE eco_usage_days DROP COLUMN api_calls;
