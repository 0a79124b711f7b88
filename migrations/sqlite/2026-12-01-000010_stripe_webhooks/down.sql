DROP TABLE eco_stripe_events;
DROP INDEX eco_users_stripe_customer_id_key;
