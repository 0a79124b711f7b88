//! The page frame (header, navigation, who is signed in), the sign-in page and the error
//! page, and small formatting helpers shared by the pages.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use time::OffsetDateTime;
use time::macros::format_description;
use usage_core::Cents;
use usage_core::catalog::MeterLimit;
use usage_core::pricing::OverageModel;

use crate::chart::group;

use crate::{Viewer, page_response};

/// Which navigation entry is the current page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Usage,
    Keys,
    Billing,
    Admin,
    None,
}

/// A full page: `title`, the navigation for `viewer`, and `body`.
pub(crate) fn page(viewer: Option<&Viewer>, nav: Nav, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · nexus-usage" }
                link rel="icon" type="image/svg+xml" href="/dashboard/assets/icon.svg";
                link rel="stylesheet" href="/dashboard/assets/dashboard.css";
                script src="/dashboard/assets/dashboard.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/dashboard" { "nexus-usage" }
                    @if let Some(viewer) = viewer {
                        nav aria-label="Main" {
                            ul {
                                (entry(nav, Nav::Usage, "/dashboard", "Usage"))
                                (entry(nav, Nav::Keys, "/dashboard/keys", "API keys"))
                                (entry(nav, Nav::Billing, "/dashboard/billing", "Billing"))
                                @if viewer.admin {
                                    (entry(nav, Nav::Admin, "/dashboard/admin", "Admin"))
                                }
                            }
                        }
                        div.who {
                            span #signed-in-as {
                                "Signed in as " strong { (viewer.user.email) }
                                " (" (viewer.user.plan.as_str()) (if viewer.admin { ", admin" } else { "" }) ")"
                            }
                            form method="post" action="/dashboard/logout" {
                                input type="hidden" name="csrf" value=(viewer.csrf());
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn entry(current: Nav, this: Nav, href: &str, label: &str) -> Markup {
    html! {
        li {
            @if current == this {
                a href=(href) aria-current="page" { (label) }
            } @else {
                a href=(href) { (label) }
            }
        }
    }
}

/// The page a visitor without a session gets: how to sign in; never data.
pub(crate) fn sign_in_response(message: Option<&str>, status: StatusCode) -> HttpResponse {
    let body = html! {
        @if let Some(message) = message {
            p.notice role="alert" { (message) }
        }
        p { "Sign in with the one-time link your administrator gives you:" }
        pre { code { "usage-server login-link --user eco_usr_..." } }
        p { "or with a user token (JWT) issued by your application:" }
        form.stack method="post" action="/dashboard/session" {
            label for="token" { "User token" }
            input #token type="password" name="token" autocomplete="off" required;
            button type="submit" { "Sign in" }
        }
    };
    page_response(
        &mut HttpResponse::build(status),
        page(None, Nav::None, "Sign in", body),
    )
}

/// The page a sign-in link opens: one button posts the link's token back.
pub(crate) fn confirm_link_response(token: &str) -> HttpResponse {
    let body = html! {
        p { "This one-time link signs you in to the dashboard." }
        form.stack method="post" action="/dashboard/login" {
            input type="hidden" name="token" value=(token);
            button #sign-in type="submit" { "Sign in" }
        }
    };
    page_response(
        &mut HttpResponse::build(StatusCode::OK),
        page(None, Nav::None, "Sign in", body),
    )
}

/// An error page.
pub(crate) fn error_page(viewer: Option<&Viewer>, title: &str, text: &str) -> Markup {
    page(
        viewer,
        Nav::None,
        title,
        html! {
            p.notice role="alert" { (text) }
            p { a href="/dashboard" { "Back to the dashboard" } }
        },
    )
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf_field(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(viewer.csrf()); }
}

/// `$1,234.56`.
pub(crate) fn money(cents: Cents) -> String {
    let sign = if cents.0 < 0 { "-" } else { "" };
    let abs = cents.0.unsigned_abs();
    format!("{sign}${}.{:02}", crate::chart::group(abs / 100), abs % 100)
}

/// `2026-12-01`.
pub(crate) fn day(t: OffsetDateTime) -> String {
    t.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// `2026-12-01 14:03 UTC`.
pub(crate) fn minute(t: OffsetDateTime) -> String {
    t.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute] UTC"
    ))
    .unwrap_or_default()
}

/// How `limit` is priced past its included units, in a few words.
pub(crate) fn describe_limit(limit: Option<&MeterLimit>) -> (String, String) {
    let Some(limit) = limit else {
        return ("unlimited".into(), "not limited".into());
    };
    let included = limit.included.map_or_else(|| "unlimited".into(), group);
    let past = match (&limit.over_limit, &limit.overage) {
        (usage_core::OverLimit::Block, _) => "blocked".to_owned(),
        (_, None) => "never limited".to_owned(),
        (_, Some(OverageModel::PerUnit { unit_price_micros })) => {
            format!(
                "{} µ$ a unit",
                group(u64::try_from(*unit_price_micros).unwrap_or(0))
            )
        }
        (
            _,
            Some(OverageModel::Package {
                package_size,
                package_price_micros,
            }),
        ) => format!(
            "{} µ$ a package of {}",
            group(u64::try_from(*package_price_micros).unwrap_or(0)),
            group(*package_size)
        ),
        (_, Some(OverageModel::Graduated { tiers })) => format!("graduated, {} tiers", tiers.len()),
        (_, Some(OverageModel::Volume { tiers })) => format!("volume, {} tiers", tiers.len()),
    };
    (included, past)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_has_cents_and_groups() {
        assert_eq!(money(Cents(0)), "$0.00");
        assert_eq!(money(Cents(5)), "$0.05");
        assert_eq!(money(Cents(123_456)), "$1,234.56");
        assert_eq!(money(Cents(-250)), "-$2.50");
    }
}
