-- Plans as data: the catalog lives here, no longer in an enum and a CHECK.

-- One row a plan: its key never changes; archived plans take no new subscribers.
CREATE TABLE eco_plans (
    key         TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    archived_at TIMESTAMPTZ
);

-- Every version of every plan's terms. `terms` is the plan as the API shows it (name,
-- prices, burst, limits by meter); `existing` says how users of earlier versions move to
-- this one: next_period, now or keep.
CREATE TABLE eco_plan_versions (
    plan_key        TEXT NOT NULL REFERENCES eco_plans (key),
    version         INTEGER NOT NULL CHECK (version >= 1),
    terms           JSONB NOT NULL,
    stripe_price_id TEXT,
    existing        TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (plan_key, version)
);
CREATE INDEX eco_plan_versions_stripe_price_idx ON eco_plan_versions (stripe_price_id)
    WHERE stripe_price_id IS NOT NULL;

-- The three plans users hold today. Their terms come from the plan variables at the first
-- start after this migration (a migration cannot read them): see `seed_plans`.
INSERT INTO eco_plans (key, created_at)
VALUES ('free', now()), ('pro', now()), ('enterprise', now());

-- A user's plan is any plan of the catalog; `plan_version` is the version they subscribed
-- to (null until the catalog's first start puts them on version 1), `overrides` their own
-- terms over it.
ALTER TABLE eco_users DROP CONSTRAINT eco_users_plan_check;
ALTER TABLE eco_users ADD CONSTRAINT eco_users_plan_fkey
    FOREIGN KEY (plan) REFERENCES eco_plans (key);
ALTER TABLE eco_users ADD COLUMN plan_version INTEGER;
ALTER TABLE eco_users ADD COLUMN overrides JSONB;
