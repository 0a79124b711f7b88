CREATE TABLE eco_quota_counters_old (
    user_id      TEXT NOT NULL,
    period_start TEXT NOT NULL,
    admitted     BIGINT NOT NULL,
    last_taken   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);
INSERT INTO eco_quota_counters_old (user_id, period_start, admitted, last_taken)
SELECT user_id, period_start, admitted, last_taken FROM eco_quota_counters WHERE meter = 'api_calls';
DROP TABLE eco_quota_counters;
ALTER TABLE eco_quota_counters_old RENAME TO eco_quota_counters;
