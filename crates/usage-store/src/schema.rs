// The tables of both backends, as in migrations/postgres and migrations/sqlite. Times,
// event ids and JSON are the types of `crate::types`, stored as each backend stores them.
// SQLite's tables of events and records also have an integer `id`, which no query reads.

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_users (id) {
        id -> Text,
        email -> Text,
        plan -> Text,
        stripe_customer_id -> Nullable<Text>,
        created_at -> Stamp,
        plan_changed_at -> Nullable<Stamp>,
        plan_subscription_id -> Nullable<Text>,
        blocked_at -> Nullable<Stamp>,
        plan_version -> Nullable<Integer>,
        overrides -> Nullable<JsonText>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_plans (key) {
        key -> Text,
        created_at -> Stamp,
        archived_at -> Nullable<Stamp>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_plan_versions (plan_key, version) {
        plan_key -> Text,
        version -> Integer,
        terms -> JsonText,
        stripe_price_id -> Nullable<Text>,
        existing -> Text,
        created_at -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_meters (key) {
        key -> Text,
        name -> Text,
        unit -> Text,
        aggregation -> Text,
        created_at -> Stamp,
        updated_at -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_route_costs (route, meter) {
        route -> Text,
        meter -> Text,
        quantity -> BigInt,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_api_keys (id) {
        id -> Text,
        user_id -> Text,
        name -> Text,
        prefix -> Text,
        key_hash -> Text,
        created_at -> Stamp,
        last_used_at -> Nullable<Stamp>,
        revoked_at -> Nullable<Stamp>,
        expires_at -> Nullable<Stamp>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_api_usage (event_id, created_at) {
        event_id -> EventId,
        user_id -> Text,
        api_key_id -> Text,
        endpoint -> Text,
        method -> Text,
        status_code -> Integer,
        response_time_ms -> Integer,
        created_at -> Stamp,
        units -> Nullable<Text>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_meter_events (source, event_id) {
        source -> Text,
        event_id -> Text,
        user_id -> Text,
        meter -> Text,
        quantity -> BigInt,
        value -> Nullable<Text>,
        created_at -> Stamp,
        received_at -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_meter_usage (user_id, period_start, meter) {
        user_id -> Text,
        period_start -> Stamp,
        meter -> Text,
        quantity -> BigInt,
        updated_at -> Stamp,
        invoiced_quantity -> BigInt,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_meter_daily (user_id, meter, date) {
        user_id -> Text,
        meter -> Text,
        date -> Date,
        quantity -> BigInt,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_usage_records (user_id, period_start) {
        user_id -> Text,
        period_start -> Stamp,
        period_end -> Stamp,
        api_calls -> BigInt,
        overage_calls -> BigInt,
        overage_invoiced_calls -> BigInt,
        updated_at -> Stamp,
        included_calls -> Nullable<BigInt>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_usage_daily (user_id, date) {
        user_id -> Text,
        date -> Date,
        api_calls -> BigInt,
        error_calls -> BigInt,
        total_response_time_ms -> BigInt,
        avg_response_time_ms -> Double,
        top_endpoints -> JsonText,
        updated_at -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_overage_charges (id) {
        id -> BigInt,
        user_id -> Text,
        period_start -> Stamp,
        calls_from -> BigInt,
        calls_to -> BigInt,
        amount_cents -> BigInt,
        idempotency_key -> Text,
        status -> Text,
        stripe_invoice_item_id -> Nullable<Text>,
        attempts -> Integer,
        last_error -> Nullable<Text>,
        created_at -> Stamp,
        updated_at -> Stamp,
        meter -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_stripe_events (event_id) {
        event_id -> Text,
        event_type -> Text,
        customer -> Text,
        user_id -> Text,
        plan -> Text,
        event_created -> Stamp,
        outcome -> Text,
        received_at -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_usage_retention (id) {
        id -> Integer,
        pruned_before -> Stamp,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::types::*;

    eco_deleted_keys (seq) {
        seq -> BigInt,
        key_id -> Text,
        user_id -> Text,
        deleted_at -> Stamp,
    }
}

// A key is read together with its user's plan (one lookup on the hot path).
diesel::joinable!(eco_api_keys -> eco_users (user_id));
diesel::allow_tables_to_appear_in_same_query!(eco_api_keys, eco_users);
diesel::joinable!(eco_plan_versions -> eco_plans (plan_key));
diesel::allow_tables_to_appear_in_same_query!(eco_plan_versions, eco_plans);
diesel::allow_tables_to_appear_in_same_query!(eco_meter_usage, eco_users);
