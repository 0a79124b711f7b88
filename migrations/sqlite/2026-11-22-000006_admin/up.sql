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
-- The admin figures read one period's records: the users list sorted by calls walks
-- this index in order (ties by user), the overview sums it without visiting the table.
CREATE INDEX eco_usage_records_period_calls_idx ON eco_usage_records (period_start, api_calls, user_id, overage_calls, overage_invoiced_calls);
-- Sorting by revenue needs only the few records with overage.
CREATE INDEX eco_usage_records_overage_idx ON eco_usage_records (period_start, user_id)
    WHERE overage_calls > 0;
-- The users list sorted by sign-up time, ties by id.
CREATE INDEX eco_users_created_at_id_idx ON eco_users (created_at, id);
DROP INDEX eco_users_created_at_idx;
