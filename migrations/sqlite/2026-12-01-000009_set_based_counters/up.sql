-- The included calls each counter was last computed with (see the PostgreSQL migration).
ALTER TABLE eco_usage_records ADD COLUMN included_calls INTEGER;
-- An index on period_start alone, which eco_usage_records_period_calls_idx (led by
-- period_start) already answers, written again on every counter update.
DROP INDEX eco_usage_records_period_idx;
