DROP INDEX eco_users_plan_changed_idx;
ALTER TABLE eco_users DROP COLUMN plan_changed_at;
DROP TABLE eco_quota_counters;
