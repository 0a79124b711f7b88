//! Every parameter that takes a time, over HTTP and on the command line, fed extreme
//! values (years 0000 and 9999 with offsets either way, leap seconds, nine-digit
//! fractions, huge and negative numbers): a 200 or a 400 naming the parameter, a CLI
//! error, never a 5xx, a dropped connection or a panic (`../shared/API.md`, "Hardening
//! rules"). Before this was fixed, `to=9999-12-31T23:59:59-00:01` panicked the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, Server};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

const CRON_SECRET: &str = "cron-secret-cron-secret-cron-secret";

/// An RFC 3339 time at the edges of what the format can say.
fn rfc3339() -> impl Strategy<Value = String> {
    let year = prop_oneof![
        Just(0u32),
        Just(1),
        Just(1969),
        Just(1970),
        Just(2026),
        Just(9998),
        Just(9999),
        0u32..=9999,
    ];
    let offset = prop_oneof![
        Just("Z".to_owned()),
        Just("-00:01".to_owned()),
        Just("+00:01".to_owned()),
        Just("+23:59".to_owned()),
        Just("-23:59".to_owned()),
        (any::<bool>(), 0u32..=23, 0u32..=59)
            .prop_map(|(plus, h, m)| format!("{}{h:02}:{m:02}", if plus { '+' } else { '-' })),
    ];
    let fraction = prop_oneof![
        Just(String::new()),
        Just(".999999999".to_owned()),
        (0u32..=999_999).prop_map(|f| format!(".{f:06}")),
    ];
    (
        year,
        prop_oneof![Just(1u32), Just(12), 1u32..=12],
        prop_oneof![Just(1u32), Just(31), 1u32..=31],
        prop_oneof![Just(0u32), Just(23), 0u32..=23],
        0u32..=59,
        prop_oneof![Just(59u32), Just(60), 0u32..=60],
        fraction,
        offset,
    )
        .prop_map(|(y, mo, d, h, mi, s, f, o)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{f}{o}")
        })
}

/// What is not a time at all, or only nearly one.
fn not_a_time() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("+10000-01-01T00:00:00Z".to_owned()),
        Just("-0001-12-31T23:59:59Z".to_owned()),
        Just("99999999999999999999999".to_owned()),
        Just("-9223372036854775808".to_owned()),
        Just("2026-13-01T00:00:00Z".to_owned()),
        Just("2026-11-01T24:00:00Z".to_owned()),
        Just("2026-11-01T00:00:00+24:00".to_owned()),
        Just(String::new()),
        "[0-9T:+Z.-]{0,40}".prop_map(|s: String| s),
    ]
}

/// A day, as `aggregate-daily` takes it.
fn day() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0000-01-01".to_owned()),
        Just("9999-12-31".to_owned()),
        Just("-0001-01-01".to_owned()),
        Just("+10000-01-01".to_owned()),
        (0u32..=9999, 1u32..=12, 1u32..=31).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
    ]
}

/// A cursor of the events API: unix nanoseconds and an event id.
fn cursor() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(i128::MAX),
        Just(i128::MIN),
        Just(0),
        any::<i64>().prop_map(i128::from)
    ]
    .prop_map(|nanos| format!("{nanos}.0190b7a0c4e07c3d8b2a9f6e5d4c3b2a"))
}

/// An integer parameter, from the plausible to the absurd.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("1e9".to_owned()),
        (0u64..=1000).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// One request and what a client may get: any 2xx or a 4xx with the error shape; a 400
/// names `param`.
async fn check(server: &Server, request: reqwest::RequestBuilder, param: &str, what: &str) {
    let res = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: no answer ({e}): {:?}", server.log()));
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert!(
        status.is_success() || status.is_client_error(),
        "{what}: {status} {body}"
    );
    if status == 400 {
        assert_eq!(body["error"], "invalid_parameter", "{what}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(param), "{what}: {body}");
    }
}

async fn every_time_parameter_over_http(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &user]);
    let server = db.start(&[
        ("CRON_SECRET", CRON_SECRET),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
    ]);
    assert_eq!(server.ping(&key).await.status(), 200);
    let client = reqwest::Client::new();
    let key_id = server.get_json("/api/keys", &token).await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The probe that panicked, and the edges of the range, with their exact answers.
    let events = |query: &str| {
        client
            .get(server.url(&format!("/api/usage/events?{query}")))
            .bearer_auth(&token)
    };
    for (query, expected) in [
        ("to=9999-12-31T23:59:59-00:01", 400),
        ("from=0000-01-01T00:00:00%2B00:01", 400),
        ("to=9999-12-31T23:59:59Z", 200),
        ("to=9999-12-31T23:59:59.999999999Z", 200),
        ("from=0000-01-01T00:00:00Z", 200),
        (
            "from=0000-01-01T00:00:00-00:01&to=0000-01-01T00:05:00Z",
            200,
        ),
        ("from=2016-12-31T23:59:00Z&to=2016-12-31T23:59:60Z", 200),
        ("to=%2B10000-01-01T00:00:00Z", 400),
    ] {
        let res = events(query).send().await.unwrap();
        assert_eq!(
            res.status(),
            expected,
            "{query}: {}",
            res.text().await.unwrap()
        );
    }

    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![rfc3339(), not_a_time()],
        prop_oneof![rfc3339(), not_a_time()],
        cursor(),
        day(),
        number(),
    );
    for _ in 0..48 {
        let (from, to, cursor, day, number) = strategy.new_tree(&mut runner).unwrap().current();
        let enc = |s: &str| s.replace('+', "%2B");
        check(
            &server,
            events(&format!("from={}", enc(&from))),
            "from",
            &from,
        )
        .await;
        check(&server, events(&format!("to={}", enc(&to))), "to", &to).await;
        check(
            &server,
            events(&format!("from={}&to={}", enc(&from), enc(&to))),
            "",
            &format!("{from} {to}"),
        )
        .await;
        check(
            &server,
            events(&format!("cursor={cursor}")),
            "cursor",
            &cursor,
        )
        .await;
        check(
            &server,
            client
                .post(server.url(&format!("/api/cron/aggregate-daily?date={}", enc(&day))))
                .bearer_auth(CRON_SECRET),
            "date",
            &day,
        )
        .await;
        for path in ["/api/usage/history", "/api/usage/endpoints"] {
            check(
                &server,
                client
                    .get(server.url(&format!("{path}?days={number}")))
                    .bearer_auth(&token),
                "days",
                &format!("{path} {number}"),
            )
            .await;
        }
        check(
            &server,
            events(&format!("limit={number}")),
            "limit",
            &format!("limit {number}"),
        )
        .await;
        // A rotation's grace: 0 to a day rotates (then the old id is gone: 404), anything
        // else is a 400.
        let grace = client
            .post(server.url(&format!("/api/keys/{key_id}/rotate")))
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body(format!("{{\"grace_secs\": {number}}}"));
        let res = grace.send().await.unwrap();
        let status = res.status();
        assert!(
            status.is_success() || status.is_client_error(),
            "grace {number}: {status}"
        );
    }
    // Still serving (the key may have been rotated away by a grace of 0).
    let fresh = db.create(&["keys", "create", "--user", &user]);
    assert_eq!(server.ping(&fresh).await.status(), 200, "still serving");
    let (status, log) = server.stop();
    assert!(status.success());
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:?}");
}

async fn every_time_option_on_the_command_line(backend: Backend) {
    let db = Db::new(backend);
    let (user, _) = db.user_with_key("ada@example.com", "pro");
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (prop_oneof![rfc3339(), not_a_time()], day(), number());
    let run = |args: &[&str]| {
        let out = db.cli(&[], args);
        // 0: done; 1: our error; 2: a bad option. 101 would be a panic.
        let code = out.status.code();
        assert!(
            matches!(code, Some(0..=2)),
            "{args:?}: {code:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
        code
    };
    assert_eq!(
        run(&[
            "export",
            "--user",
            &user,
            "--to",
            "9999-12-31T23:59:59-00:01"
        ]),
        Some(2),
        "the probe that exited 101"
    );
    assert_eq!(
        run(&["export", "--user", &user, "--to", "9999-12-31T23:59:59Z"]),
        Some(0)
    );
    for _ in 0..16 {
        let (time, day, number) = strategy.new_tree(&mut runner).unwrap().current();
        run(&["export", "--user", &user, "--from", &time]);
        run(&["export", "--user", &user, "--to", &time, "--format", "csv"]);
        run(&["aggregate", "--date", &day]);
        run(&["token", "--user", &user, "--ttl-secs", &number]);
        run(&["login-link", "--user", &user, "--ttl-secs", &number]);
    }
}

on_both_backends!(
    every_time_parameter_over_http,
    every_time_option_on_the_command_line,
);
