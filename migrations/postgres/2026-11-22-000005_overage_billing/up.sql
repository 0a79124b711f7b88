-- Two billing runs can never both bill one range: at most one live (pending or succeeded)
-- charge per user, period and starting point. A refused charge frees its starting point.
CREATE UNIQUE INDEX eco_overage_charges_open_range_key
    ON eco_overage_charges (user_id, period_start, calls_from)
    WHERE status <> 'failed';
-- The billing run looks for periods with overage not yet invoiced: a handful of rows
-- among all users' periods.
CREATE INDEX eco_usage_records_uninvoiced_idx
    ON eco_usage_records (user_id, period_start)
    WHERE overage_calls > overage_invoiced_calls;
