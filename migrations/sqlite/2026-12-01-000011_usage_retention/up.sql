-- Retention's bound: raw calls before it were removed. A day before it keeps its daily
-- aggregate; calls of that day stored later are added to the aggregate, not rebuilt from.
CREATE TABLE eco_usage_retention (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_before TEXT NOT NULL
);
