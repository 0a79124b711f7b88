DROP TABLE eco_usage_dead_letters;
DROP INDEX eco_admin_audit_log_created_at_idx;
DROP TABLE eco_usage_days;
