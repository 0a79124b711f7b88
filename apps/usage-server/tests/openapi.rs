//! The API description served by the binary, and the fixes Schemathesis found (each
//! pinned here): `GET /api/openapi.json`, the offline Swagger UI under `/api/docs`, `Allow`
//! on every 405, and a rotation body of `null`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, Db};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_and_the_docs_are_served_offline() {
    let db = Db::new(Backend::Sqlite);
    let server = db.start(&[]);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = client
        .get(server.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc["paths"]["/api/usage/events"]["get"].is_object());
    assert!(doc["paths"]["/api/webhooks/stripe"]["post"].is_object());

    let res = client.get(server.url("/api/docs")).send().await.unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()["Location"], "/api/docs/");
    let page = client.get(server.url("/api/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // The UI's files come from the binary, and the UI is pointed at our document.
    for asset in ["/api/docs/swagger-ui.css", "/api/docs/swagger-ui-bundle.js"] {
        let res = client.get(server.url(asset)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{asset}");
        assert!(res.bytes().await.unwrap().len() > 1_000, "{asset}");
    }
    let init = client
        .get(server.url("/api/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/api/openapi.json"), "{init}");
}

/// Schemathesis: a 405 without `Allow` breaks RFC 9110. Every resource lists its methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_405_says_which_methods_are_allowed() {
    let db = Db::new(Backend::Sqlite);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let server = db.start(&[
        ("ADMIN_ECO_IDS", user.as_str()),
        ("CRON_SECRET", "cron-secret-cron-secret-cron-secret"),
        (
            "STRIPE_WEBHOOK_SECRET",
            "whsec-secret-whsec-secret-whsec-secret",
        ),
    ]);
    let token = db.create(&["token", "--user", &user]);
    let client = reqwest::Client::new();
    for (method, path, allow) in [
        ("TRACE", "/api/usage/current", "GET"),
        ("DELETE", "/api/usage/events", "GET"),
        ("PUT", "/api/keys", "GET, POST"),
        ("GET", "/api/keys/eco_key_x", "DELETE"),
        ("POST", "/api/admin/users/eco_usr_x", "GET, PATCH"),
        ("TRACE", "/api/admin/audit", "GET"),
        ("GET", "/api/cron/process-overage", "POST"),
        ("GET", "/api/webhooks/stripe", "POST"),
        ("POST", "/healthz", "GET"),
        ("POST", "/api/openapi.json", "GET"),
        ("POST", "/api/v1/ping", "GET"),
    ] {
        let res = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                server.url(path),
            )
            // The metered scope checks the API key before the route.
            .bearer_auth(if path.starts_with("/api/v1/") {
                &key
            } else {
                &token
            })
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_eq!(res.headers()["Allow"], allow, "{method} {path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "method_not_allowed", "{method} {path}");
    }
}

/// Schemathesis: the rotation body is optional, so `null` is no body (grace 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_rotation_body_is_no_body() {
    let db = Db::new(Backend::Sqlite);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let server = db.start(&[]);
    let token = db.create(&["token", "--user", &user]);
    let client = reqwest::Client::new();
    let keys: Value = client
        .get(server.url("/api/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = keys["items"][0]["id"].as_str().unwrap().to_owned();
    let res = client
        .post(server.url(&format!("/api/keys/{id}/rotate")))
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(server.ping(&key).await.status(), 401, "retired at once");
}
