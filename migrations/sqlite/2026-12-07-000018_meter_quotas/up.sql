-- Admission counters for every limited meter, not only api_calls: one row per user,
-- period and meter (SQLite cannot change a primary key in place: the table is rebuilt).
CREATE TABLE eco_quota_counters_new (
    user_id      TEXT NOT NULL,
    period_start TEXT NOT NULL,
    meter        TEXT NOT NULL,
    admitted     BIGINT NOT NULL,
    last_taken   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start, meter)
);
INSERT INTO eco_quota_counters_new (user_id, period_start, meter, admitted, last_taken)
SELECT user_id, period_start, 'api_calls', admitted, last_taken FROM eco_quota_counters;
DROP TABLE eco_quota_counters;
ALTER TABLE eco_quota_counters_new RENAME TO eco_quota_counters;
