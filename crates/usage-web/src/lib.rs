//! The dashboard: server-rendered pages (maud) for customers (usage, API keys, billing)
//! and admins (overview, users, a user, the audit log), mounted by `usage-server` with
//! [`configure`]. Figures come from the same services as the JSON API
//! (`usage-analytics`, `usage-auth`), so a page and its endpoint never disagree.
//!
//! Security: sessions are `HttpOnly`, `SameSite=Strict` cookies (`Secure` under https)
//! kept hashed in the database (`usage_auth::session`); every state-changing form carries
//! the session's CSRF token and must come from this origin; every page is authorized on
//! the server and sends a `Content-Security-Policy` that allows only this server's own
//! stylesheet and script (no inline script or style), `frame-ancestors 'none'` and
//! `Referrer-Policy: same-origin` (sign-in links carry a token in their URL: it never
//! leaves this server; and `no-referrer` would make browsers send `Origin: null` on this
//! server's own forms, which are refused).
#![warn(missing_docs)]

mod admin;
pub mod chart;
mod layout;
mod meters;
mod plans;
mod user;

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::DefaultHeaders;
use actix_web::{HttpRequest, HttpResponse, web};
use maud::Markup;
use usage_analytics::admin::AdminReports;
use usage_analytics::{AnalyticsError, UsageReports};
use usage_auth::AuthError;
use usage_auth::admin::AdminList;
use usage_auth::keys::KeyIssuer;
use usage_auth::session::DashboardSessions;
use usage_auth::verify::KeyVerifier;
use usage_core::repo::User;
use usage_core::{Clock, RepoError, Store, UserId};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "usage_session";

/// The policy every dashboard response carries: this server's CSS and JS only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// What the pages need.
pub struct Dashboard {
    /// Users, for names and plans.
    pub store: Arc<dyn Store>,
    /// Sign-in links and sessions.
    pub sessions: DashboardSessions,
    /// Verifies the user JWTs of `POST /dashboard/session`.
    pub jwt: Arc<usage_auth::jwt::JwtKeys>,
    /// The customer's figures (the same as `/api/usage/*`).
    pub reports: UsageReports,
    /// The admin figures (the same as `/api/admin/*`).
    pub admin: AdminReports,
    /// API keys.
    pub keys: KeyIssuer,
    /// `ADMIN_ECO_IDS`.
    pub admins: AdminList,
    /// This instance's key cache: forgets a key revoked or a plan changed here at once.
    pub verifier: Arc<KeyVerifier>,
    /// The plan catalog as this instance holds it: each user's effective terms.
    pub catalog: Arc<usage_core::terms::LiveCatalog>,
    /// The plan catalog, for its admin pages.
    pub plans: usage_core::plans::Plans,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// `Secure` cookies (`PUBLIC_URL` is https).
    pub secure_cookies: bool,
    /// The origin forms must come from (`scheme://host[:port]` of `PUBLIC_URL`); `None`
    /// when `PUBLIC_URL` is not configured: then `http://` and the request's `Host`.
    pub public_origin: Option<String>,
}

/// The origin (`scheme://host[:port]`, lowercase) of a URL such as `PUBLIC_URL`.
///
/// ```
/// assert_eq!(usage_web::origin_of("https://Usage.Example.com/base/"), Some("https://usage.example.com".into()));
/// assert_eq!(usage_web::origin_of("http://127.0.0.1:8080"), Some("http://127.0.0.1:8080".into()));
/// assert_eq!(usage_web::origin_of("usage.example.com"), None);
/// ```
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    (!scheme.is_empty() && !authority.is_empty())
        .then(|| format!("{scheme}://{authority}").to_ascii_lowercase())
}

/// Mounts `GET /` (to `/dashboard`) and everything under `/dashboard`. The app must hold
/// a `web::Data<Dashboard>`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // Browsers ask for `/favicon.ico` whatever the page declares.
    cfg.route(
        "/favicon.ico",
        web::get().to(|| async {
            HttpResponse::Ok()
                .content_type("image/svg+xml")
                .insert_header((header::CACHE_CONTROL, "public, max-age=86400"))
                .body(ICON)
        }),
    );
    cfg.route(
        "/",
        web::get().to(|| async {
            HttpResponse::Found()
                .insert_header((header::LOCATION, "/dashboard"))
                .finish()
        }),
    );
    cfg.service(
        web::scope("/dashboard")
            .wrap(
                DefaultHeaders::new()
                    .add((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
                    .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                    .add((header::X_FRAME_OPTIONS, "DENY"))
                    .add((header::REFERRER_POLICY, "same-origin")),
            )
            .app_data(
                web::FormConfig::default()
                    .limit(16 * 1024)
                    .error_handler(|error, _| {
                        let message = format!("The form could not be read: {error}");
                        actix_web::error::InternalError::from_response(
                            error,
                            PageError::BadRequest(message).response(None),
                        )
                        .into()
                    }),
            )
            .route("/assets/{file}", web::get().to(asset))
            .route("/login", web::get().to(user::confirm_login_link))
            .route("/login", web::post().to(user::login_with_link))
            .route("/session", web::post().to(user::login_with_token))
            .route("/logout", web::post().to(user::logout))
            .route("", web::get().to(user::usage))
            .route("/", web::get().to(user::usage))
            .route("/keys", web::get().to(user::keys))
            .route("/keys", web::post().to(user::create_key))
            .route("/keys/{id}/revoke", web::get().to(user::confirm_revoke))
            .route("/keys/{id}/revoke", web::post().to(user::revoke_key))
            .route("/keys/{id}/rotate", web::post().to(user::rotate_key))
            .route("/billing", web::get().to(user::billing))
            .route("/admin", web::get().to(admin::overview))
            .route("/admin/users", web::get().to(admin::users))
            .route("/admin/users/{id}", web::get().to(admin::user))
            .route("/admin/users/{id}/plan", web::post().to(admin::set_plan))
            .route(
                "/admin/users/{id}/keys/{key}/revoke",
                web::post().to(admin::revoke_key),
            )
            .route("/admin/audit", web::get().to(admin::audit))
            .route("/admin/plans", web::get().to(plans::plans))
            .route("/admin/plans", web::post().to(plans::create))
            .route("/admin/plans/{key}", web::get().to(plans::plan))
            .route("/admin/plans/{key}", web::post().to(plans::revise))
            .route("/admin/plans/{key}/archive", web::post().to(plans::archive))
            .route("/admin/meters", web::get().to(meters::meters))
            .route("/admin/meters", web::post().to(meters::create))
            .route("/admin/meters/{key}", web::post().to(meters::rename))
            .route("/admin/costs", web::post().to(meters::replace_costs))
            .default_service(web::to(
                |req: HttpRequest, dash: web::Data<Dashboard>| async move {
                    let viewer = Viewer::of(&req, &dash).await.ok().flatten();
                    PageError::NotFound.response(viewer.as_ref())
                },
            )),
    );
}

/// Who is looking at a page.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    pub user: User,
    pub admin: bool,
    /// The session token (for the CSRF token of its forms).
    pub session: String,
}

impl Viewer {
    /// The signed-in user of `req`, if any.
    pub(crate) async fn of(req: &HttpRequest, dash: &Dashboard) -> Result<Option<Self>, PageError> {
        let Some(cookie) = req.cookie(SESSION_COOKIE) else {
            return Ok(None);
        };
        let token = cookie.value().to_owned();
        let Some(user_id) = dash.sessions.user(&token).await? else {
            return Ok(None);
        };
        // A blocked user's sessions end with the block (`users block`).
        let user = match usage_auth::access::active_user(dash.store.as_ref(), &user_id).await {
            Ok(user) => user,
            Err(AuthError::UnknownUser(_) | AuthError::Blocked(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Self {
            admin: dash.admins.is_admin(&user.id),
            user,
            session: token,
        }))
    }

    /// The CSRF token its forms carry.
    pub(crate) fn csrf(&self) -> String {
        DashboardSessions::csrf_token(&self.session)
    }
}

/// What a page can fail with; each is a page, never a stack trace or database text.
#[derive(Debug)]
pub(crate) enum PageError {
    /// A parameter or form field is wrong; the message names it.
    BadRequest(String),
    /// A form without this session's CSRF token, or from another origin.
    Forbidden(&'static str),
    /// Nothing here (also what a non-admin sees of admin pages).
    NotFound,
    /// The database did not answer.
    Unavailable,
}

impl From<RepoError> for PageError {
    fn from(e: RepoError) -> Self {
        tracing::warn!(error = %e, "dashboard: the database failed");
        PageError::Unavailable
    }
}

impl From<AuthError> for PageError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Repo(e) => e.into(),
            AuthError::UnknownKey(_) | AuthError::UnknownUser(_) => PageError::NotFound,
            other => PageError::BadRequest(other.to_string()),
        }
    }
}

impl From<AnalyticsError> for PageError {
    fn from(e: AnalyticsError) -> Self {
        match e {
            AnalyticsError::Repo(e) => e.into(),
            AnalyticsError::NoSuchUser(_) => PageError::NotFound,
            other => PageError::BadRequest(other.to_string()),
        }
    }
}

impl PageError {
    fn status(&self) -> StatusCode {
        match self {
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Forbidden(_) => StatusCode::FORBIDDEN,
            PageError::NotFound => StatusCode::NOT_FOUND,
            PageError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The error page, within the layout when someone is signed in.
    pub(crate) fn response(&self, viewer: Option<&Viewer>) -> HttpResponse {
        let (title, text): (&str, String) = match self {
            PageError::BadRequest(message) => ("That did not work", message.clone()),
            PageError::Forbidden(why) => ("Not allowed", (*why).to_owned()),
            PageError::NotFound => ("Not found", "There is nothing here.".to_owned()),
            PageError::Unavailable => (
                "Temporarily unavailable",
                "The database is not answering right now. Your data is safe; please try again in a moment."
                    .to_owned(),
            ),
        };
        let mut response = HttpResponse::build(self.status());
        if matches!(self, PageError::Unavailable) {
            response.insert_header((header::RETRY_AFTER, "5"));
        }
        page_response(&mut response, layout::error_page(viewer, title, &text))
    }
}

/// A rendered page as an HTML response that no cache keeps.
pub(crate) fn page_response(
    builder: &mut actix_web::HttpResponseBuilder,
    page: Markup,
) -> HttpResponse {
    builder
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(page.into_string())
}

/// The page's outcome: a page, or the error page.
pub(crate) type PageResult = Result<HttpResponse, PageError>;

/// Runs a page that needs a signed-in user; without a session, the sign-in page.
pub(crate) async fn signed_in<F, Fut>(req: &HttpRequest, dash: &Dashboard, page: F) -> HttpResponse
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
    match page(viewer).await {
        Ok(response) => response,
        Err(e) => e.response(Some(&shown)),
    }
}

/// Checks a state-changing form: from this origin, with the session's CSRF token.
pub(crate) fn check_form(
    req: &HttpRequest,
    viewer: &Viewer,
    form: &HashMap<String, String>,
) -> Result<(), PageError> {
    same_origin(req)?;
    let presented = form.get("csrf").map(String::as_str).unwrap_or_default();
    if DashboardSessions::csrf_matches(&viewer.session, presented) {
        Ok(())
    } else {
        Err(PageError::Forbidden(
            "This form has expired or did not come from this dashboard. Reload the page and try again.",
        ))
    }
}

/// Only same-origin posts are taken (`../shared/API.md`, "Hardening rules"): an `Origin`
/// equal to this dashboard's, scheme included, or no `Origin` and
/// `Sec-Fetch-Site: same-origin`. `Origin: null` (a sandboxed frame, a redirect across
/// sites) and a post that says nothing of where it comes from are refused. The CSRF token
/// is the first defence; this is a second one, and the only one of the sign-in forms.
pub(crate) fn same_origin(req: &HttpRequest) -> Result<(), PageError> {
    const REFUSED: PageError = PageError::Forbidden("This form came from another site.");
    let headers = req.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(origin) = text(header::ORIGIN) else {
        return match text(header::HeaderName::from_static("sec-fetch-site")) {
            Some("same-origin") => Ok(()),
            _ => Err(REFUSED),
        };
    };
    let configured = req
        .app_data::<web::Data<Dashboard>>()
        .and_then(|dash| dash.public_origin.clone());
    let expected = match configured {
        Some(origin) => origin,
        None => match text(header::HOST) {
            Some(host) => format!("http://{host}").to_ascii_lowercase(),
            None => return Err(REFUSED),
        },
    };
    if origin.eq_ignore_ascii_case(&expected) {
        Ok(())
    } else {
        Err(REFUSED)
    }
}

/// The session cookie for a new session.
pub(crate) fn session_cookie(dash: &Dashboard, token: String) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, token)
        .path("/dashboard")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(dash.secure_cookies)
        .max_age(actix_web::cookie::time::Duration::seconds(
            usage_auth::session::SESSION_TTL.whole_seconds(),
        ))
        .finish()
}

/// A 303 to `to` (after a form).
pub(crate) fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to))
        .finish()
}

/// Query parameters, or the page naming what is wrong with them.
pub(crate) fn query(req: &HttpRequest) -> Result<HashMap<String, String>, PageError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| {
            PageError::BadRequest(format!("The address's parameters could not be read: {e}"))
        })
}

/// The id in a path, or not found.
pub(crate) fn user_id(raw: &str) -> Result<UserId, PageError> {
    UserId::parse(raw).map_err(|_| PageError::NotFound)
}

const CSS: &str = include_str!("../assets/dashboard.css");
const JS: &str = include_str!("../assets/dashboard.js");
const ICON: &str = include_str!("../assets/icon.svg");

async fn asset(path: web::Path<String>) -> HttpResponse {
    let (body, content_type) = match path.as_str() {
        "dashboard.css" => (CSS, "text/css; charset=utf-8"),
        "dashboard.js" => (JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return HttpResponse::NotFound().finish(),
    };
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        ))
        .body(body)
}
