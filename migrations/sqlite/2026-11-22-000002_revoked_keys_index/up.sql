-- Running instances poll for recent revocations to drop them from their key caches.
CREATE INDEX eco_api_keys_revoked_idx ON eco_api_keys (revoked_at) WHERE revoked_at IS NOT NULL;
