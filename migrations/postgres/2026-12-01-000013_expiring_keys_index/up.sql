-- Running instances poll for keys whose expiry (a rotation's grace ending) has just
-- passed, to drop them from their key caches.
CREATE INDEX eco_api_keys_expires_idx ON eco_api_keys (expires_at) WHERE expires_at IS NOT NULL;
