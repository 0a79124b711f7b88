//! Hostile requests against every route: malformed and oversized bodies, wrong content
//! types, absurd parameters, header floods, bytes that are not UTF-8 in the path, every
//! credential failure. Each must get a JSON 4xx (never a 5xx), and the server must still
//! answer afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backend, Db, SECRET};
use serde_json::Value;
use time::OffsetDateTime;
use usage_auth::jwt::{JwtConfig, JwtKeys};
use usage_core::UserId;

/// Sends raw bytes and returns the status code and body of the answer.
fn raw(base: &str, request: &[u8]) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Offers a `bytes`-long body (declared, then streamed until the server stops reading)
/// and returns the status of the answer, 0 when the server just closed the connection.
fn oversized_body(base: &str, method: &str, path: &str, auth: &str, bytes: usize) -> u16 {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {bytes}\r\nConnection: close\r\n"
    );
    if !auth.is_empty() {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'['; 64 << 10];
    let mut sent = 0;
    // Refused early, the connection is closed or stops being read: writing then fails or
    // times out, both fine.
    while sent < bytes && stream.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn hostile_requests_get_json_4xx(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let admin = UserId::parse(&user).unwrap();
    let server = db.start(&[
        ("CRON_SECRET", "cron-secret-cron-secret-cron-secret"),
        (
            "STRIPE_WEBHOOK_SECRET",
            "whsec-secret-whsec-secret-whsec-secret",
        ),
        ("ADMIN_ECO_IDS", user.as_str()),
        ("ADMIN_RATE_LIMIT_BURST", "10000"),
        ("ADMIN_RATE_LIMIT_PER_SEC", "10000"),
    ]);
    let token = JwtKeys::new(&JwtConfig {
        secret: SECRET.as_bytes().to_vec(),
        audience: "authenticated".to_owned(),
        issuer: None,
    })
    .unwrap()
    .mint(&admin, 600, OffsetDateTime::now_utc())
    .unwrap();
    let client = reqwest::Client::new();
    let huge = "9".repeat(5_000);
    let mut checked = 0;
    let mut expect_4xx = async |req: reqwest::RequestBuilder, what: &str| {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        assert!((400..500).contains(&status), "{what}: {status} {body}");
        let json: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
        assert!(
            json["error"].is_string() && json["message"].is_string(),
            "{what}: {json}"
        );
        checked += 1;
    };

    // Parameters: not numbers, negative, huge, repeated, empty, control characters.
    for path in ["/api/usage/history", "/api/usage/endpoints"] {
        for q in [
            "days=abc",
            "days=-1",
            "days=0",
            &format!("days={huge}"),
            "days=1e3",
            "days=%00",
            "days=",
            "days=%ZZ",
        ] {
            expect_4xx(
                client
                    .get(server.url(&format!("{path}?{q}")))
                    .bearer_auth(&token),
                &format!("{path}?{q}"),
            )
            .await;
        }
    }
    for q in [
        "page=-5",
        &format!("page={huge}"),
        "limit=1000000",
        "sort=%00",
        "order=%27",
        "plan=PRO",
        &format!("q={}", "x".repeat(500)),
        "unknown=1",
        "page=%FF",
    ] {
        expect_4xx(
            client
                .get(server.url(&format!("/api/admin/analytics/users?{q}")))
                .bearer_auth(&token),
            q,
        )
        .await;
    }
    for q in ["date=2026-13-01", &format!("date={huge}"), "date=%00"] {
        expect_4xx(
            client
                .post(server.url(&format!("/api/cron/aggregate-daily?{q}")))
                .bearer_auth("cron-secret-cron-secret-cron-secret"),
            q,
        )
        .await;
    }
    expect_4xx(
        client
            .post(server.url("/api/cron/process-overage?dry_run=%FF%FE"))
            .bearer_auth("cron-secret-cron-secret-cron-secret"),
        "dry_run bytes",
    )
    .await;

    // Bodies: oversized, malformed, wrong type, unknown fields, wrong content type.
    let keys = server.url("/api/keys");
    for (body, content_type, what) in [
        ("x".repeat(100_000), "application/json", "oversized"),
        (
            "{\"name\":".to_owned(),
            "application/json",
            "truncated JSON",
        ),
        ("[1,2,3]".to_owned(), "application/json", "array"),
        ("{\"name\": 5}".to_owned(), "application/json", "wrong type"),
        (
            "{\"name\": \"a\", \"admin\": true}".to_owned(),
            "application/json",
            "unknown field",
        ),
        (
            "name=ci".to_owned(),
            "application/x-www-form-urlencoded",
            "form",
        ),
        ("{\"name\": \"ci\"}".to_owned(), "text/plain", "text/plain"),
        (
            format!("{{\"name\": \"{}\"}}", "n".repeat(3_000)),
            "application/json",
            "long name",
        ),
        (
            "{\"name\": \"\\u0000\"}".to_owned(),
            "application/json",
            "NUL name",
        ),
    ] {
        expect_4xx(
            client
                .post(&keys)
                .bearer_auth(&token)
                .header("content-type", content_type)
                .body(body),
            what,
        )
        .await;
    }
    expect_4xx(
        client
            .delete(server.url(&format!("/api/keys/{}", "k".repeat(2_000))))
            .bearer_auth(&token),
        "long key id",
    )
    .await;
    expect_4xx(
        client
            .post(server.url("/api/keys/eco_key_nope/rotate"))
            .bearer_auth(&token),
        "unknown key",
    )
    .await;

    // Stripe's webhook: signatures of every wrong shape, a body too large; an admin's
    // user changes that make no sense.
    let webhook = server.url("/api/webhooks/stripe");
    for signature in [
        "",
        "t=1",
        "v1=00",
        "t=-99999999999999999999,v1=00",
        &format!("t=1,v1={}", "f".repeat(10_000)),
        "t=1,v1=zz",
        ",,,,=,=,",
    ] {
        expect_4xx(
            client
                .post(&webhook)
                .header("Stripe-Signature", signature)
                .body(r#"{"id": "evt_1", "type": "customer.subscription.updated"}"#),
            &format!("webhook signed {signature:.20}"),
        )
        .await;
    }
    expect_4xx(
        client.post(&webhook).body(vec![b'{'; 2 << 20]),
        "webhook body of 2 MiB",
    )
    .await;
    let admin_user = server.url(&format!("/api/admin/users/{user}"));
    for body in [
        "",
        "null",
        r#"{"plan": null}"#,
        r#"{"plan": "pro", "plan": "gold"}"#,
        r#"{"stripe_customer_id": "cus_\u0000"}"#,
        &format!(r#"{{"stripe_customer_id": "cus_{}"}}"#, "a".repeat(300)),
    ] {
        expect_4xx(
            client
                .patch(&admin_user)
                .bearer_auth(&token)
                .body(body.to_owned()),
            &format!("admin patch {body:.30}"),
        )
        .await;
    }

    // Credentials: every failure, on every kind of route.
    for (path, method) in [
        ("/api/v1/ping", "GET"),
        ("/api/usage/current", "GET"),
        ("/api/usage/charges", "GET"),
        ("/api/keys", "POST"),
        ("/api/admin/analytics/overview", "GET"),
        ("/api/admin/users/eco_usr_x", "PATCH"),
        ("/api/cron/process-overage", "POST"),
    ] {
        for auth in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Bearer a.b.c",
            &format!("Bearer {}", "A".repeat(6_000)),
            "Bearer eco_live_",
            &format!("Bearer {key}x"),
        ] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut req = client.request(method, server.url(path));
            if !auth.is_empty() {
                req = req.header("authorization", auth);
            }
            expect_4xx(req, &format!("{path} with {:.20}", auth)).await;
        }
    }
    assert_eq!(checked, 110, "every hostile request above was checked");

    // Raw HTTP: bytes that are not UTF-8 in the path, a flood of headers, a huge header.
    let base = server.base.clone();
    let (status, _) = raw(
        &base,
        b"GET /api/usage/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!((400..500).contains(&status), "non-UTF-8 path: {status}");
    let mut flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..500 {
        flood.extend_from_slice(format!("X-Flood-{i}: {}\r\n", "v".repeat(50)).as_bytes());
    }
    flood.extend_from_slice(b"\r\n");
    let (status, _) = raw(&base, &flood);
    assert!(
        (400..500).contains(&status) || status == 0,
        "header flood: {status}"
    );
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(200_000)
    );
    let (status, _) = raw(&base, big.as_bytes());
    assert!(
        (400..500).contains(&status) || status == 0,
        "huge header: {status}"
    );
    let (status, _) = raw(&base, b"NOT-HTTP\r\n\r\n");
    assert!(
        status == 0 || (400..500).contains(&status),
        "garbage: {status}"
    );

    // Bodies far over every limit, sent together: refused as they arrive, never held.
    // Ten connections offer 32 MiB each; the server's peak memory may not grow by a tenth
    // of what was offered.
    let before = server.peak_rss_kib();
    let floods: Vec<_> = [
        ("POST", "/api/keys", format!("Bearer {token}")),
        ("POST", "/api/keys", format!("Bearer {token}")),
        ("POST", "/api/keys", String::new()),
        ("GET", "/api/v1/ping", format!("Bearer {key}")),
        (
            "POST",
            "/api/cron/process-overage?dry_run=true",
            "Bearer cron-secret-cron-secret-cron-secret".to_owned(),
        ),
    ]
    .into_iter()
    .flat_map(|route| [route.clone(), route])
    .map(|(method, path, auth)| {
        let base = base.clone();
        let what = format!("{method} {path} with {auth:.12}");
        (
            what,
            std::thread::spawn(move || oversized_body(&base, method, path, &auth, 32 << 20)),
        )
    })
    .collect::<Vec<_>>();
    for (what, flood) in floods {
        let status = flood.join().unwrap();
        assert!(
            status == 0 || status < 500,
            "oversized body to {what}: {status}"
        );
    }
    let grown_mib = server.peak_rss_kib().saturating_sub(before) / 1024;
    report!("{backend:?}: peak memory grew by {grown_mib} MiB for 320 MiB of bodies offered");
    assert!(
        grown_mib < 32,
        "bodies were held in memory: +{grown_mib} MiB"
    );

    // Still serving, and nothing was a server error.
    assert_eq!(server.ping(&key).await.status(), 200);
    let (exit, log) = server.stop();
    assert!(exit.success());
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:?}");
}

on_both_backends!(hostile_requests_get_json_4xx);
