-- Dashboard sign-in: sessions and one-time sign-in links, stored by the SHA-256 of their
-- token (a database read never yields a usable token), so that any instance serves any
-- session and a restart keeps them.
CREATE TABLE eco_dashboard_sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX eco_dashboard_sessions_expires_idx ON eco_dashboard_sessions (expires_at);

CREATE TABLE eco_login_links (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    used_at    TIMESTAMPTZ
);
CREATE INDEX eco_login_links_expires_idx ON eco_login_links (expires_at);

-- Calls per day over all users, for the admin overview's chart: kept with each ended
-- day when it is aggregated (so the chart reads one row a day, not one per user and day).
ALTER TABLE eco_usage_days ADD COLUMN api_calls BIGINT;
ALTER TABLE eco_usage_days ADD COLUMN error_calls BIGINT;
UPDATE eco_usage_days SET
    api_calls = (SELECT CAST(COALESCE(sum(d.api_calls), 0) AS BIGINT) FROM eco_usage_daily d WHERE d.date = eco_usage_days.date),
    error_calls = (SELECT CAST(COALESCE(sum(d.error_calls), 0) AS BIGINT) FROM eco_usage_daily d WHERE d.date = eco_usage_days.date)
WHERE aggregated_at IS NOT NULL;
