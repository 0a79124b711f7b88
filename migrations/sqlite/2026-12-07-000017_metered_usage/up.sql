-- Metered usage (as on PostgreSQL).

-- A call's units (its route's costs, what its handler reported) as "tokens=1234;credits=10";
-- NULL for a call with none, as most are (a NULL costs a bit of the row's null map).
ALTER TABLE eco_api_usage ADD COLUMN units TEXT;
ALTER TABLE eco_usage_dead_letters ADD COLUMN units TEXT;

-- Events other services sent (POST /api/events), kept and pruned as calls are. `created_at`
-- is the event's own time; `value` is what a unique_count meter counts.
CREATE TABLE eco_meter_events (
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    meter       TEXT NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity >= 0),
    value       TEXT,
    created_at  TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX eco_meter_events_user_time_idx ON eco_meter_events (user_id, created_at);
CREATE INDEX eco_meter_events_time_idx ON eco_meter_events (created_at);

-- Every (source, id) ever accepted: the same event sent again is a duplicate, even after
-- retention removed it.
CREATE TABLE eco_event_ids (
    source   TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (source, event_id)
);

-- Each user's quantity of each meter per billing period, as the meter's aggregation adds
-- up calls' units and events: what quotas start from and billing prices.
CREATE TABLE eco_meter_usage (
    user_id      TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start TEXT NOT NULL,
    meter        TEXT NOT NULL REFERENCES eco_meters (key),
    quantity     INTEGER NOT NULL CHECK (quantity >= 0),
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (user_id, period_start, meter)
);
CREATE INDEX eco_meter_usage_meter_idx ON eco_meter_usage (meter);

-- The same per UTC day, for history (kept when raw rows are pruned).
CREATE TABLE eco_meter_daily (
    user_id  TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    meter    TEXT NOT NULL REFERENCES eco_meters (key),
    date     TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (user_id, meter, date)
);

-- The distinct values a unique_count meter counted per period, and when each was first seen.
CREATE TABLE eco_meter_values (
    user_id      TEXT NOT NULL REFERENCES eco_users (id) ON DELETE CASCADE,
    period_start TEXT NOT NULL,
    meter        TEXT NOT NULL REFERENCES eco_meters (key),
    value        TEXT NOT NULL,
    first_seen   TEXT NOT NULL,
    PRIMARY KEY (user_id, period_start, meter, value)
);
