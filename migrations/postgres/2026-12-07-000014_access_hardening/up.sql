-- Hardening, round two.

-- The Stripe subscription whose event set the plan: only its end (deletion or a
-- cancelled status) takes the plan back; another subscription's end changes nothing.
ALTER TABLE eco_users ADD COLUMN plan_subscription_id TEXT;
-- A blocked user: every key revoked, user tokens and sign-ins refused, no new keys.
ALTER TABLE eco_users ADD COLUMN blocked_at TIMESTAMPTZ;

-- Keys whose rows were deleted (by `keys delete`, `users delete`, or by hand, cascades
-- included), so that every running instance drops them from its key cache: a poll cannot
-- see a row that is gone. Read by sequence, not by time, so the database clock never
-- meets the application's. Kept a day.
CREATE TABLE eco_deleted_keys (
    seq        BIGSERIAL PRIMARY KEY,
    key_id     TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION eco_note_deleted_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO eco_deleted_keys (key_id, user_id) VALUES (OLD.id, OLD.user_id);
    DELETE FROM eco_deleted_keys WHERE deleted_at < now() - interval '1 day';
    RETURN OLD;
END
$$;

CREATE TRIGGER eco_api_keys_deleted AFTER DELETE ON eco_api_keys
    FOR EACH ROW EXECUTE FUNCTION eco_note_deleted_key();
