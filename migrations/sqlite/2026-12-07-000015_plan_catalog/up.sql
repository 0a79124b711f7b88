-- Plans as data (as on PostgreSQL). eco_users is rebuilt as SQLite's ALTER TABLE
-- documentation says, foreign keys off, so that no key, session or record of a user is
-- touched (the children reference the table by name).
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE eco_plans (
    key         TEXT PRIMARY KEY NOT NULL,
    created_at  TEXT NOT NULL,
    archived_at TEXT
);

CREATE TABLE eco_plan_versions (
    plan_key        TEXT NOT NULL REFERENCES eco_plans (key),
    version         INTEGER NOT NULL CHECK (version >= 1),
    terms           TEXT NOT NULL,
    stripe_price_id TEXT,
    existing        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (plan_key, version)
);
CREATE INDEX eco_plan_versions_stripe_price_idx ON eco_plan_versions (stripe_price_id)
    WHERE stripe_price_id IS NOT NULL;

INSERT INTO eco_plans (key, created_at)
VALUES ('free', strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
       ('pro', strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')),
       ('enterprise', strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'));

CREATE TABLE eco_users_new (
    id                   TEXT PRIMARY KEY NOT NULL,
    email                TEXT NOT NULL UNIQUE,
    plan                 TEXT NOT NULL REFERENCES eco_plans (key),
    stripe_customer_id   TEXT,
    created_at           TEXT NOT NULL,
    plan_changed_at      TEXT,
    plan_subscription_id TEXT,
    blocked_at           TEXT,
    plan_version         INTEGER,
    overrides            TEXT
);
INSERT INTO eco_users_new (id, email, plan, stripe_customer_id, created_at, plan_changed_at,
                           plan_subscription_id, blocked_at)
SELECT id, email, plan, stripe_customer_id, created_at, plan_changed_at,
       plan_subscription_id, blocked_at
FROM eco_users;
DROP TABLE eco_users;
ALTER TABLE eco_users_new RENAME TO eco_users;

-- What DROP TABLE took with it.
CREATE INDEX eco_users_plan_idx ON eco_users (plan);
CREATE INDEX eco_users_created_at_id_idx ON eco_users (created_at, id);
CREATE INDEX eco_users_plan_changed_idx ON eco_users (plan_changed_at)
    WHERE plan_changed_at IS NOT NULL;
CREATE UNIQUE INDEX eco_users_stripe_customer_id_key ON eco_users (stripe_customer_id)
    WHERE stripe_customer_id IS NOT NULL;
CREATE TRIGGER eco_users_deleted AFTER DELETE ON eco_users
BEGIN
    INSERT INTO eco_deleted_keys (key_id, user_id)
    SELECT id, user_id FROM eco_api_keys WHERE user_id = OLD.id;
END;

COMMIT;
PRAGMA foreign_keys = ON;
