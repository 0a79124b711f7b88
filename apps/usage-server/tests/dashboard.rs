//! The dashboard in a real headless Chromium (Debian's `chromium`, driven through
//! `chromedriver` by WebDriver), against the real server on both backends: sign in with a
//! one-time link, the usage page's numbers against `GET /api/usage/current`, a key created
//! in the page and used, then revoked in the page and refused; an admin changes a user's
//! plan in the page and the user's next call has the new plan's quota; a non-admin typing
//! admin URLs sees nothing; a visitor without a session sees the sign-in page; on
//! PostgreSQL, the database down gives a friendly 503 page.
//!
//! With `DASHBOARD_SCREENSHOTS=<dir>`, every page is saved there as PNG (`just
//! screenshots` regenerates docs/screenshots/ this way).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, Db, TempDir, eventually};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(the_dashboard_in_a_real_browser);

/// chromedriver and a Chromium session on a fresh profile.
struct Browser {
    driver: Child,
    client: Client,
    profile: TempDir,
    shots: Option<PathBuf>,
}

impl Browser {
    async fn start() -> Self {
        let chromedriver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("chromedriver not found: .ci/run installs chromium and chromium-driver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = TempDir::new("chromium");
        // Offline: nothing but the pages under test (no background networking, no
        // component updates), as root in a container (no sandbox).
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic",
                    format!("--user-data-dir={}", profile.0.display()),
                    "--window-size=1280,900",
                ]
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let mut client = None;
        for _ in 0..50 {
            match ClientBuilder::native()
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Self {
            driver,
            client: client.expect("no Chromium session"),
            profile,
            shots: std::env::var_os("DASHBOARD_SCREENSHOTS").map(PathBuf::from),
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap(),
            Err(e) => {
                let page = self.client.source().await.unwrap_or_default();
                panic!("{css}: {e}\n{page}")
            }
        }
    }

    async fn value_of(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .attr("data-value")
            .await
            .unwrap()
            .unwrap()
    }

    /// Clicks a link or a form's button and waits for the next page: until the current
    /// document is gone (its root element stale) and the new one has loaded.
    async fn click(&self, css: &str) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
        let started = Instant::now();
        while old.tag_name().await.is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{css}: no new page after the click"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            let state = self
                .client
                .execute("return document.readyState", vec![])
                .await;
            if matches!(state, Ok(Value::String(s)) if s == "complete") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{css}: page never loaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn body(&self) -> String {
        self.text("body").await
    }

    async fn title(&self) -> String {
        self.text("h1").await
    }

    /// Saves the page as `<name>.png` when screenshots are asked for.
    async fn shot(&self, name: &str) {
        if let Some(dir) = &self.shots {
            std::fs::create_dir_all(dir).unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Chromium outlives chromedriver when a test fails before closing the session:
        // every one of its processes names this test's own profile directory.
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(self.profile.0.display().to_string())
            .status();
    }
}

async fn the_dashboard_in_a_real_browser(backend: Backend) {
    let db = Db::new(backend);
    let (admin, _) = db.user_with_key("admin@example.com", "enterprise");
    let (user, key) = db.user_with_key("customer@example.com", "free");
    let server = db.start(&[
        ("ADMIN_ECO_IDS", admin.as_str()),
        ("FREE_MONTHLY_CALLS", "50"),
        ("PRO_MONTHLY_CALLS", "5000"),
        ("KEY_REVOCATION_POLL_MS", "100"),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
    ]);
    let base = server.base.clone();
    let public = |who: &str| {
        let out = db.cli(
            &[("PUBLIC_URL", base.as_str())],
            &["login-link", "--user", who],
        );
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let http = reqwest::Client::new();
    let ping = async |key: &str| {
        http.get(format!("{base}/api/v1/ping"))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap()
    };
    for _ in 0..7 {
        assert_eq!(ping(&key).await.status(), StatusCode::OK);
    }
    server.wait_flushed(7).await;

    let browser = Browser::start().await;

    // A visitor without a session: the sign-in page, never data, whatever the URL.
    for path in ["/dashboard", "/dashboard/keys", "/dashboard/admin/users"] {
        browser.goto(&format!("{base}{path}")).await;
        assert_eq!(browser.title().await, "Sign in", "{path}");
        assert!(!browser.body().await.contains("customer@example.com"));
    }
    browser.goto(&base).await; // `/` leads to the dashboard
    assert_eq!(browser.title().await, "Sign in");
    browser.shot("sign-in").await;

    // Sign in with a one-time link (printed with PUBLIC_URL), once.
    let url = public(&user);
    assert!(
        url.starts_with(&format!("{base}/dashboard/login?token=")),
        "{url}"
    );
    // A mail scanner following the link first uses nothing up.
    let scanned = http.get(&url).send().await.unwrap();
    assert_eq!(scanned.status(), StatusCode::OK);
    browser.goto(&url).await;
    assert_eq!(browser.title().await, "Sign in");
    browser.click("#sign-in").await;
    assert_eq!(browser.title().await, "Usage");
    assert!(
        browser
            .text("#signed-in-as")
            .await
            .contains("customer@example.com")
    );

    // The usage page says what GET /api/usage/current says.
    let token = db.create(&["token", "--user", &user]);
    let current: Value = http
        .get(format!("{base}/api/usage/current"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (css, field) in [
        ("#api-calls", "api_calls"),
        ("#limit", "limit"),
        ("#remaining", "remaining"),
        ("#overage-calls", "overage_calls"),
        ("#overage-cost", "overage_cost_cents"),
    ] {
        assert_eq!(
            browser.value_of(css).await,
            current[field].to_string(),
            "{css} vs {field}: {current}"
        );
    }
    assert_eq!(current["api_calls"], 7);
    assert!(
        browser
            .text("#endpoint-table")
            .await
            .contains("/api/v1/ping")
    );
    browser.shot("usage").await;
    browser.goto(&format!("{base}/dashboard?days=7")).await;
    assert!(browser.body().await.contains("last 7 days"));

    // Create a key in the page, read it from the page, use it.
    browser.goto(&format!("{base}/dashboard/keys")).await;
    browser.fill("#name", "from-the-browser").await;
    browser.click("form[action='/dashboard/keys'] button").await;
    let new_key = browser.text("#new-key").await;
    assert!(new_key.starts_with("eco_live_"), "{new_key}");
    browser.shot("keys-new").await;
    let res = ping(&new_key).await;
    assert_eq!(res.status(), StatusCode::OK);
    // Reloading does not show it again.
    browser.goto(&format!("{base}/dashboard/keys")).await;
    assert!(!browser.body().await.contains(&new_key));

    // Revoke it in the page (with its confirmation): refused at once after.
    browser
        .click("a[aria-label='Revoke from-the-browser']")
        .await;
    assert_eq!(browser.title().await, "Revoke this key?");
    browser.shot("keys-revoke").await;
    browser.click("main form button.danger").await;
    assert_eq!(browser.title().await, "API keys");
    assert!(browser.body().await.contains("revoked"));
    eventually(
        "the revoked key is refused",
        Duration::from_secs(5),
        async || ping(&new_key).await.status() == StatusCode::UNAUTHORIZED,
    )
    .await;

    browser.goto(&format!("{base}/dashboard/billing")).await;
    assert_eq!(browser.text("#plan-name").await, "free");
    assert!(browser.body().await.contains("No overage charges yet."));
    browser.shot("billing").await;

    // A non-admin typing admin URLs sees nothing of them.
    for path in [
        "/dashboard/admin".to_owned(),
        "/dashboard/admin/users".to_owned(),
        format!("/dashboard/admin/users/{admin}"),
        "/dashboard/admin/audit".to_owned(),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        assert_eq!(browser.title().await, "Not found", "{path}");
        let body = browser.body().await;
        assert!(
            !body.contains("admin@example.com") && !body.contains("MRR"),
            "{path}"
        );
    }
    // A forged form (no CSRF token) changes nothing: the customer tries to make
    // themselves enterprise through the admin form's address.
    let forged = http
        .post(format!("{base}/dashboard/admin/users/{user}/plan"))
        .header("Cookie", session_cookie(&browser).await)
        .header("Origin", &base)
        .form(&[("plan", "enterprise")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::NOT_FOUND);

    // Sign out: the session ends; the link does not sign in twice.
    browser
        .click("form[action='/dashboard/logout'] button")
        .await;
    assert_eq!(browser.title().await, "Sign in");
    browser.goto(&url).await;
    browser.click("#sign-in").await;
    assert_eq!(browser.title().await, "Sign in");
    assert!(browser.body().await.contains("already used"));

    // The admin changes the user's plan in the page; the user's next call has the pro
    // quota.
    browser.goto(&public(&admin)).await;
    browser.click("#sign-in").await;
    assert_eq!(browser.title().await, "Usage");
    // Even an admin's form, from this origin, is refused without its CSRF token.
    let forged = http
        .post(format!("{base}/dashboard/admin/users/{user}/plan"))
        .header("Cookie", session_cookie(&browser).await)
        .header("Origin", &base)
        .form(&[("plan", "enterprise")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    browser.goto(&format!("{base}/dashboard/admin")).await;
    assert_eq!(browser.title().await, "Admin overview");
    assert_eq!(browser.value_of("#users-total").await, "2");
    browser.shot("admin-overview").await;
    browser.goto(&format!("{base}/dashboard/admin/users")).await;
    browser.fill("#q", "customer@").await;
    browser.click("form.filters button").await;
    assert!(browser.text("#users-count").await.starts_with("1 users"));
    browser.shot("admin-users").await;
    browser
        .click("#user-table a[href^='/dashboard/admin/users/']")
        .await;
    assert_eq!(browser.text("#user-id").await, user);
    assert_eq!(browser.value_of("#user-calls").await, "8");
    let plan = browser
        .client
        .find(Locator::Css("#new-plan"))
        .await
        .unwrap();
    plan.select_by_value("pro").await.unwrap();
    browser.click("form[action$='/plan'] button").await;
    assert_eq!(browser.text("#user-plan").await, "pro");
    browser.shot("admin-user").await;
    let res = ping(&key).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["x-ratelimit-limit"].to_str().unwrap(),
        "5000",
        "the next call follows the new plan"
    );
    // The plan catalog: the new-plan form's own example (the contract's `growth`), then
    // its quote as a preview: 750,010 overage calls, 600,005,000 µ$ = $600.01.
    browser.goto(&format!("{base}/dashboard/admin/plans")).await;
    assert_eq!(browser.title().await, "Plans");
    assert!(browser.text("#plan-table").await.contains("Pro"));
    browser
        .click("form[action='/dashboard/admin/plans'] button")
        .await;
    assert_eq!(browser.text("#plan-key").await, "growth");
    browser.fill("#calls", "1000010").await;
    browser
        .click("form[method='get'][action='/dashboard/admin/plans/growth'] button")
        .await;
    assert_eq!(browser.text("#quote-overage").await, "$600.01");
    browser.shot("admin-plan").await;
    browser.goto(&format!("{base}/dashboard/admin/audit")).await;
    let audit = browser.text("#audit-table").await;
    assert!(audit.contains("plan=pro"), "{audit}");
    browser.shot("admin-audit").await;

    // Readable on a phone: the same page at 390 px wide has no horizontal scrolling.
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.goto(&format!("{base}/dashboard")).await;
    let overflow: Value = browser
        .client
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        overflow,
        json!(false),
        "the usage page scrolls sideways on a phone"
    );
    browser.shot("usage-phone").await;
    browser.client.set_window_size(1280, 900).await.unwrap();

    // The database down: a friendly page, not an error dump.
    if let Some(pg) = &db.pg {
        let name = pg.name();
        pg.server()
            .psql(&format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
            ))
            .unwrap();
        browser.goto(&format!("{base}/dashboard")).await;
        assert_eq!(browser.title().await, "Temporarily unavailable");
        assert!(!browser.body().await.to_lowercase().contains("sql"));
        pg.server()
            .psql(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
            .unwrap();
    }

    browser.client.clone().close().await.unwrap();
    let (status, _) = server.stop();
    assert!(status.success());
}

/// The browser's session cookie, for requests made outside it.
async fn session_cookie(browser: &Browser) -> String {
    let cookie = browser
        .client
        .get_named_cookie("usage_session")
        .await
        .unwrap();
    format!("usage_session={}", cookie.value())
}
