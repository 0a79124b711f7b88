//! `serve` on both backends: health and readiness, JSON errors, clean stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, Db, Server};

async fn check_operations(server: &Server, backend: &str) {
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).send();

    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["database"], backend);

    let missing = get("/no/such/route").await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].is_string());

    let wrong_method = client.delete(server.url("/healthz")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");

    let metrics = get("/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for name in [
        "usage_requests_total{outcome=\"admitted\"} 0",
        "usage_quota_rejections_total 0",
        "usage_tracker_queue_depth 0",
        "usage_tracker_events_flushed_total 0",
        "usage_tracker_flush_failures_total 0",
        "usage_tracker_flush_duration_seconds_count 0",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_sqlite_and_stops_on_sigterm() {
    // The default database: no DATABASE_URL at all.
    let db = Db::sqlite_default();
    let server = db.start(&[]);
    check_operations(&server, "sqlite").await;
    let (status, log) = server.stop();
    assert!(status.success(), "clean exit on SIGTERM: {log:?}");
    assert!(
        log.iter()
            .any(|l| l.contains("0 event(s) written at shutdown")),
        "{log:?}"
    );
    assert!(db.dir.0.join("data/usage.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_postgres_and_reports_an_unready_database() {
    let db = Db::new(Backend::Postgres);
    let server = db.start(&[]);
    check_operations(&server, "postgres").await;

    // Take the database away under the running server: ready turns to 503, health stays.
    let pg = db.pg.as_ref().unwrap();
    pg.server()
        .psql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", pg.name()))
        .unwrap();
    let client = reqwest::Client::new();
    let ready = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().contains_key("retry-after"));
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["error"], "database_unavailable");
    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(server.stop().0.success());
}
