//! The admin pages of the meters and route costs: every meter with a form to rename it, a
//! form for a new meter, and the route costs edited as the JSON the admin API takes (the
//! list is replaced whole, as `PUT /api/admin/costs` replaces it).

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::html;
use usage_core::catalog::from_json;
use usage_core::meter::{Aggregation, Meter, MeterRevision, RouteCosts};

use crate::admin::{admin_nav_then, admin_page};
use crate::chart::group;
use crate::layout::{Nav, csrf_field, page};
use crate::plans::form_note;
use crate::{Dashboard, Viewer, check_form, page_response, see_other};

type Form = web::Form<HashMap<String, String>>;

/// A form field, empty when absent.
fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map(String::as_str).unwrap_or_default()
}

/// `GET /dashboard/admin/meters`: the meters, a form for a new one, and the route costs.
pub(crate) async fn meters(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    admin_page(&req, &dash, String::new(), async |viewer: Viewer| {
        let meters = dash.plans.meters().await?;
        let costs = dash.plans.costs().await?;
        // Who used the most of each meter this period: five each.
        let mut tops = Vec::new();
        for m in meters.iter() {
            tops.push((m.clone(), dash.admin.top_by_meter(&m.key, 5).await?));
        }
        let costs_json = serde_json::to_string_pretty(&costs).unwrap_or_default();
        let body = html! {
            div.scroll {
                table #meter-table {
                    thead { tr {
                        th scope="col" { "Meter" } th scope="col" { "Unit" }
                        th scope="col" { "Adds up as" } th scope="col" { "Rename" }
                    } }
                    tbody {
                        @for m in meters.iter() {
                            tr {
                                td { (m.name) " " code { (m.key) } }
                                td { (m.unit) }
                                td { (describe(m.aggregation)) }
                                td {
                                    form.inline method="post" action={ "/dashboard/admin/meters/" (m.key) } {
                                        (csrf_field(&viewer))
                                        label.visually-hidden for={ "name-" (m.key) } { "Name of " (m.key) }
                                        input id={ "name-" (m.key) } name="name" value=(m.name) maxlength="100" required;
                                        label.visually-hidden for={ "unit-" (m.key) } { "Unit of " (m.key) }
                                        input id={ "unit-" (m.key) } name="unit" value=(m.unit) maxlength="40" required;
                                        button type="submit" { "Save" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="top-users" {
                h2 #top-users { "Most used this period" }
                @for (m, top) in &tops {
                    section.top-meter data-meter=(m.key) aria-labelledby={ "top-" (m.key) } {
                        h3 id={ "top-" (m.key) } { (m.name) }
                        @if top.items.is_empty() {
                            p.empty { "No usage this period." }
                        } @else {
                            ol {
                                @for u in &top.items {
                                    li {
                                        a href={ "/dashboard/admin/users/" (u.user_id) } { (u.email) }
                                        " (" (u.plan) "): "
                                        span.quantity data-value=(u.quantity) { (group(u.quantity)) " " (m.unit) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="new-meter" {
                h2 #new-meter { "New meter" }
                form method="post" action="/dashboard/admin/meters" {
                    (csrf_field(&viewer))
                    label for="meter-key" { "Key (a-z, 0-9, _ and -; never changes)" }
                    input #meter-key name="key" required maxlength="40" pattern="[a-z0-9_-]{1,40}" placeholder="tokens";
                    label for="meter-name" { "Name" }
                    input #meter-name name="name" required maxlength="100" placeholder="Tokens";
                    label for="meter-unit" { "Unit" }
                    input #meter-unit name="unit" required maxlength="40" placeholder="token";
                    label for="meter-aggregation" { "Adds up as" }
                    select #meter-aggregation name="aggregation" {
                        @for kind in Aggregation::ALL {
                            option value=(kind.as_str()) selected[kind == Aggregation::Sum] { (describe(kind)) }
                        }
                    }
                    button type="submit" { "Create meter" }
                }
                p.hint { "Only count and sum meters can block calls at a plan's limit; every kind can be billed as overage. The way a meter adds up is fixed once its usage is stored." }
            }
            section aria-labelledby="route-costs" {
                h2 #route-costs { "Route costs" }
                form method="post" action="/dashboard/admin/costs" {
                    (csrf_field(&viewer))
                    label for="costs-json" { "Every route cost (JSON, as the admin API takes it; replaces the list)" }
                    textarea #costs-json name="costs" rows="12" cols="70" spellcheck="false" { (costs_json) }
                    button type="submit" { "Save route costs" }
                }
                p.hint { "A route is the method, a space and the endpoint as recorded: \"POST /v1/generate\". Each call takes its quantity of the meter at admission; a call that would take a blocking meter past its limit is refused." }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, "Meters", admin_nav_then(body, "meters")),
        ))
    })
    .await
}

/// How a kind of meter adds up, for people.
fn describe(kind: Aggregation) -> &'static str {
    match kind {
        Aggregation::Count => "count of reports",
        Aggregation::Sum => "sum of quantities",
        Aggregation::Max => "largest quantity",
        Aggregation::UniqueCount => "distinct values",
    }
}

/// `POST /dashboard/admin/meters` (`key`, `name`, `unit`, `aggregation`).
pub(crate) async fn create(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, form_note(&form), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let meter = Meter {
            key: field(&form, "key").trim().to_owned(),
            name: field(&form, "name").trim().to_owned(),
            unit: field(&form, "unit").trim().to_owned(),
            aggregation: Aggregation::parse(field(&form, "aggregation"))?,
        };
        dash.plans.create_meter(&meter).await?;
        Ok(see_other("/dashboard/admin/meters"))
    })
    .await
}

/// `POST /dashboard/admin/meters/{key}` (`name`, `unit`).
pub(crate) async fn rename(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, form_note(&form), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let revision = MeterRevision {
            name: field(&form, "name").trim().to_owned(),
            unit: field(&form, "unit").trim().to_owned(),
            aggregation: None,
            key: None,
        };
        dash.plans.update_meter(&path, &revision).await?;
        Ok(see_other("/dashboard/admin/meters"))
    })
    .await
}

/// `POST /dashboard/admin/costs` (`costs`: `{"items": [...]}`).
pub(crate) async fn replace_costs(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, form_note(&form), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let costs: RouteCosts = from_json(field(&form, "costs").as_bytes())?;
        dash.plans.replace_costs(costs).await?;
        Ok(see_other("/dashboard/admin/meters#route-costs"))
    })
    .await
}
