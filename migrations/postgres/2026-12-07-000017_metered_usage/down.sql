DROP TABLE eco_meter_values;
DROP TABLE eco_meter_daily;
DROP TABLE eco_meter_usage;
DROP TABLE eco_event_ids;
DROP TABLE eco_meter_events;
ALTER TABLE eco_usage_dead_letters DROP COLUMN units;
ALTER TABLE eco_api_usage DROP COLUMN units;
