//! The types the API description is made of: the registry that takes each route's path
//! from its handler's annotation, the error bodies and the documented parameters. Every
//! API module uses them; the document itself is assembled in [`crate::openapi`].

use std::collections::BTreeSet;

use serde::Serialize;
use utoipa::{IntoParams, IntoResponses, ToSchema};

/// The routes registered, as (method, path), collected while the routes are configured.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    routes: BTreeSet<(String, String)>,
}

impl Registry {
    /// The full path of the operation `P` documents, noting its methods as registered.
    pub(crate) fn path<P: utoipa::Path>(&mut self) -> String {
        let path = P::path();
        for method in P::methods() {
            let name = serde_json::to_value(method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_uppercase))
                .unwrap_or_default();
            self.routes.insert((name, path.clone()));
        }
        path
    }

    /// As [`Self::path`], relative to the scope `prefix` it is registered in.
    pub(crate) fn path_in<P: utoipa::Path>(&mut self, prefix: &str) -> String {
        let path = self.path::<P>();
        path.strip_prefix(prefix)
            .map_or(path.clone(), str::to_owned)
    }

    /// The methods registered at `path` (a full path), for `Allow`.
    pub(crate) fn allow(&self, path: &str) -> String {
        self.routes
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What was registered.
    #[cfg(test)]
    pub(crate) fn routes(&self) -> &BTreeSet<(String, String)> {
        &self.routes
    }
}

/// The contract's error body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorResponse {
    /// snake_case code, e.g. `invalid_parameter`.
    #[schema(example = "invalid_parameter")]
    pub error: String,
    /// A sentence for a person; a bad parameter is named with its allowed range.
    #[schema(example = "days must be a whole number from 1 to 365 (got \"0\")")]
    pub message: String,
}

/// The 429 of a metered call over its monthly quota.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuotaExceeded {
    /// `quota_exceeded`, or `rate_limited` for the short window.
    #[schema(example = "quota_exceeded")]
    pub error: String,
    /// What happened and what to do.
    pub message: String,
    /// The monthly limit.
    pub limit: Option<u64>,
    /// When the period ends (RFC 3339).
    pub reset_at: Option<String>,
}

/// Errors of every endpoint with a user JWT.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum UserErrors {
    /// The body or a parameter is not valid; the message names it and its range.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or bad user token, or the token of a user that no longer exists
    /// (`WWW-Authenticate: Bearer`).
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The user is blocked.
    #[response(status = 403)]
    Forbidden(ErrorResponse),
    /// The body did not arrive within `REQUEST_BODY_TIMEOUT_SECS`; the connection closes.
    #[response(status = 408)]
    TimedOut(ErrorResponse),
    /// The database did not answer; try again (`Retry-After`).
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// Errors of every admin endpoint.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum AdminErrors {
    /// A parameter is not valid; the message names it and its range.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or bad user token.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// A valid token of someone not in `ADMIN_ECO_IDS`.
    #[response(status = 403)]
    Forbidden(ErrorResponse),
    /// Too many admin requests (`Retry-After`).
    #[response(status = 429)]
    RateLimited(ErrorResponse),
    /// The database did not answer.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// Errors of every cron endpoint.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum CronErrors {
    /// A parameter is not valid.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or wrong cron secret.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// `CRON_SECRET` is not set: the cron endpoints do not exist.
    #[response(status = 404)]
    NotConfigured(ErrorResponse),
    /// The database (or Stripe, for billing) is unavailable.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// `days` of the history.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct HistoryParams {
    /// Days back, today included.
    #[param(minimum = 1, maximum = 365, default = 30)]
    days: Option<u32>,
    /// The meter each day's `quantity` counts (`api_calls` by default).
    #[param(pattern = "^[a-z0-9_-]{1,40}$")]
    meter: Option<String>,
}

/// `days` of the endpoint statistics.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct EndpointParams {
    /// Days back, today included.
    #[param(minimum = 1, maximum = 90, default = 7)]
    days: Option<u32>,
}

/// The range and page of `GET /api/usage/events`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct EventParams {
    /// First instant included (RFC 3339); default: the period's start. Before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// First instant excluded (RFC 3339); default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// Calls per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page, as it was returned.
    #[param(pattern = r"^-?[0-9]{1,19}\.[0-9a-f]{32}$")]
    cursor: Option<String>,
}

/// How many users `GET /api/admin/meters/{key}/top` lists.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct TopParams {
    /// Users listed.
    #[param(minimum = 1, maximum = 100, default = 10)]
    limit: Option<u32>,
}

/// A page of an admin list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct PageParams {
    /// 1-based page.
    #[param(minimum = 1, maximum = 1000000, default = 1)]
    page: Option<u64>,
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
}

/// What the users list can be sorted by.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum UserSortParam {
    /// Calls this period.
    ApiCalls,
    /// Sign-up time.
    CreatedAt,
    /// Email.
    Email,
    /// Plan price plus this period's overage.
    Revenue,
}

/// Sort direction.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum OrderParam {
    /// Smallest first.
    Asc,
    /// Largest first.
    Desc,
}

/// The users list's filters, sort and page.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct UserListParams {
    /// 1-based page.
    #[param(minimum = 1, maximum = 1000000, default = 1)]
    page: Option<u64>,
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
    /// Only users of this plan.
    #[param(inline)]
    plan: Option<usage_core::Plan>,
    /// Sort key.
    #[param(inline)]
    sort: Option<UserSortParam>,
    /// Direction.
    #[param(inline)]
    order: Option<OrderParam>,
    /// Matches email or id (up to 100 characters, no control characters).
    #[param(max_length = 100, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    q: Option<String>,
}

/// A billing run.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct BillingParams {
    /// Say what would be billed; record and send nothing.
    dry_run: Option<bool>,
}

/// The day to aggregate.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct AggregateParams {
    /// `YYYY-MM-DD`, not in the future; default: yesterday (UTC).
    #[param(format = Date)]
    date: Option<String>,
}

/// `PATCH /api/admin/users/{id}`: at least one of the two.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
#[allow(dead_code)]
pub(crate) struct UserPatchBody {
    /// The new plan.
    #[schema(required = false)]
    plan: usage_core::Plan,
    /// `cus_` then letters and digits; null unlinks.
    #[schema(pattern = "^cus_[A-Za-z0-9]{1,250}$")]
    stripe_customer_id: Option<String>,
}
