-- The included calls each counter was last computed with. A batch adds to every
-- (user, period) counter it touches in one INSERT ... ON CONFLICT statement, whose update
-- can only see the proposed row (EXCLUDED): the plan's included calls travel in it.
ALTER TABLE eco_usage_records ADD COLUMN included_calls BIGINT;
-- Every batch updates one counter row per customer in it, and the update is not HOT
-- (api_calls is a key of eco_usage_records_period_calls_idx): each index of the table is
-- written again for every row. Two of them served nothing: the surrogate key (rows are
-- found by (user_id, period_start), now the primary key) and an index on period_start
-- alone that eco_usage_records_period_calls_idx, led by period_start, already answers.
DROP INDEX eco_usage_records_period_idx;
ALTER TABLE eco_usage_records DROP CONSTRAINT eco_usage_records_pkey;
ALTER TABLE eco_usage_records DROP COLUMN id;
ALTER TABLE eco_usage_records DROP CONSTRAINT eco_usage_records_user_period_key;
ALTER TABLE eco_usage_records ADD PRIMARY KEY (user_id, period_start);
-- Quota syncs update every active customer's counter twice a second; room left in each
-- page lets those updates stay HOT (no index entry written).
ALTER TABLE eco_quota_counters SET (fillfactor = 70);
