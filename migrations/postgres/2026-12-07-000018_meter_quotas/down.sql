DELETE FROM eco_quota_counters WHERE meter <> 'api_calls';
ALTER TABLE eco_quota_counters DROP CONSTRAINT eco_quota_counters_pkey;
ALTER TABLE eco_quota_counters DROP COLUMN meter;
ALTER TABLE eco_quota_counters ADD PRIMARY KEY (user_id, period_start);
