//! Meters end to end on both backends, as a team billing an AI API would run them: a plan
//! limits `tokens` (block) and bills `credits` (graduated overage); the sample route costs
//! 10 credits; a script posts 10,000 credit events in batches of 1,000, half of them twice;
//! then every figure (current usage, history, the events list, the export, the dashboard,
//! the Stripe item) agrees to the unit, a replayed batch changes nothing, and the tokens
//! limit refuses the next call naming `tokens`.
//!
//! Handlers report tokens through both embedded doors on the same database: an actix-web
//! app behind `usage-embed`'s middleware and an axum router behind its tower layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Db, eventually, token};
use serde_json::{Value, json};
use usage_embed::{ReportUnits, UsageMeter, UsageOptions};
use usage_fake_stripe::{FakeStripe, SECRET as STRIPE_KEY};

const INGEST: &str = "ingest-secret-ingest-secret-0123456789";
const CRON: &str = "cron-secret-cron-secret-cron-secret-0123";

const CATALOG: &str = r#"
[[meters]]
key = "tokens"
name = "Tokens"
unit = "token"
aggregation = "sum"

[[meters]]
key = "credits"
name = "Credits"
unit = "credit"
aggregation = "sum"

[[plans]]
key = "ai"
name = "AI"
price_cents = 2900
currency = "usd"
public = true

[[plans.limits]]
meter = "tokens"
included = 100000
over_limit = "block"

[[plans.limits]]
meter = "credits"
included = 1000
over_limit = "overage"

[plans.limits.overage]
model = "graduated"
tiers = [
  { up_to = 2000, unit_price_micros = 1000 },
  { unit_price_micros = 500 },
]

[[costs]]
route = "GET /api/v1/ping"
meter = "credits"
quantity = 10
"#;

/// Calls made, each costing 10 credits.
const CALLS: u64 = 20;
/// Credit events, one credit each.
const EVENTS: u64 = 10_000;

async fn post_events(server: &common::Server, batch: &[Value]) -> Value {
    let res = reqwest::Client::new()
        .post(server.url("/api/events"))
        .bearer_auth(INGEST)
        .json(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

fn meter_line<'a>(current: &'a Value, meter: &str) -> &'a Value {
    current["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == meter)
        .unwrap()
}

/// An axum router behind `usage-embed`'s tower layer on `url`, whose `POST /v1/generate`
/// reports 1,000 tokens; its base URL, and the task ending with the meter's shutdown.
async fn start_axum(
    url: &str,
) -> (
    String,
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    async fn generate() -> axum::response::Response {
        use axum::response::IntoResponse;
        "generated".into_response().report("tokens", 1_000)
    }
    let usage = UsageMeter::start(url, UsageOptions::default())
        .await
        .unwrap();
    let app = axum::Router::new()
        .route("/v1/generate", axum::routing::post(generate))
        .layer(usage.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        usage.shutdown().await;
    });
    (base, task, stop)
}

/// An actix-web app behind `usage-embed`'s middleware on `url`, in its own thread and
/// runtime, whose `POST /v1/generate` reports 2,000 tokens; its base URL, the thread
/// (ending with the meter's shutdown) and the server's handle.
fn start_actix(
    url: &str,
) -> (
    String,
    std::thread::JoinHandle<()>,
    actix_web::dev::ServerHandle,
) {
    async fn generate() -> actix_web::HttpResponse {
        actix_web::HttpResponse::Ok()
            .body("generated")
            .report("tokens", 2_000)
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let url = url.to_owned();
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let usage = UsageMeter::start(&url, UsageOptions::default())
                .await
                .unwrap();
            let metering = usage.actix();
            let server = actix_web::HttpServer::new(move || {
                actix_web::App::new()
                    .wrap(metering.clone())
                    .route("/v1/generate", actix_web::web::post().to(generate))
            })
            .workers(1)
            .listen(listener)
            .unwrap()
            .run();
            handle_tx.send(server.handle()).unwrap();
            server.await.unwrap();
            usage.shutdown().await;
        });
    });
    (base, thread, handle_rx.recv().unwrap())
}

async fn every_figure_agrees_to_the_unit(backend: Backend) {
    let db = Db::new(backend);
    let catalog = db.dir.0.join("catalog.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    db.create(&["plans", "apply", catalog.to_str().unwrap()]);
    let ada = db.create(&[
        "users",
        "create",
        "--email",
        "ada@example.com",
        "--plan",
        "ai",
        "--stripe-customer-id",
        "cus_ada",
    ]);
    let key = db.create(&["keys", "create", "--user", &ada]);
    let stripe = FakeStripe::start().await;
    let stripe_base = stripe.uri();
    let server = db.start(&[
        ("INGEST_SECRET", INGEST),
        ("CRON_SECRET", CRON),
        ("STRIPE_SECRET_KEY", STRIPE_KEY),
        ("STRIPE_API_BASE", stripe_base.as_str()),
        ("QUOTA_SYNC_MS", "100"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
        // Ada runs the business too: she reads the overview.
        ("ADMIN_ECO_IDS", ada.as_str()),
    ]);

    for _ in 0..CALLS {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    // Handlers of the same API in two frameworks report the tokens they used.
    let (axum_base, axum_task, axum_stop) = start_axum(&db.url).await;
    let (actix_base, actix_thread, actix_server) = start_actix(&db.url);
    for base in [&axum_base, &actix_base] {
        let res = reqwest::Client::new()
            .post(format!("{base}/v1/generate"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{base}");
        assert!(
            res.headers()["ratelimit-policy"]
                .to_str()
                .unwrap()
                .contains(r#""tokens";q=100000"#)
        );
    }
    let _ = axum_stop.send(());
    axum_task.await.unwrap();
    actix_server.stop(true).await;
    actix_thread.join().unwrap();
    let reported_tokens = 3_000;
    // 10 batches of 1,000 events, then the first 5 again: half of them twice.
    let batches: Vec<Vec<Value>> = (0..10)
        .map(|b| {
            (0..1_000)
                .map(|i| {
                    json!({"specversion": "1.0", "id": format!("credit-{b}-{i}"),
                           "source": "billing-script", "type": "credits", "subject": ada,
                           "data": {"quantity": 1}})
                })
                .collect()
        })
        .collect();
    for batch in &batches {
        let answer = post_events(&server, batch).await;
        assert_eq!(
            (answer["accepted"].clone(), answer["duplicates"].clone()),
            (json!(1000), json!(0))
        );
    }
    for batch in &batches[..5] {
        let answer = post_events(&server, batch).await;
        assert_eq!(
            (answer["accepted"].clone(), answer["duplicates"].clone()),
            (json!(0), json!(1000))
        );
    }
    let credits = CALLS * 10 + EVENTS;

    // Current usage, once the calls are stored.
    let mut current = Value::Null;
    eventually("the calls stored", Duration::from_secs(10), async || {
        current = server.get_json("/api/usage/current", &token(&ada)).await;
        meter_line(&current, "credits")["used"] == credits
    })
    .await;
    assert_eq!(
        meter_line(&current, "tokens")["used"],
        reported_tokens,
        "{current}"
    );
    let line = meter_line(&current, "credits");
    // 10,200 credits: 9,200 past the 1,000 included; 2,000 at 0.1 ¢ = 200 ¢, 7,200 at
    // 0.05 ¢ = 360 ¢.
    assert_eq!(line["overage_units"], 9_200, "{line}");
    assert_eq!(line["overage_cost_cents"], 560, "{line}");

    // History: today's quantity is the period's.
    let history = server
        .get_json("/api/usage/history?meter=credits&days=2", &token(&ada))
        .await;
    let days = history["items"].as_array().unwrap();
    let summed: u64 = days.iter().map(|d| d["quantity"].as_u64().unwrap()).sum();
    assert_eq!(summed, credits, "{history}");

    // The events list: every call with its 10 credits, every event once.
    let (mut calls, mut events, mut units, mut tokens) = (0u64, 0u64, 0u64, 0u64);
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/usage/events?limit=1000".to_owned(),
            Some(c) => format!("/api/usage/events?limit=1000&cursor={c}"),
        };
        let page = server.get_json(&path, &token(&ada)).await;
        for item in page["items"].as_array().unwrap() {
            match item["kind"].as_str().unwrap() {
                "call" => {
                    calls += 1;
                    units += item["units"]["credits"].as_u64().unwrap_or(0);
                    tokens += item["units"]["tokens"].as_u64().unwrap_or(0);
                }
                "event" => {
                    events += 1;
                    units += item["quantity"].as_u64().unwrap();
                }
                other => panic!("kind {other}"),
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        (calls, events, units, tokens),
        (CALLS + 2, EVENTS, credits, reported_tokens)
    );

    // The dashboard's panel.
    let cookie = common::sign_in(&db, &server, &ada).await;
    let page = server.page("/dashboard", &cookie).await;
    assert!(page.contains("data-meter=\"credits\""), "{page}");
    assert!(
        page.contains(&format!("class=\"used\" data-value=\"{credits}\"")),
        "{page}"
    );

    // Billed: one item for the credits, of the amount shown, naming the meter.
    let run = reqwest::Client::new()
        .post(server.url("/api/cron/process-overage"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 200);
    let run: Value = run.json().await.unwrap();
    assert_eq!(
        (run["charged"].clone(), run["amount_cents"].clone()),
        (json!(1), json!(560)),
        "{run}"
    );
    let created = stripe.created();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].amount, 560);
    assert_eq!(created[0].form["metadata[meter]"], "credits");
    assert_eq!(created[0].form["metadata[quantity]"], "9200");

    // A replayed batch changes nothing, and nothing is billed twice.
    let answer = post_events(&server, &batches[9]).await;
    assert_eq!(answer["accepted"], 0);
    let again = reqwest::Client::new()
        .post(server.url("/api/cron/process-overage"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["amount_cents"], 0, "{again}");
    assert_eq!(stripe.created().len(), 1);
    let current = server.get_json("/api/usage/current", &token(&ada)).await;
    assert_eq!(meter_line(&current, "credits")["used"], credits);
    // The reconciliation and the overview count the same cents.
    let reconciliation = server
        .get_json("/api/cron/overage-reconciliation", CRON)
        .await;
    assert_eq!(reconciliation["drift"], 0, "{reconciliation}");
    let items = reconciliation["items"].as_array().unwrap();
    let line = items
        .iter()
        .find(|i| i["meter"] == "credits")
        .unwrap_or_else(|| panic!("{reconciliation}"));
    assert_eq!(
        (
            line["overage_calls"].clone(),
            line["charged_calls"].clone(),
            line["charged_cents"].clone(),
            line["expected_cents"].clone(),
            line["status"].clone()
        ),
        (
            json!(credits),
            json!(credits),
            json!(560),
            json!(560),
            json!("ok")
        ),
        "{reconciliation}"
    );
    let overview = server
        .get_json("/api/admin/analytics/overview", &token(&ada))
        .await;
    assert_eq!(overview["meter_revenue_cents"], 560, "{overview}");
    assert_eq!(overview["overage_revenue_cents"], 0, "{overview}");

    // 100,000 tokens reported by another service: the next call is refused naming them.
    let tokens: Vec<Value> = (0..4)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("gen-{i}"), "source": "inference",
                   "type": "tokens", "subject": ada, "data": {"quantity": 25_000}})
        })
        .collect();
    assert_eq!(post_events(&server, &tokens).await["accepted"], 4);
    // The counters are read again within a sync or two: calls until then are admitted
    // (and cost their credits).
    let mut refused = Value::Null;
    let mut admitted_before_refusal = 0;
    eventually("refused for tokens", Duration::from_secs(10), async || {
        let res = server.ping(&key).await;
        if res.status() == 429 {
            refused = res.json().await.unwrap();
            return true;
        }
        admitted_before_refusal += 1;
        false
    })
    .await;
    assert_eq!(refused["error"], "quota_exceeded");
    assert_eq!(refused["meter"], "tokens", "{refused}");

    let (status, _) = server.stop();
    assert!(status.success());

    // The export: the same calls and events.
    let out = db.cli(&[], &["export", "--user", &ada]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exported_events = lines.iter().filter(|l| l["kind"] == "event").count() as u64;
    let exported_credits: u64 = lines
        .iter()
        .map(|l| match l["kind"].as_str() {
            Some("event") if l["meter"] == "credits" => l["quantity"].as_u64().unwrap(),
            Some("call") => l["units"]["credits"].as_u64().unwrap_or(0),
            _ => 0,
        })
        .sum();
    assert_eq!(exported_events, EVENTS + 4);
    assert_eq!(exported_credits, credits + 10 * admitted_before_refusal);
}

on_both_backends!(every_figure_agrees_to_the_unit);
