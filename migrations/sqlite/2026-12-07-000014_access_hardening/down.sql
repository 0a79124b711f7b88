DROP TRIGGER eco_users_deleted;
DROP TRIGGER eco_api_keys_deleted;
DROP TABLE eco_deleted_keys;
ALTER TABLE eco_users DROP COLUMN blocked_at;
ALTER TABLE eco_users DROP COLUMN plan_subscription_id;
