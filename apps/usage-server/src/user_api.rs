//! The customer's own endpoints (user JWT): usage, history, endpoints, overage, events,
//! charges.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use usage_analytics::CurrentUsage;
use usage_analytics::events::EventsPage;
use usage_analytics::reports::{ChargeItem, EndpointUsage, HistoryDay, OverageReport};
use usage_analytics::reports::{MAX_ENDPOINT_DAYS, MAX_HISTORY_DAYS, parse_days};
use utoipa::Path as _;
use utoipa::ToSchema;

use crate::ApiError;
use crate::api_types::{EndpointParams, EventParams, HistoryParams, Registry, UserErrors};
use crate::state::{AppState, QueryParams, method_not_allowed, query_config};
use crate::user_auth::AuthenticatedUser;

/// The customer's own endpoints (user JWT).
pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(
        web::resource(registry.path::<__path_current_usage>())
            .route(web::get().to(current_usage))
            .default_service(method_not_allowed(
                registry.allow(&__path_current_usage::path()),
            )),
    )
    .service(
        web::resource(registry.path::<__path_overage>())
            .route(web::get().to(overage))
            .default_service(method_not_allowed(registry.allow(&__path_overage::path()))),
    )
    .service(
        web::resource(registry.path::<__path_events>())
            .app_data(query_config())
            .route(web::get().to(events))
            .default_service(method_not_allowed(registry.allow(&__path_events::path()))),
    )
    .service(
        web::resource(registry.path::<__path_charges>())
            .route(web::get().to(charges))
            .default_service(method_not_allowed(registry.allow(&__path_charges::path()))),
    )
    .service(
        web::resource(registry.path::<__path_history>())
            .app_data(query_config())
            .route(web::get().to(history))
            .default_service(method_not_allowed(registry.allow(&__path_history::path()))),
    )
    .service(
        web::resource(registry.path::<__path_endpoints>())
            .app_data(query_config())
            .route(web::get().to(endpoints))
            .default_service(method_not_allowed(
                registry.allow(&__path_endpoints::path()),
            )),
    );
}

/// `GET /api/usage/history`.
#[derive(Serialize, ToSchema)]
pub(crate) struct History {
    /// The window, in days.
    days: u32,
    /// The meter whose `quantity` each day gives.
    meter: String,
    /// One item per day, oldest first, days without calls included.
    items: Vec<HistoryDay>,
}

/// `GET /api/usage/endpoints`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Endpoints {
    /// The window, in days.
    days: u32,
    /// Most calls first.
    items: Vec<EndpointUsage>,
}

/// `GET /api/usage/charges`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Charges {
    /// Newest first.
    items: Vec<ChargeItem>,
}

/// The caller's calls per day.
#[utoipa::path(get, path = "/api/usage/history", tag = "usage", params(HistoryParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = History), UserErrors))]
pub(crate) async fn history(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 30, MAX_HISTORY_DAYS)?;
    let meter = query.get("meter").map(String::as_str);
    let items = state.reports.history(&user.0, days, meter).await?;
    Ok(HttpResponse::Ok().json(History {
        days,
        meter: meter.unwrap_or(usage_core::catalog::API_CALLS).to_owned(),
        items,
    }))
}

/// The caller's calls per route pattern and method.
#[utoipa::path(get, path = "/api/usage/endpoints", tag = "usage", params(EndpointParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = Endpoints), UserErrors))]
pub(crate) async fn endpoints(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 7, MAX_ENDPOINT_DAYS)?;
    let items = state.reports.endpoints(&user.0, days).await?;
    Ok(HttpResponse::Ok().json(Endpoints { days, items }))
}

/// The caller's overage this period: calls, cost, what is invoiced.
#[utoipa::path(get, path = "/api/usage/overage", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = OverageReport), UserErrors))]
pub(crate) async fn overage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.overage(&user.0).await?))
}

/// The caller's recorded calls, newest first, by keyset pages.
#[utoipa::path(get, path = "/api/usage/events", tag = "usage", params(EventParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = EventsPage), UserErrors))]
pub(crate) async fn events(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let query = usage_analytics::events::parse_event_query(&query, state.events.now())?;
    Ok(HttpResponse::Ok().json(state.events.page(&user.0, &query).await?))
}

/// The caller's overage charges, newest first.
#[utoipa::path(get, path = "/api/usage/charges", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = Charges), UserErrors))]
pub(crate) async fn charges(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items = state.reports.charges(&user.0).await?;
    Ok(HttpResponse::Ok().json(Charges { items }))
}

/// The caller's calls this period, live (admitted calls not yet written included).
#[utoipa::path(get, path = "/api/usage/current", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = CurrentUsage), UserErrors))]
pub(crate) async fn current_usage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.current(&user.0).await?))
}
