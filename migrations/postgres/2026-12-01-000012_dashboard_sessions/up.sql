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
