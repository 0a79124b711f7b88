//! The customer's pages: signing in and out, usage, API keys, billing.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use time::OffsetDateTime;
use usage_analytics::reports::{MAX_ENDPOINT_DAYS, parse_days};
use usage_auth::keys::IssuedKey;
use usage_auth::session::{DashboardSessions, SignedIn};
use usage_core::repo::ApiKeyRecord;
use usage_core::{ApiKeyId, Cents};

use crate::chart::{self, Bar, group};
use crate::layout::{self, Nav, csrf_field, day, minute, money, page};
use crate::{
    Dashboard, PageError, PageResult, Viewer, check_form, page_response, query, same_origin,
    see_other, session_cookie, signed_in,
};

type Form = web::Form<HashMap<String, String>>;

/// `GET /dashboard/login?token=...`: the page of a one-time link, whose button signs in.
/// Opening the link uses nothing up: a mail scanner that follows it leaves it valid.
pub(crate) async fn confirm_login_link(req: HttpRequest) -> HttpResponse {
    let token = query(&req)
        .ok()
        .and_then(|mut q| q.remove("token"))
        .unwrap_or_default();
    if token.is_empty() {
        return layout::sign_in_response(
            Some("This sign-in link has no token. Ask for a new one."),
            StatusCode::BAD_REQUEST,
        );
    }
    layout::confirm_link_response(&token)
}

/// `POST /dashboard/login` with the link's `token`: signs in (the link is used up), then
/// the usage page.
pub(crate) async fn login_with_link(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    if let Err(e) = same_origin(&req) {
        return e.response(None);
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or_default();
    match dash.sessions.sign_in_with_link(token).await {
        Ok(Some(signed_in)) => {
            tracing::info!(user_id = %signed_in.user_id, "dashboard: signed in with a link");
            session_started(&dash, signed_in).await
        }
        Ok(None) => layout::sign_in_response(
            Some(
                "This sign-in link is not valid: it was already used, has expired, or was mistyped. Ask for a new one.",
            ),
            StatusCode::UNAUTHORIZED,
        ),
        Err(e) => PageError::from(e).response(None),
    }
}

/// `POST /dashboard/session` with a user JWT in `token`.
pub(crate) async fn login_with_token(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    if let Err(e) = same_origin(&req) {
        return e.response(None);
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or_default();
    let user_id = match dash.jwt.verify(token) {
        Ok(user_id) => user_id,
        Err(e) => {
            tracing::info!(reason = %e, "dashboard: a user token was refused");
            return layout::sign_in_response(
                Some(
                    "That token is not valid (expired, for another audience, or not a user token).",
                ),
                StatusCode::UNAUTHORIZED,
            );
        }
    };
    match dash.sessions.sign_in(&user_id).await {
        Ok(signed_in) => session_started(&dash, signed_in).await,
        Err(usage_auth::AuthError::UnknownUser(_)) => layout::sign_in_response(
            Some("That token names no user of this service."),
            StatusCode::UNAUTHORIZED,
        ),
        Err(e) => PageError::from(e).response(None),
    }
}

/// The answer to a sign-in: the usage page with the session's cookie, or, for a blocked
/// user, the sign-in page saying so (the session just made is ended).
async fn session_started(dash: &Dashboard, signed_in: SignedIn) -> HttpResponse {
    match usage_auth::access::active_user(dash.store.as_ref(), &signed_in.user_id).await {
        Ok(_) => {
            let mut response = see_other("/dashboard");
            let _ = response.add_cookie(&session_cookie(dash, signed_in.token));
            response
        }
        Err(usage_auth::AuthError::Blocked(_)) => {
            if let Err(e) = dash.sessions.sign_out(&signed_in.token).await {
                return PageError::from(e).response(None);
            }
            layout::sign_in_response(Some("This account is blocked."), StatusCode::FORBIDDEN)
        }
        Err(e) => PageError::from(e).response(None),
    }
}

/// `POST /dashboard/logout`.
pub(crate) async fn logout(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        dash.sessions.sign_out(&viewer.session).await?;
        let mut response = see_other("/dashboard");
        let mut gone = session_cookie(&dash, String::new());
        gone.make_removal();
        let _ = response.add_cookie(&gone);
        Ok(response)
    })
    .await
}

/// Days shown: `?days=` 7, 30 or 90 (any whole number from 1 to 90), 30 by default.
fn days_of(req: &HttpRequest) -> Result<u32, PageError> {
    let q = query(req)?;
    parse_days(q.get("days").map(String::as_str), 30, MAX_ENDPOINT_DAYS).map_err(PageError::from)
}

/// `GET /dashboard`: this period against the quota, calls per day, endpoints, overage.
pub(crate) async fn usage(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        let days = days_of(&req)?;
        let user = &viewer.user.id;
        let current = dash.reports.current(user).await?;
        let history = dash.reports.history(user, days, None).await?;
        let endpoints = dash.reports.endpoints(user, days).await?;
        let now = dash.clock.now();
        // One panel a meter besides calls: its figures and its days.
        let mut meter_days = Vec::new();
        for line in current.meters.iter().skip(1) {
            let per_day = dash.reports.meter_days(user, &line.meter, days).await?;
            let bars: Vec<Bar> = per_day
                .into_iter()
                .map(|(date, quantity)| Bar {
                    label: date.to_string(),
                    total: quantity,
                    errors: 0,
                })
                .collect();
            meter_days.push((line, bars));
        }

        let elapsed = (now - current.period_start).whole_seconds().max(1);
        let length = (current.period_end - current.period_start).whole_seconds().max(1);
        let projected = u64::try_from(
            i128::from(current.api_calls) * i128::from(length) / i128::from(elapsed),
        )
        .unwrap_or(u64::MAX);
        let bars: Vec<Bar> = history
            .iter()
            .map(|d| Bar {
                label: d.date.to_string(),
                total: d.api_calls,
                errors: d.error_calls,
            })
            .collect();
        let body = html! {
            section aria-labelledby="period" {
                h2 #period { "This period" }
                p {
                    "From " (day(current.period_start)) " to " (day(current.period_end))
                    "; the count starts again on " strong #reset-date { (day(current.period_end)) } "."
                }
                dl.figures {
                    div { dt { "Calls" } dd #api-calls data-value=(current.api_calls) { (group(current.api_calls)) } }
                    @match (current.limit, current.remaining) {
                        (Some(limit), Some(remaining)) => {
                            div { dt { "Included" } dd #limit data-value=(limit) { (group(limit)) } }
                            div { dt { "Remaining" } dd #remaining data-value=(remaining) { (group(remaining)) } }
                        }
                        _ => {
                            div { dt { "Included" } dd #limit data-value="unlimited" { "Unlimited" } }
                        }
                    }
                    div { dt { "Overage calls" } dd #overage-calls data-value=(current.overage_calls) { (group(current.overage_calls)) } }
                    div { dt { "Overage so far" } dd #overage-cost data-value=(current.overage_cost_cents.0) { (money(current.overage_cost_cents)) } }
                    div { dt { "Projected by " (day(current.period_end)) } dd #projected data-value=(projected) { "≈ " (group(projected)) " calls" } }
                }
                @if let Some(limit) = current.limit {
                    label for="quota-used" { (format!("{:.1}", current.usage_percentage)) "% of the included calls used" }
                    progress #quota-used max=(limit) value=(current.api_calls.min(limit)) { (format!("{:.1}", current.usage_percentage)) "%" }
                }
            }
            @for (line, bars) in &meter_days {
                section.meter aria-labelledby={ "meter-" (line.meter) } data-meter=(line.meter) {
                    h2 id={ "meter-" (line.meter) } { (line.name) }
                    dl.figures {
                        div { dt { "Used" } dd.used data-value=(line.used) { (group(line.used)) " " (line.unit) } }
                        @match (line.included, line.remaining) {
                            (Some(included), Some(remaining)) => {
                                div { dt { "Included" } dd.included data-value=(included) { (group(included)) } }
                                div { dt { "Remaining" } dd.remaining data-value=(remaining) { (group(remaining)) } }
                            }
                            _ => { div { dt { "Included" } dd.included data-value="unlimited" { "Unlimited" } } }
                        }
                        @if line.over_limit == usage_core::OverLimit::Overage && line.included.is_some() {
                            div { dt { "Overage" } dd.overage data-value=(line.overage_units) { (group(line.overage_units)) } }
                            div { dt { "Overage so far" } dd.overage-cost data-value=(line.overage_cost_cents) { (money(usage_core::Cents(line.overage_cost_cents))) } }
                        }
                    }
                    @if let Some(included) = line.included.filter(|i| *i > 0) {
                        @let percent = line.used as f64 * 100.0 / included as f64;
                        label for={ "used-" (line.meter) } { (format!("{percent:.1}")) "% of what is included used" @if line.over_limit == usage_core::OverLimit::Block { "; calls are refused at 100%" } }
                        progress id={ "used-" (line.meter) } max=(included) value=(line.used.min(included)) { (format!("{percent:.1}")) "%" }
                    }
                    (chart::bars(&format!("{} per day, last {days} days", line.name), bars))
                }
            }
            section aria-labelledby="daily" {
                h2 #daily { "Calls per day" }
                (days_links(days))
                @if history.iter().all(|d| d.api_calls == 0) {
                    p.empty #no-calls {
                        "No calls in the last " (days) " days. "
                        a href="/dashboard/keys" { "Create an API key" }
                        " and send it as " code { "Authorization: Bearer <key>" } " or " code { "X-API-Key" } "."
                    }
                } @else {
                    (chart::bars(&format!("Calls per day, last {days} days"), &bars))
                }
            }
            section aria-labelledby="endpoints" {
                h2 #endpoints { "Endpoints, last " (days) " days" }
                @if endpoints.is_empty() {
                    p.empty { "No calls yet." }
                } @else {
                    div.scroll {
                        table #endpoint-table {
                            thead { tr {
                                th scope="col" { "Endpoint" } th scope="col" { "Method" }
                                th scope="col" { "Calls" } th scope="col" { "Errors" } th scope="col" { "Mean time" }
                            } }
                            tbody {
                                @for e in &endpoints {
                                    tr {
                                        td { code { (e.endpoint) } } td { (e.method) }
                                        td.num { (group(e.calls)) } td.num { (group(e.error_calls)) }
                                        td.num { (format!("{:.1} ms", e.avg_response_time_ms)) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Usage, "Usage", body),
        ))
    })
    .await
}

fn days_links(current: u32) -> Markup {
    html! {
        p.tabs {
            "Show: "
            @for days in [7u32, 30, 90] {
                @if days == current {
                    strong aria-current="true" { (days) " days" }
                } @else {
                    a href={ "?days=" (days) } { (days) " days" }
                }
                " "
            }
        }
    }
}

/// `GET /dashboard/keys`.
pub(crate) async fn keys(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        keys_page(&dash, &viewer, None, StatusCode::OK).await
    })
    .await
}

/// What the keys page shows above the list.
enum Shown<'a> {
    /// Nothing more.
    Nothing,
    /// A key just issued, once (the heading says which way).
    Issued(&'a str, &'a IssuedKey),
    /// The creation form was posted again: its key exists and was shown then.
    Resent,
}

/// The keys page, with a key just issued shown once.
async fn keys_page(
    dash: &Dashboard,
    viewer: &Viewer,
    issued: Option<(&str, &IssuedKey)>,
    status: StatusCode,
) -> PageResult {
    let shown = match issued {
        Some((what, issued)) => Shown::Issued(what, issued),
        None => Shown::Nothing,
    };
    keys_page_with(dash, viewer, shown, status).await
}

/// The keys page with `shown` above the list; every creation form gets a new `form_id`.
async fn keys_page_with(
    dash: &Dashboard,
    viewer: &Viewer,
    shown: Shown<'_>,
    status: StatusCode,
) -> PageResult {
    let keys = dash.keys.list(&viewer.user.id).await?;
    let now = dash.clock.now();
    let form_id = usage_core::ids::random_base62(20);
    let body = html! {
        @if let Shown::Resent = shown {
            p.notice #resent role="status" { "This form was sent before: its key was created then and shown once. Nothing new was created." }
        }
        @if let Shown::Issued(what, issued) = shown {
            section.new-key aria-labelledby="new-key-title" {
                h2 #new-key-title { (what) }
                p { "Copy it now: it is shown only this once and cannot be recovered." }
                div.copy {
                    code #new-key { (issued.plaintext) }
                    button type="button" data-copy="new-key" { "Copy" }
                }
            }
        }
        section aria-labelledby="create" {
            h2 #create { "Create a key" }
            form.inline method="post" action="/dashboard/keys" {
                (csrf_field(viewer))
                input type="hidden" name="form_id" value=(form_id);
                label for="name" { "Name" }
                input #name name="name" required maxlength="100" placeholder="production";
                button type="submit" { "Create key" }
            }
        }
        section aria-labelledby="your-keys" {
            h2 #your-keys { "Your keys" }
            @if keys.is_empty() {
                p.empty { "No keys yet." }
            } @else {
                div.scroll {
                    table #key-table {
                        thead { tr {
                            th scope="col" { "Name" } th scope="col" { "Key" } th scope="col" { "Created" }
                            th scope="col" { "Last used" } th scope="col" { "Status" } th scope="col" { span.visually-hidden { "Actions" } }
                        } }
                        tbody {
                            @for key in &keys {
                                tr data-key-id=(key.id) {
                                    td { (key.name) } td { code { (key.prefix) "…" } }
                                    td { (day(key.created_at)) }
                                    td { (key.last_used_at.map(minute).unwrap_or_else(|| "never".into())) }
                                    td.status { (key_status(key, now)) }
                                    td.actions {
                                        @if key.is_active(now) {
                                            form.inline method="post" action={ "/dashboard/keys/" (key.id) "/rotate" } {
                                                (csrf_field(viewer))
                                                button type="submit" aria-label={ "Rotate " (key.name) } { "Rotate" }
                                            }
                                            a.button.danger href={ "/dashboard/keys/" (key.id) "/revoke" } aria-label={ "Revoke " (key.name) } { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                p.hint { "Rotating issues a new key with the same name and revokes the old one at once." }
            }
        }
    };
    Ok(page_response(
        &mut HttpResponse::build(status),
        page(Some(viewer), Nav::Keys, "API keys", body),
    ))
}

fn key_status(key: &ApiKeyRecord, now: OffsetDateTime) -> String {
    match (key.revoked_at, key.expires_at) {
        (Some(at), _) if at <= now => format!("revoked {}", day(at)),
        (Some(at), _) => format!("retiring {}", minute(at)),
        (None, Some(at)) if at <= now => format!("expired {}", day(at)),
        _ => "active".to_owned(),
    }
}

/// `POST /dashboard/keys` (`name`, `form_id`): the new key, shown once. The key's id
/// follows from the session and the form's `form_id`, so the same form posted again (a
/// reload of this page) creates nothing and says so.
pub(crate) async fn create_key(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let name = form.get("name").map(|n| n.trim()).unwrap_or_default();
        let form_id = form
            .get("form_id")
            .filter(|id| !id.is_empty() && id.len() <= 64)
            .ok_or_else(|| {
                PageError::BadRequest(
                    "form_id is missing: reload the keys page and create the key again."
                        .to_owned(),
                )
            })?;
        let id = DashboardSessions::form_key_id(&viewer.session, form_id);
        match dash.keys.issue_once(&viewer.user.id, name, id).await? {
            Some(issued) => {
                tracing::info!(user_id = %viewer.user.id, key_id = %issued.record.id, "dashboard: key created");
                keys_page(&dash, &viewer, Some(("Your new key", &issued)), StatusCode::CREATED)
                    .await
            }
            None => {
                tracing::info!(user_id = %viewer.user.id, "dashboard: a key form was posted again; nothing created");
                keys_page_with(
                    &dash,
                    &viewer,
                    Shown::Resent,
                    StatusCode::OK,
                )
                .await
            }
        }
    })
    .await
}

fn key_id(raw: &str) -> Result<ApiKeyId, PageError> {
    ApiKeyId::parse(raw).map_err(|_| PageError::NotFound)
}

/// `GET /dashboard/keys/{id}/revoke`: are you sure?
pub(crate) async fn confirm_revoke(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        let id = key_id(&path)?;
        let key = dash
            .keys
            .list(&viewer.user.id)
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or(PageError::NotFound)?;
        let body = html! {
            p { "Calls with " strong { (key.name) } " (" code { (key.prefix) "…" } ") will be refused with 401 within a second, on every server. This cannot be undone." }
            form.inline method="post" action={ "/dashboard/keys/" (key.id) "/revoke" } {
                (csrf_field(&viewer))
                button.danger type="submit" { "Revoke " (key.name) }
                " "
                a href="/dashboard/keys" { "Cancel" }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Keys, "Revoke this key?", body),
        ))
    })
    .await
}

/// `POST /dashboard/keys/{id}/revoke`.
pub(crate) async fn revoke_key(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let id = key_id(&path)?;
        let revoked = dash.keys.revoke(&viewer.user.id, &id).await?;
        dash.verifier.forget_key(&revoked.id);
        tracing::info!(user_id = %viewer.user.id, key_id = %id, "dashboard: key revoked");
        Ok(see_other("/dashboard/keys"))
    })
    .await
}

/// `POST /dashboard/keys/{id}/rotate`: the new key, shown once; the old one revoked.
pub(crate) async fn rotate_key(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let id = key_id(&path)?;
        let (old, new) = dash.keys.rotate(&viewer.user.id, &id, 0).await?;
        dash.verifier.forget_key(&old.id);
        tracing::info!(user_id = %viewer.user.id, key_id = %id, new_key_id = %new.record.id, "dashboard: key rotated");
        keys_page(&dash, &viewer, Some(("Your rotated key", &new)), StatusCode::CREATED).await
    })
    .await
}

/// `GET /dashboard/billing`: plan and price, overage this period, charges.
pub(crate) async fn billing(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    signed_in(&req, &dash, async |viewer: Viewer| {
        let user = &viewer.user.id;
        let overage = dash.reports.overage(user).await?;
        let charges = dash.reports.charges(user).await?;
        let terms = dash
            .catalog
            .effective(&viewer.user.subscription(), dash.clock.now())
            .await?
            .terms;
        let calls = terms.limit(usage_core::catalog::API_CALLS);
        let (included, past) = layout::describe_limit(calls);
        let overage_price = match calls.and_then(|l| l.overage.as_ref()) {
            Some(usage_core::pricing::OverageModel::PerUnit { unit_price_micros }) => {
                format!("{} per 1,000 calls", money_per_thousand(*unit_price_micros))
            }
            _ => past,
        };
        let not_invoiced = Cents(overage.overage_cost_cents.0 - overage.invoiced_cents.0);
        let body = html! {
            section aria-labelledby="plan" {
                h2 #plan { "Plan" }
                dl.figures {
                    div { dt { "Plan" } dd #plan-name { (viewer.user.plan.as_str()) } }
                    div { dt { "Price" } dd #plan-price { (money(Cents(terms.price_cents))) " a month" } }
                    div { dt { "Included calls" } dd { (included) } }
                    div { dt { "Overage price" } dd { (overage_price) } }
                }
            }
            section aria-labelledby="overage" {
                h2 #overage { "Overage, " (day(overage.period_start)) " to " (day(overage.period_end)) }
                dl.figures {
                    div { dt { "Overage calls" } dd #billing-overage-calls data-value=(overage.overage_calls) { (group(overage.overage_calls)) } }
                    div { dt { "Cost so far" } dd #billing-overage-cost data-value=(overage.overage_cost_cents.0) { (money(overage.overage_cost_cents)) } }
                    div { dt { "Invoiced" } dd #invoiced data-value=(overage.invoiced_cents.0) { (money(overage.invoiced_cents)) " (" (group(overage.invoiced_calls)) " calls)" } }
                    div { dt { "Not yet invoiced" } dd #not-invoiced data-value=(not_invoiced.0) { (money(not_invoiced)) } }
                }
                p.hint { (overage.message) }
            }
            section aria-labelledby="charges" {
                h2 #charges { "Charges" }
                (charges_table(&charges))
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Billing, "Billing", body),
        ))
    })
    .await
}

/// The charges table (also on an admin's user page).
pub(crate) fn charges_table(charges: &[usage_analytics::reports::ChargeItem]) -> Markup {
    html! {
        @if charges.is_empty() {
            p.empty #no-charges { "No overage charges yet." }
        } @else {
            div.scroll {
                table #charge-table {
                    thead { tr {
                        th scope="col" { "Period" } th scope="col" { "Overage calls" } th scope="col" { "Amount" }
                        th scope="col" { "Status" } th scope="col" { "Recorded" }
                    } }
                    tbody {
                        @for c in charges {
                            tr {
                                td { (day(c.period_start)) } td.num { (group(c.overage_calls)) }
                                td.num { (money(Cents(c.amount_cents))) } td { (c.status) }
                                td { (minute(c.created_at)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A per-call price in micro-dollars as the price of 1,000 calls ($0.001 a call is
/// $1.00): micro-dollars × 1,000 / 10,000 = cents.
fn money_per_thousand(micro_usd_per_call: i64) -> String {
    money(Cents(micro_usd_per_call / 10))
}
