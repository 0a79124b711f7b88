-- Fails while a user holds a plan other than the three built in: move them first.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE eco_users_old (
    id                   TEXT PRIMARY KEY NOT NULL,
    email                TEXT NOT NULL UNIQUE,
    plan                 TEXT NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    stripe_customer_id   TEXT,
    created_at           TEXT NOT NULL,
    plan_changed_at      TEXT,
    plan_subscription_id TEXT,
    blocked_at           TEXT
);
INSERT INTO eco_users_old
SELECT id, email, plan, stripe_customer_id, created_at, plan_changed_at,
       plan_subscription_id, blocked_at
FROM eco_users;
DROP TABLE eco_users;
ALTER TABLE eco_users_old RENAME TO eco_users;
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
DROP TABLE eco_plan_versions;
DROP TABLE eco_plans;
COMMIT;
PRAGMA foreign_keys = ON;
