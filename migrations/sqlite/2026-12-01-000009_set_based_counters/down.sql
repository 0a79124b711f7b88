CREATE INDEX eco_usage_records_period_idx ON eco_usage_records (period_start);
ALTER TABLE eco_usage_records DROP COLUMN included_calls;
