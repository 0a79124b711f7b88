DROP INDEX eco_meter_usage_uninvoiced_idx;
ALTER TABLE eco_meter_usage DROP COLUMN invoiced_quantity;
DELETE FROM eco_overage_charges WHERE meter <> 'api_calls';
DROP INDEX eco_overage_charges_open_range_key;
ALTER TABLE eco_overage_charges DROP COLUMN meter;
CREATE UNIQUE INDEX eco_overage_charges_open_range_key
    ON eco_overage_charges (user_id, period_start, calls_from)
    WHERE status <> 'failed';
