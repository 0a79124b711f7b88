-- The included calls each counter was last computed with. A batch adds to every
-- (user, period) counter it touches in one INSERT ... ON CONFLICT statement, whose update
-- can only see the proposed row (EXCLUDED): the plan's included calls travel in it.
ALTER TABLE eco_usage_records ADD COLUMN included_calls BIGINT;
