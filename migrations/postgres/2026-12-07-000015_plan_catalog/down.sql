-- Fails while a user holds a plan other than the three built in: move them first.
ALTER TABLE eco_users DROP COLUMN overrides;
ALTER TABLE eco_users DROP COLUMN plan_version;
ALTER TABLE eco_users DROP CONSTRAINT eco_users_plan_fkey;
ALTER TABLE eco_users ADD CONSTRAINT eco_users_plan_check
    CHECK (plan IN ('free', 'pro', 'enterprise'));
DROP TABLE eco_plan_versions;
DROP TABLE eco_plans;
