//! The admin pages, for `ADMIN_ECO_IDS` only: a signed-in non-admin gets "Not found" for
//! every one of them, whatever the URL. Every admin request is written to the audit log
//! with what was asked and the status answered, as the admin API's are.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use time::Duration;
use usage_analytics::admin::{UserPatch, parse_user_list};
use usage_core::repo::AdminAuditEntry;
use usage_core::{ApiKeyId, Cents, Plan};

use crate::chart::{self, Bar, group};
use crate::layout::{self, Nav, csrf_field, day, minute, money, page};
use crate::user::charges_table;
use crate::{
    Dashboard, PageError, PageResult, Viewer, check_form, page_response, query, see_other, user_id,
};

type Form = web::Form<HashMap<String, String>>;

/// Runs an admin page: a non-admin sees "Not found"; every request is audited.
pub(crate) async fn admin_page<F, Fut>(
    req: &HttpRequest,
    dash: &Dashboard,
    note: String,
    page: F,
) -> HttpResponse
where
    F: FnOnce(Viewer) -> Fut,
    Fut: Future<Output = PageResult>,
{
    let viewer = match Viewer::of(req, dash).await {
        Ok(Some(viewer)) => viewer,
        Ok(None) => return layout::sign_in_response(None, StatusCode::OK),
        Err(e) => return e.response(None),
    };
    let shown = viewer.clone();
    let response = if viewer.admin {
        match page(viewer).await {
            Ok(response) => response,
            Err(e) => e.response(Some(&shown)),
        }
    } else {
        PageError::NotFound.response(Some(&shown))
    };
    let entry = AdminAuditEntry {
        id: 0,
        admin_id: shown.user.id.clone(),
        method: req.method().as_str().to_owned(),
        route: req.path().chars().take(500).collect(),
        params: note
            .chars()
            .filter(|c| !c.is_control())
            .take(2000)
            .collect(),
        status: response.status().as_u16(),
        created_at: dash.clock.now(),
    };
    if let Err(e) = dash.admin.record(&entry).await {
        tracing::warn!(error = %e, "dashboard: could not write the admin audit log");
    }
    response
}

/// `GET /dashboard/admin`: the business at a glance.
pub(crate) async fn overview(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    let note = req.query_string().to_owned();
    admin_page(&req, &dash, note, async |viewer: Viewer| {
        let o = dash.admin.overview().await?;
        let today = dash.clock.now().date();
        let from = today - Duration::days(30);
        let totals = dash.admin.daily_totals(from, today).await?;
        let mut bars: Vec<Bar> = totals
            .iter()
            .map(|t| Bar {
                label: t.date.to_string(),
                total: t.api_calls,
                errors: t.error_calls,
            })
            .collect();
        bars.push(Bar {
            label: format!("{today} (so far)"),
            total: o.api_calls_today,
            errors: 0,
        });
        let body = html! {
            dl.figures #overview {
                div { dt { "Users" } dd #users-total data-value=(o.users.total) { (group(o.users.total)) } }
                div { dt { "By plan" } dd #users-by-plan {
                    @for (i, (plan, n)) in o.users.plans.iter().enumerate() {
                        @if i > 0 { ", " }
                        (plan) " " (group(*n))
                    }
                } }
                div { dt { "MRR" } dd #mrr data-value=(o.mrr_cents) { (money(Cents(o.mrr_cents))) } }
                div { dt { "Overage invoiced" } dd { (money(Cents(o.overage_revenue_cents))) } }
                div { dt { "Metered usage invoiced" } dd #meter-revenue data-value=(o.meter_revenue_cents) { (money(Cents(o.meter_revenue_cents))) } }
                div { dt { "Overage accrued, not invoiced" } dd { (money(Cents(o.overage_uninvoiced_cents))) } }
                div { dt { "Overage forecast" } dd { (money(Cents(o.overage_forecast_cents))) } }
                div { dt { "Calls today" } dd #calls-today data-value=(o.api_calls_today) { (group(o.api_calls_today)) } }
                div { dt { "Calls this month" } dd #calls-month data-value=(o.api_calls_this_month) { (group(o.api_calls_this_month)) } }
            }
            section aria-labelledby="daily" {
                h2 #daily { "Calls per day, last 30 days" }
                (chart::bars("Calls per day over all users", &bars))
                p.hint { "Past days appear once the daily aggregation has run for them; today is counted live (errors of today are not split out)." }
            }
            section aria-labelledby="top" {
                h2 #top { "Top users this period" }
                @if o.top_users.is_empty() {
                    p.empty { "No calls this period." }
                } @else {
                    table {
                        thead { tr { th scope="col" { "User" } th scope="col" { "Plan" } th scope="col" { "Calls" } } }
                        tbody {
                            @for u in &o.top_users {
                                tr {
                                    td { a href={ "/dashboard/admin/users/" (u.user_id) } { (u.email) } }
                                    td { (u.plan.as_str()) } td.num { (group(u.api_calls)) }
                                }
                            }
                        }
                    }
                }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, "Admin overview", admin_nav_then(body, "overview")),
        ))
    })
    .await
}

pub(crate) fn admin_nav_then(body: Markup, current: &str) -> Markup {
    html! {
        nav.subnav aria-label="Admin" {
            @for (key, href, label) in [("overview", "/dashboard/admin", "Overview"), ("users", "/dashboard/admin/users", "Users"), ("plans", "/dashboard/admin/plans", "Plans"), ("meters", "/dashboard/admin/meters", "Meters"), ("audit", "/dashboard/admin/audit", "Audit log")] {
                @if key == current { a href=(href) aria-current="page" { (label) } } @else { a href=(href) { (label) } }
                " "
            }
        }
        (body)
    }
}

/// `GET /dashboard/admin/users`: search, plan filter, sort by every allowed key, pages.
pub(crate) async fn users(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    let note = req.query_string().to_owned();
    admin_page(&req, &dash, note, async |viewer: Viewer| {
        // An empty form field is no filter.
        let mut params = query(&req)?;
        params.retain(|_, v| !v.trim().is_empty());
        let list = parse_user_list(&params)?;
        let page_of = dash.admin.users(&list).await?;
        let pages = page_of.total.div_ceil(u64::from(list.limit)).max(1);
        let link = |page: u64| {
            let mut p: Vec<(String, String)> = params
                .iter()
                .filter(|(k, _)| k.as_str() != "page")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            p.sort();
            p.push(("page".into(), page.to_string()));
            let query = serde_urlencoded::to_string(&p).unwrap_or_default();
            format!("/dashboard/admin/users?{query}")
        };
        let selected = |key: &str, value: &str| params.get(key).is_some_and(|v| v == value);
        let body = html! {
            form.filters method="get" action="/dashboard/admin/users" role="search" {
                label for="q" { "Search" }
                input #q type="search" name="q" value=(params.get("q").cloned().unwrap_or_default()) placeholder="email or user id" maxlength="100";
                label for="plan" { "Plan" }
                select #plan name="plan" {
                    option value="" { "all" }
                    @for plan in ["free", "pro", "enterprise"] {
                        option value=(plan) selected[selected("plan", plan)] { (plan) }
                    }
                }
                label for="sort" { "Sort by" }
                select #sort name="sort" {
                    @for (value, label) in [("api_calls", "calls"), ("created_at", "sign-up"), ("email", "email"), ("revenue", "revenue")] {
                        option value=(value) selected[selected("sort", value)] { (label) }
                    }
                }
                label for="order" { "Order" }
                select #order name="order" {
                    option value="desc" selected[selected("order", "desc")] { "descending" }
                    option value="asc" selected[selected("order", "asc")] { "ascending" }
                }
                button type="submit" { "Show" }
            }
            p #users-count { (group(page_of.total)) " users; page " (page_of.page) " of " (group(pages)) "." }
            div.scroll {
                table #user-table {
                    thead { tr {
                        th scope="col" { "Email" } th scope="col" { "Plan" } th scope="col" { "Signed up" }
                        th scope="col" { "Calls" } th scope="col" { "Included" } th scope="col" { "Overage" } th scope="col" { "Revenue" }
                    } }
                    tbody {
                        @for u in &page_of.items {
                            tr {
                                td { a href={ "/dashboard/admin/users/" (u.user_id) } { (u.email) } }
                                td { (u.plan.as_str()) } td { (day(u.created_at)) }
                                td.num { (group(u.api_calls)) }
                                td.num { (u.limit.map(group).unwrap_or_else(|| "unlimited".into())) }
                                td.num { (group(u.overage_calls)) }
                                td.num { (money(Cents(u.revenue_cents))) }
                            }
                        }
                    }
                }
            }
            nav.pager aria-label="Pages" {
                @if page_of.page > 1 { a rel="prev" href=(link(page_of.page - 1)) { "← Previous" } }
                " "
                @if page_of.page < pages { a rel="next" href=(link(page_of.page + 1)) { "Next →" } }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, "Users", admin_nav_then(body, "users")),
        ))
    })
    .await
}

/// `GET /dashboard/admin/users/{id}`: a user's figures, chart, keys, plan, charges.
pub(crate) async fn user(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
) -> HttpResponse {
    admin_page(&req, &dash, String::new(), async |viewer: Viewer| {
        let id = user_id(&path)?;
        let detail = dash.admin.user(&id).await?;
        let history = dash.reports.history(&id, 30, None).await?;
        let keys = dash.keys.list(&id).await?;
        let charges = dash.reports.charges(&id).await?;
        let now = dash.clock.now();
        let bars: Vec<Bar> = history
            .iter()
            .map(|d| Bar {
                label: d.date.to_string(),
                total: d.api_calls,
                errors: d.error_calls,
            })
            .collect();
        let body = html! {
            dl.figures {
                div { dt { "User id" } dd { code #user-id { (detail.user_id) } } }
                div { dt { "Plan" } dd #user-plan { (detail.plan.as_str()) } }
                div { dt { "Signed up" } dd { (day(detail.created_at)) } }
                div { dt { "Stripe customer" } dd { (detail.stripe_customer_id.clone().unwrap_or_else(|| "none".into())) } }
                div { dt { "Calls this period" } dd #user-calls data-value=(detail.api_calls) { (group(detail.api_calls)) } }
                div { dt { "Included" } dd { (detail.limit.map(group).unwrap_or_else(|| "unlimited".into())) } }
                div { dt { "Overage calls" } dd { (group(detail.overage_calls)) } }
                div { dt { "Revenue this period" } dd { (money(Cents(detail.revenue_cents))) } }
            }
            section aria-labelledby="change-plan" {
                h2 #change-plan { "Plan" }
                form.inline method="post" action={ "/dashboard/admin/users/" (detail.user_id) "/plan" } {
                    (csrf_field(&viewer))
                    label for="new-plan" { "Change plan to" }
                    select #new-plan name="plan" {
                        @for plan in [Plan::free(), Plan::pro(), Plan::enterprise()] {
                            option value=(plan.as_str()) selected[plan == detail.plan] { (plan.as_str()) }
                        }
                    }
                    button type="submit" { "Change plan" }
                }
                p.hint { "Takes effect on every server within a second; the user's next call follows the new plan's quota." }
            }
            section aria-labelledby="user-daily" {
                h2 #user-daily { "Calls per day, last 30 days" }
                (chart::bars("Calls per day", &bars))
            }
            section aria-labelledby="user-keys" {
                h2 #user-keys { "API keys" }
                @if keys.is_empty() { p.empty { "No keys." } } @else {
                    div.scroll {
                        table {
                            thead { tr { th scope="col" { "Name" } th scope="col" { "Key" } th scope="col" { "Created" } th scope="col" { "Last used" } th scope="col" { "Status" } th scope="col" { span.visually-hidden { "Actions" } } } }
                            tbody {
                                @for key in &keys {
                                    tr {
                                        td { (key.name) } td { code { (key.prefix) "…" } } td { (day(key.created_at)) }
                                        td { (key.last_used_at.map(minute).unwrap_or_else(|| "never".into())) }
                                        td { @if key.is_active(now) { "active" } @else { "inactive" } }
                                        td {
                                            @if key.is_active(now) {
                                                form.inline method="post" action={ "/dashboard/admin/users/" (detail.user_id) "/keys/" (key.id) "/revoke" } {
                                                    (csrf_field(&viewer))
                                                    button.danger type="submit" aria-label={ "Revoke " (key.name) } { "Revoke" }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="user-charges" {
                h2 #user-charges { "Charges" }
                (charges_table(&charges))
            }
        };
        let title = format!("User {}", detail.email);
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, &title, admin_nav_then(body, "users")),
        ))
    })
    .await
}

/// `POST /dashboard/admin/users/{id}/plan` (`plan`).
pub(crate) async fn set_plan(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    let note = format!(
        "plan={}",
        form.get("plan").map(String::as_str).unwrap_or("")
    );
    admin_page(&req, &dash, note, async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let id = user_id(&path)?;
        let raw = form.get("plan").map(String::as_str).unwrap_or_default();
        let plan = raw
            .parse::<Plan>()
            .map_err(|e| PageError::BadRequest(e.to_string()))?;
        dash.admin
            .update_user(
                &id,
                &UserPatch {
                    plan: Some(plan),
                    ..UserPatch::default()
                },
            )
            .await?;
        // This instance follows at once; the others at their next poll.
        dash.verifier.forget_user(&id);
        Ok(see_other(&format!("/dashboard/admin/users/{id}")))
    })
    .await
}

/// `POST /dashboard/admin/users/{id}/keys/{key}/revoke`.
pub(crate) async fn revoke_key(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<(String, String)>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, String::new(), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let id = user_id(&path.0)?;
        let key = ApiKeyId::parse(&path.1).map_err(|_| PageError::NotFound)?;
        dash.keys.revoke(&id, &key).await?;
        dash.verifier.forget_key(&key);
        Ok(see_other(&format!("/dashboard/admin/users/{id}")))
    })
    .await
}

/// `GET /dashboard/admin/audit?page=`: newest first.
pub(crate) async fn audit(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    let note = req.query_string().to_owned();
    admin_page(&req, &dash, note, async |viewer: Viewer| {
        let mut params = query(&req)?;
        params.retain(|_, v| !v.trim().is_empty());
        let (page_no, limit) = usage_analytics::admin::parse_page(&params)?;
        let entries = dash.admin.audit(page_no, limit).await?;
        let pages = entries.total.div_ceil(u64::from(limit)).max(1);
        let body = html! {
            p { (group(entries.total)) " entries; page " (page_no) " of " (group(pages)) "." }
            div.scroll {
                table #audit-table {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "Request" } th scope="col" { "Parameters" } th scope="col" { "Status" } } }
                    tbody {
                        @for e in &entries.items {
                            tr {
                                td { (minute(e.created_at)) }
                                td { code { (e.admin_id) } }
                                td { (e.method) " " code { (e.route) } }
                                td { code { (e.params) } }
                                td.num { (e.status) }
                            }
                        }
                    }
                }
            }
            nav.pager aria-label="Pages" {
                @if page_no > 1 { a rel="prev" href={ "/dashboard/admin/audit?page=" (page_no - 1) } { "← Newer" } }
                " "
                @if page_no < pages { a rel="next" href={ "/dashboard/admin/audit?page=" (page_no + 1) } { "Older →" } }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, "Audit log", admin_nav_then(body, "audit")),
        ))
    })
    .await
}
