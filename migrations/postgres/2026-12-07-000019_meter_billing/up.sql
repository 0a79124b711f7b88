-- Overage billing per meter: a charge bills one meter's range (`calls_from`..`calls_to`
-- are the meter's quantity for meters other than api_calls), and each user's period of a
-- meter remembers how much of its quantity was invoiced.
ALTER TABLE eco_overage_charges ADD COLUMN meter TEXT NOT NULL DEFAULT 'api_calls';
DROP INDEX eco_overage_charges_open_range_key;
CREATE UNIQUE INDEX eco_overage_charges_open_range_key
    ON eco_overage_charges (user_id, period_start, meter, calls_from)
    WHERE status <> 'failed';
ALTER TABLE eco_meter_usage ADD COLUMN invoiced_quantity BIGINT NOT NULL DEFAULT 0;
-- The billing run looks for meter periods not invoiced up to their quantity.
CREATE INDEX eco_meter_usage_uninvoiced_idx
    ON eco_meter_usage (user_id, period_start)
    WHERE quantity > invoiced_quantity;
