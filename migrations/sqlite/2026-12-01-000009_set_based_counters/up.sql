-- The included calls each counter was last computed with (see the PostgreSQL migration).
ALTER TABLE eco_usage_records ADD COLUMN included_calls INTEGER;
