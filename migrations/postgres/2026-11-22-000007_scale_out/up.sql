-- Admission counters shared by every instance: calls admitted, or leased to an instance
-- for admission, per user and period (see docs/SCALING.md). `last_taken` is the size of
-- the last lease, written by the same UPDATE so that it can be returned with the count.
-- No foreign key: it would cost a lookup on every lease, and users are never deleted.
CREATE TABLE eco_quota_counters (
    user_id      TEXT NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    admitted     BIGINT NOT NULL,
    last_taken   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);
-- Running instances poll for recent plan changes to drop them from their key caches.
ALTER TABLE eco_users ADD COLUMN plan_changed_at TIMESTAMPTZ;
CREATE INDEX eco_users_plan_changed_idx ON eco_users (plan_changed_at) WHERE plan_changed_at IS NOT NULL;
