-- Admission counters shared by every process on this file; see the PostgreSQL twin.
CREATE TABLE eco_quota_counters (
    user_id      TEXT NOT NULL,
    period_start TEXT NOT NULL,
    admitted     BIGINT NOT NULL,
    last_taken   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);
ALTER TABLE eco_users ADD COLUMN plan_changed_at TEXT;
CREATE INDEX eco_users_plan_changed_idx ON eco_users (plan_changed_at) WHERE plan_changed_at IS NOT NULL;
