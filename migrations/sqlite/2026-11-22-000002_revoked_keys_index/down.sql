DROP INDEX eco_api_keys_revoked_idx;
