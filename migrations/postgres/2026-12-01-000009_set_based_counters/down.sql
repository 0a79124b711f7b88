ALTER TABLE eco_quota_counters RESET (fillfactor);
ALTER TABLE eco_usage_records DROP CONSTRAINT eco_usage_records_pkey;
ALTER TABLE eco_usage_records ADD CONSTRAINT eco_usage_records_user_period_key UNIQUE (user_id, period_start);
ALTER TABLE eco_usage_records ADD COLUMN id BIGSERIAL PRIMARY KEY;
CREATE INDEX eco_usage_records_period_idx ON eco_usage_records (period_start);
ALTER TABLE eco_usage_records DROP COLUMN included_calls;
