//! diesel errors to [`RepoError`], in one place for both backends.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use usage_core::RepoError;

/// Which entity and field a unique constraint or column protects. PostgreSQL reports the
/// constraint name; SQLite reports `table.column` in its message.
fn unique_target(name: &str) -> (&'static str, &'static str) {
    const TARGETS: &[(&str, &str, &str, &str)] = &[
        // (PostgreSQL constraint, SQLite column, entity, field)
        ("eco_users_pkey", "eco_users.id", "user", "id"),
        ("eco_users_email_key", "eco_users.email", "user", "email"),
        (
            "eco_users_stripe_customer_id_key",
            "eco_users.stripe_customer_id",
            "user",
            "stripe_customer_id",
        ),
        ("eco_api_keys_pkey", "eco_api_keys.id", "API key", "id"),
        ("eco_plans_pkey", "eco_plans.key", "plan", "key"),
        ("eco_meters_pkey", "eco_meters.key", "meter", "key"),
        (
            "eco_api_keys_key_hash_key",
            "eco_api_keys.key_hash",
            "API key",
            "key_hash",
        ),
        (
            "eco_api_usage_event_id_key",
            "eco_api_usage.event_id",
            "usage event",
            "event_id",
        ),
        (
            "eco_overage_charges_open_range_key",
            "eco_overage_charges.calls_from",
            "overage charge",
            "calls_from",
        ),
        (
            "eco_overage_charges_idempotency_key_key",
            "eco_overage_charges.idempotency_key",
            "overage charge",
            "idempotency_key",
        ),
    ];
    TARGETS
        .iter()
        .find(|(pg, sqlite, _, _)| name == *pg || name.ends_with(sqlite))
        .map_or(("record", "key"), |(_, _, entity, field)| (entity, field))
}

/// The entity a foreign key points to, from the PostgreSQL constraint name.
fn referenced_entity(constraint: &str) -> &'static str {
    if constraint.contains("api_key_id") {
        "API key"
    } else if constraint.contains("meter") {
        "meter"
    } else if constraint.contains("plan") {
        "plan"
    } else {
        "user"
    }
}

/// Maps a diesel error to the repository's terms. `missing` names what a foreign-key
/// failure means when the backend does not say which key failed (SQLite).
pub(crate) fn repo_error(err: DieselError, missing: &'static str) -> RepoError {
    match err {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::UniqueViolation => {
                let name = info
                    .constraint_name()
                    .map(str::to_owned)
                    .unwrap_or_else(|| info.message().to_owned());
                let (entity, field) = unique_target(&name);
                RepoError::Conflict { entity, field }
            }
            DatabaseErrorKind::ForeignKeyViolation => RepoError::NotFound {
                entity: info.constraint_name().map_or(missing, referenced_entity),
            },
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                RepoError::Unavailable(info.message().to_owned())
            }
            _ => RepoError::Backend(info.message().to_owned()),
        },
        DieselError::NotFound => RepoError::NotFound { entity: missing },
        other => RepoError::Backend(other.to_string()),
    }
}

/// Whether retrying the whole transaction may succeed (deadlock, serialization failure).
pub(crate) fn is_retryable(err: &DieselError) -> bool {
    matches!(
        err,
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _)
    ) || matches!(err, DieselError::DatabaseError(_, info) if info.message().contains("deadlock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_and_sqlite_messages_map_to_the_same_fields() {
        assert_eq!(unique_target("eco_users_email_key"), ("user", "email"));
        assert_eq!(
            unique_target("UNIQUE constraint failed: eco_users.email"),
            ("user", "email")
        );
        assert_eq!(
            unique_target("UNIQUE constraint failed: eco_api_keys.key_hash"),
            ("API key", "key_hash")
        );
        assert_eq!(
            referenced_entity("eco_api_usage_api_key_id_fkey"),
            "API key"
        );
        assert_eq!(referenced_entity("eco_api_keys_user_id_fkey"), "user");
    }
}
