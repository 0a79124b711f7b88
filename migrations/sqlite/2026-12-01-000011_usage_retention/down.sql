DROP TABLE eco_usage_retention;
