//! Clients that send a body slowly, or never: each body-reading route answers 408 and
//! closes the connection once `REQUEST_BODY_TIMEOUT_SECS` has passed, and a flood of such
//! connections under a small open-file limit leaves health and metering answering
//! (`../shared/API.md`, "Hardening rules").
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backend, Db, Server, eventually};

const WEBHOOK_SECRET: &str = "whsec_test_0123456789abcdef0123456789abcdef";

fn addr(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Opens a connection and sends `head` (request line and headers, announcing 1,000
/// bytes of body) and two bytes of the body, then nothing more.
fn slow_request(addr: &str, head: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Length: 1000\r\n\r\nab"
    )
    .unwrap();
    stream
}

/// Everything the server sends until it closes the connection (bounded).
fn read_until_closed(mut stream: TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_body_gets_408_and_the_connection_closes() {
    let db = Db::new(Backend::Sqlite);
    let (user, _) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &user]);
    let server = db.start(&[
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("REQUEST_BODY_TIMEOUT_SECS", "2"),
    ]);
    let addr = addr(&server);
    let origin = server.base.clone();
    let heads = [
        "POST /api/webhooks/stripe HTTP/1.1\r\nContent-Type: application/json".to_owned(),
        format!(
            "POST /api/keys HTTP/1.1\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}"
        ),
        format!(
            "POST /api/keys/eco_key_x/rotate HTTP/1.1\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}"
        ),
        format!(
            "POST /dashboard/session HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nOrigin: {origin}"
        ),
    ];
    let answers: Vec<String> = tokio::task::spawn_blocking(move || {
        let streams: Vec<TcpStream> = heads.iter().map(|h| slow_request(&addr, h)).collect();
        streams.into_iter().map(read_until_closed).collect()
    })
    .await
    .unwrap();
    for answer in answers {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
        assert!(answer.contains("REQUEST_BODY_TIMEOUT_SECS"), "{answer}");
    }
    // A body sent whole is read as before.
    let res = reqwest::Client::new()
        .post(server.url("/api/keys"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "fast"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let (status, _) = server.stop();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_slow_connections_leaves_health_and_metering_answering() {
    const OPEN_FILES: u32 = 256;
    const SLOW: usize = 300;
    let db = Db::new(Backend::Sqlite);
    let (_, key) = db.user_with_key("ada@example.com", "pro");
    let server = Server::start_with_file_limit(
        &db,
        &[
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
            ("REQUEST_BODY_TIMEOUT_SECS", "2"),
        ],
        OPEN_FILES,
    );
    let target = addr(&server);
    // More slow connections than the process may open files.
    let slow: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..SLOW)
            .map(|_| {
                slow_request(
                    &target,
                    "POST /api/webhooks/stripe HTTP/1.1\r\nContent-Type: application/json",
                )
            })
            .collect()
    })
    .await
    .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    eventually(
        "health answers through the flood",
        Duration::from_secs(60),
        async || {
            client
                .get(server.url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    eventually(
        "a metered call is admitted through the flood",
        Duration::from_secs(60),
        async || {
            client
                .get(server.url("/api/v1/ping"))
                .bearer_auth(&key)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    // Every slow connection was answered and closed, none kept.
    let timed_out = tokio::task::spawn_blocking(move || {
        slow.into_iter()
            .map(read_until_closed)
            .filter(|answer| answer.starts_with("HTTP/1.1 408"))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(timed_out, SLOW);
    let log = server.log().join("\n");
    assert!(log.contains("connection limit"), "{log}");
    let (status, _) = server.stop();
    assert!(status.success());
}
