-- Admission counters for every limited meter, not only api_calls: one row per user,
-- period and meter, with the same leases and syncs as the calls' counters. A counter of
-- another meter starts from eco_meter_usage; events add to it as they are stored.
ALTER TABLE eco_quota_counters ADD COLUMN meter TEXT NOT NULL DEFAULT 'api_calls';
ALTER TABLE eco_quota_counters ALTER COLUMN meter DROP DEFAULT;
ALTER TABLE eco_quota_counters DROP CONSTRAINT eco_quota_counters_pkey;
ALTER TABLE eco_quota_counters ADD PRIMARY KEY (user_id, period_start, meter);
