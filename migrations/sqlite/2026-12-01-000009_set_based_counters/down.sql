ALTER TABLE eco_usage_records DROP COLUMN included_calls;
