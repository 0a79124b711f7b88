-- Meters as data: what is counted (api_calls built in), and what a call to a route costs.

-- One row a meter. `aggregation` (count, sum, max, unique_count) is fixed once usage of
-- the meter is stored.
CREATE TABLE eco_meters (
    key         TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    unit        TEXT NOT NULL,
    aggregation TEXT NOT NULL
        CHECK (aggregation IN ('count', 'sum', 'max', 'unique_count')),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
INSERT INTO eco_meters (key, name, unit, aggregation, created_at, updated_at)
VALUES ('api_calls', 'API calls', 'call', 'count', now(), now());

-- What one call to a route ("POST /v1/generate") costs on a meter, taken at admission.
-- Replaced whole by `PUT /api/admin/costs`.
CREATE TABLE eco_route_costs (
    route    TEXT NOT NULL,
    meter    TEXT NOT NULL REFERENCES eco_meters (key),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (route, meter)
);
