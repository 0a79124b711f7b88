-- Hardening, round two (as on PostgreSQL).

-- The Stripe subscription whose event set the plan: only its end (deletion or a
-- cancelled status) takes the plan back; another subscription's end changes nothing.
ALTER TABLE eco_users ADD COLUMN plan_subscription_id TEXT;
-- A blocked user: every key revoked, user tokens and sign-ins refused, no new keys.
ALTER TABLE eco_users ADD COLUMN blocked_at TEXT;

-- Keys whose rows were deleted (by `keys delete`, `users delete`, or by hand, cascades
-- included), so that every running instance drops them from its key cache: a poll cannot
-- see a row that is gone. Read by sequence, not by time. Kept a day.
CREATE TABLE eco_deleted_keys (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id     TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    deleted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))
);

CREATE TRIGGER eco_api_keys_deleted AFTER DELETE ON eco_api_keys
BEGIN
    INSERT INTO eco_deleted_keys (key_id, user_id) VALUES (OLD.id, OLD.user_id);
    DELETE FROM eco_deleted_keys
    WHERE deleted_at < strftime('%Y-%m-%dT%H:%M:%f000Z', 'now', '-1 day');
END;

-- A user deleted by hand where foreign keys are off (the sqlite3 shell's default) takes
-- no key with it: its keys are reported all the same.
CREATE TRIGGER eco_users_deleted AFTER DELETE ON eco_users
BEGIN
    INSERT INTO eco_deleted_keys (key_id, user_id)
    SELECT id, user_id FROM eco_api_keys WHERE user_id = OLD.id;
END;
