-- Stripe webhooks find the user by Stripe customer: one customer belongs to one user.
-- (Fails if two users already share a customer id; give one of them another first.)
CREATE UNIQUE INDEX eco_users_stripe_customer_id_key ON eco_users (stripe_customer_id)
    WHERE stripe_customer_id IS NOT NULL;
-- Stripe events that reached a known customer, so that each takes effect once and an
-- event older than one already applied (Stripe does not deliver in order) changes nothing.
-- `outcome`: applied or stale.
CREATE TABLE eco_stripe_events (
    event_id      TEXT PRIMARY KEY,
    event_type    TEXT NOT NULL,
    customer      TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    plan          TEXT NOT NULL,
    event_created TIMESTAMPTZ NOT NULL,
    outcome       TEXT NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX eco_stripe_events_customer_idx ON eco_stripe_events (customer, event_created);
