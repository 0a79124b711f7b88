-- Meters as data (as on PostgreSQL).

CREATE TABLE eco_meters (
    key         TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    unit        TEXT NOT NULL,
    aggregation TEXT NOT NULL
        CHECK (aggregation IN ('count', 'sum', 'max', 'unique_count')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
INSERT INTO eco_meters (key, name, unit, aggregation, created_at, updated_at)
VALUES ('api_calls', 'API calls', 'call', 'count',
        strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'), strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'));

CREATE TABLE eco_route_costs (
    route    TEXT NOT NULL,
    meter    TEXT NOT NULL REFERENCES eco_meters (key),
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (route, meter)
);
