//! The admin pages of the plan catalog: every plan, one plan with its versions and a quote
//! as a preview, and the forms that create a plan, make a new version and archive one.
//! Terms are edited as the JSON the admin API takes, so that every pricing model fits one
//! form; a refused plan names its field, as the API's errors do.

use std::collections::{BTreeMap, HashMap};

use actix_web::{HttpRequest, HttpResponse, web};
use maud::html;
use usage_core::Cents;
use usage_core::catalog::{
    API_CALLS, CatalogError, PlanDefinition, PlanMove, from_json, revision_from_json,
};
use usage_core::plans::PlanError;

use crate::admin::{admin_nav_then, admin_page};
use crate::chart::group;
use crate::layout::{Nav, csrf_field, day, describe_limit, money, page};
use crate::{Dashboard, PageError, Viewer, check_form, page_response, query, see_other};

type Form = web::Form<HashMap<String, String>>;

impl From<CatalogError> for PageError {
    fn from(e: CatalogError) -> Self {
        PageError::BadRequest(e.to_string())
    }
}

impl From<PlanError> for PageError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::UnknownPlan(_) | PlanError::UnknownMeter(_) => PageError::NotFound,
            PlanError::Repo(e) => e.into(),
            other => PageError::BadRequest(other.to_string()),
        }
    }
}

/// The plan a new-plan form starts from: the contract's example.
const NEW_PLAN: &str = r#"{
  "key": "growth",
  "name": "Growth",
  "price_cents": 9900,
  "currency": "usd",
  "public": true,
  "burst": null,
  "limits": [
    {
      "meter": "api_calls",
      "included": 250000,
      "over_limit": "overage",
      "alerts": [80, 100],
      "overage": {
        "model": "graduated",
        "tiers": [
          {"up_to": 750000, "unit_price_micros": 800},
          {"up_to": null, "unit_price_micros": 500}
        ]
      }
    }
  ]
}"#;

/// A plan's terms as the new-version form shows them (without what the form does not set).
fn editable_json(plan: &PlanDefinition) -> String {
    let mut json = serde_json::to_value(plan).unwrap_or_default();
    if let Some(object) = json.as_object_mut() {
        object.remove("version");
        object.remove("archived");
    }
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

/// `GET /dashboard/admin/plans`: every plan's newest version, and a form for a new one.
pub(crate) async fn plans(req: HttpRequest, dash: web::Data<Dashboard>) -> HttpResponse {
    admin_page(&req, &dash, String::new(), async |viewer: Viewer| {
        let list = dash.plans.list().await?;
        let body = html! {
            div.scroll {
                table #plan-table {
                    thead { tr {
                        th scope="col" { "Plan" } th scope="col" { "Version" } th scope="col" { "Price / month" }
                        th scope="col" { "Included calls" } th scope="col" { "Past the limit" }
                        th scope="col" { "Subscribers" } th scope="col" { "Status" }
                    } }
                    tbody {
                        @for s in &list {
                            @let (included, past) = describe_limit(s.plan.limit(API_CALLS));
                            tr {
                                td { a href={ "/dashboard/admin/plans/" (s.plan.key) } { (s.plan.name) } " " code { (s.plan.key) } }
                                td.num { (s.plan.version) }
                                td.num { (money(Cents(s.plan.price_cents))) }
                                td.num { (included) } td { (past) }
                                td.num { (group(s.subscribers)) }
                                td { @if s.plan.archived { "archived" } @else if s.plan.public { "offered" } @else { "not offered" } }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="new-plan" {
                h2 #new-plan { "New plan" }
                form method="post" action="/dashboard/admin/plans" {
                    (csrf_field(&viewer))
                    label for="plan-json" { "Terms (JSON, as the admin API takes them)" }
                    textarea #plan-json name="plan" rows="24" cols="70" spellcheck="false" { (NEW_PLAN) }
                    button type="submit" { "Create plan" }
                }
                p.hint { "Models: per_unit, package, graduated, volume; prices in micro-dollars (1,000,000 = $1). Users can be moved onto plans of your own once metering reads the catalog; docs/OPERATIONS.md." }
            }
        };
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, "Plans", admin_nav_then(body, "plans")),
        ))
    })
    .await
}

/// The quote form's field for `meter`'s usage.
fn usage_field(meter: &str) -> String {
    if meter == API_CALLS {
        "calls".to_owned()
    } else {
        format!("usage.{meter}")
    }
}

/// `GET /dashboard/admin/plans/{key}[?calls=N&usage.<meter>=N]`: the plan, its versions, a
/// quote of that usage.
pub(crate) async fn plan(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
) -> HttpResponse {
    let note = req.query_string().to_owned();
    admin_page(&req, &dash, note, async |viewer: Viewer| {
        let detail = dash.plans.get(&path).await?;
        let plan = &detail.summary.plan;
        let params = query(&req)?;
        // One field a limited meter (`calls` for api_calls, `usage.<key>` for the others),
        // each twice its included units unless given.
        let mut usage = BTreeMap::from([(API_CALLS.to_owned(), 0)]);
        for limit in &plan.limits {
            usage.insert(limit.meter.clone(), limit.included.unwrap_or(0).saturating_mul(2));
        }
        for (meter, used) in usage.iter_mut() {
            let name = usage_field(meter);
            if let Some(raw) = params.get(&name).map(|c| c.trim()).filter(|c| !c.is_empty()) {
                *used = raw.parse::<u64>().map_err(|_| {
                    PageError::BadRequest(format!(
                        "{name} must be a whole number from 0 to {} (got {raw:?})",
                        u64::MAX
                    ))
                })?;
            }
        }
        let quote = dash.plans.quote(&plan.key, &usage).await?;
        let base = format!("/dashboard/admin/plans/{}", plan.key);
        let body = html! {
            dl.figures {
                div { dt { "Key" } dd { code #plan-key { (plan.key) } } }
                div { dt { "Version" } dd #plan-version { (plan.version) } }
                div { dt { "Price / month" } dd #plan-price { (money(Cents(plan.price_cents))) " " (plan.currency) } }
                div { dt { "Subscribers" } dd { (group(detail.summary.subscribers)) } }
                div { dt { "Stripe price" } dd { (plan.stripe_price_id.clone().unwrap_or_else(|| "none".into())) } }
                div { dt { "Short-window limit" } dd { @if let Some(b) = plan.burst { (b.per_second) " a second, bursts of " (b.burst) } @else { "none" } } }
                div { dt { "Status" } dd #plan-status { @if plan.archived { "archived" } @else if plan.public { "offered" } @else { "not offered" } } }
            }
            section aria-labelledby="quote" {
                h2 #quote { "What a period costs" }
                form.inline method="get" action=(base) {
                    @for (meter, used) in &usage {
                        @let name = usage_field(meter);
                        label for=(name) { (meter) " in a period" }
                        input id=(name) type="number" name=(name) min="0" value=(used);
                    }
                    button type="submit" { "Quote" }
                }
                div.scroll {
                    table #quote-table {
                        thead { tr { th scope="col" { "Meter" } th scope="col" { "Used" } th scope="col" { "Included" } th scope="col" { "Overage units" } th scope="col" { "Tier" } th scope="col" { "Amount" } } }
                        tbody {
                            @for line in &quote.lines {
                                tr {
                                    td { (line.meter) } td.num { (group(line.used)) }
                                    td.num { (line.included.map_or_else(|| "unlimited".into(), group)) }
                                    td.num { (group(line.overage_units)) } td { }
                                    td.num { (money(Cents(line.amount_cents))) }
                                }
                                @for tier in &line.tiers {
                                    tr.tier {
                                        td { } td { } td { } td.num { (group(tier.units)) }
                                        td { "up to " (tier.up_to.map_or_else(|| "any".into(), group)) " at " (tier.unit_price_micros) " µ$" }
                                        td.num { (tier.amount_micros) " µ$" }
                                    }
                                }
                            }
                        }
                        tfoot {
                            tr { th scope="row" colspan="5" { "Subscription" } td.num { (money(Cents(quote.subscription_cents))) } }
                            tr { th scope="row" colspan="5" { "Overage" } td.num #quote-overage { (money(Cents(quote.overage_cents))) } }
                            tr { th scope="row" colspan="5" { "Total" } td.num #quote-total { (money(Cents(quote.total_cents))) } }
                        }
                    }
                }
                p.hint { "Each meter's overage is one invoice item, rounded half-up to the cent once." }
            }
            section aria-labelledby="new-version" {
                h2 #new-version { "New version" }
                form method="post" action=(base) {
                    (csrf_field(&viewer))
                    label for="plan-json" { "Terms (JSON)" }
                    textarea #plan-json name="plan" rows="24" cols="70" spellcheck="false" { (editable_json(plan)) }
                    label for="existing" { "Users on earlier versions move" }
                    select #existing name="existing" {
                        option value="next_period" { "at their next period" }
                        option value="now" { "now" }
                        option value="keep" { "never (they keep their terms)" }
                    }
                    button type="submit" { "Save as version " (plan.version + 1) }
                }
            }
            @if !plan.archived {
                section aria-labelledby="archive" {
                    h2 #archive { "Archive" }
                    form.inline method="post" action={ (base) "/archive" } {
                        (csrf_field(&viewer))
                        button.danger type="submit" { "Archive " (plan.name) }
                    }
                    p.hint { "An archived plan takes no new subscribers; its users keep it. The default plan cannot be archived." }
                }
            }
            section aria-labelledby="versions" {
                h2 #versions { "Versions" }
                div.scroll {
                    table #version-table {
                        thead { tr { th scope="col" { "Version" } th scope="col" { "Made" } th scope="col" { "Earlier users moved" } th scope="col" { "Price / month" } th scope="col" { "Included calls" } th scope="col" { "Past the limit" } } }
                        tbody {
                            @for v in detail.versions.iter().rev() {
                                @let (included, past) = describe_limit(v.plan.limit(API_CALLS));
                                tr {
                                    td.num { (v.plan.version) } td { (day(v.created_at)) }
                                    td { (match v.existing { PlanMove::NextPeriod => "at their next period", PlanMove::Now => "at once", PlanMove::Keep => "never" }) }
                                    td.num { (money(Cents(v.plan.price_cents))) } td.num { (included) } td { (past) }
                                }
                            }
                        }
                    }
                }
            }
        };
        let title = format!("Plan {}", plan.name);
        Ok(page_response(
            &mut HttpResponse::Ok(),
            page(Some(&viewer), Nav::Admin, &title, admin_nav_then(body, "plans")),
        ))
    })
    .await
}

/// The audit note of a plan form: its fields but the CSRF token.
pub(crate) fn form_note(form: &Form) -> String {
    let mut fields: Vec<String> = form
        .iter()
        .filter(|(k, _)| k.as_str() != "csrf")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    fields.sort();
    fields.join(" ")
}

/// `POST /dashboard/admin/plans` (`plan`: the terms as JSON).
pub(crate) async fn create(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, form_note(&form), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let raw = form.get("plan").map(String::as_str).unwrap_or_default();
        let plan: PlanDefinition = from_json(raw.as_bytes())?;
        let created = dash.plans.create(&plan).await?;
        Ok(see_other(&format!(
            "/dashboard/admin/plans/{}",
            created.plan.key
        )))
    })
    .await
}

/// `POST /dashboard/admin/plans/{key}` (`plan`, `existing`): a new version.
pub(crate) async fn revise(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, form_note(&form), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        let raw = form.get("plan").map(String::as_str).unwrap_or_default();
        let (plan, in_terms) = revision_from_json(&path, raw.as_bytes())?;
        // The form's own choice, else what the terms say, else the default.
        let existing = match form.get("existing").map(String::as_str) {
            None | Some("") => in_terms.unwrap_or_default(),
            Some(raw) => PlanMove::parse(raw)?,
        };
        dash.plans.revise(&plan, existing).await?;
        Ok(see_other(&format!("/dashboard/admin/plans/{}", plan.key)))
    })
    .await
}

/// `POST /dashboard/admin/plans/{key}/archive`.
pub(crate) async fn archive(
    req: HttpRequest,
    dash: web::Data<Dashboard>,
    path: web::Path<String>,
    form: Form,
) -> HttpResponse {
    admin_page(&req, &dash, String::new(), async |viewer: Viewer| {
        check_form(&req, &viewer, &form)?;
        dash.plans.set_archived(&path, true).await?;
        Ok(see_other(&format!("/dashboard/admin/plans/{path}")))
    })
    .await
}
