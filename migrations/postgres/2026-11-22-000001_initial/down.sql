DROP TABLE eco_overage_charges;
DROP TABLE eco_usage_daily;
DROP TABLE eco_usage_records;
DROP TABLE eco_api_usage;
DROP TABLE eco_api_keys;
DROP TABLE eco_users;
