DROP TRIGGER eco_api_keys_deleted ON eco_api_keys;
DROP FUNCTION eco_note_deleted_key();
DROP TABLE eco_deleted_keys;
ALTER TABLE eco_users DROP COLUMN blocked_at;
ALTER TABLE eco_users DROP COLUMN plan_subscription_id;
