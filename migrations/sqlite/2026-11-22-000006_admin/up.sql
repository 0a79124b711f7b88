-- Every admin request: who, what, with which parameters, when, and the answer. No foreign
-- key: the log outlives the users it names.
CREATE TABLE eco_admin_audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    admin_id   TEXT NOT NULL,
    method     TEXT NOT NULL,
    route      TEXT NOT NULL,
    params     TEXT NOT NULL,
    status     INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
-- The admin overview's top users and the users list sorted by calls read one period's
-- records by calls.
CREATE INDEX eco_usage_records_period_calls_idx ON eco_usage_records (period_start, api_calls);
