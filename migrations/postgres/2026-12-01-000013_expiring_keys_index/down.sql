DROP INDEX eco_api_keys_expires_idx;
