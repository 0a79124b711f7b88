CREATE INDEX eco_users_created_at_idx ON eco_users (created_at);
DROP INDEX eco_users_created_at_id_idx;
DROP INDEX eco_usage_records_overage_idx;
DROP INDEX eco_usage_records_period_calls_idx;
DROP TABLE eco_admin_audit_log;
