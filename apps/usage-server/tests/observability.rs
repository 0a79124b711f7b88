//! What an operator sees, on the real server: request ids in responses and in the JSON
//! logs, latency histograms per route, live figures on `/metrics` that Prometheus's own
//! `promtool` accepts, and the shipped alert rules and Grafana dashboard, whose rules
//! `promtool` checks and unit-tests and whose every metric the server exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Backend, Db, Server};
use serde_json::Value;

on_both_backends!(request_ids_histograms_and_metrics_promtool_accepts);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Debian's promtool (package `prometheus`, installed by .ci/run).
fn promtool() -> Command {
    let found = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("promtool not found: .ci/run installs it (apt-get install prometheus)");
    Command::new(found)
}

async fn metrics_text(server: &Server) -> String {
    let res = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    res.text().await.unwrap()
}

/// The value of the one sample line starting with `series` (name and labels, in the
/// order the server writes them).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

async fn request_ids_histograms_and_metrics_promtool_accepts(backend: Backend) {
    let db = Db::new(backend);
    let (_, key) = db.user_with_key("ada@example.com", "free");
    let server = db.start(&[("LOG_FORMAT", "json"), ("USAGE_FLUSH_INTERVAL_MS", "100")]);
    let client = reqwest::Client::new();
    let ping = |id: Option<&str>| {
        let mut req = client.get(server.url("/api/v1/ping")).bearer_auth(&key);
        if let Some(id) = id {
            req = req.header("X-Request-Id", id);
        }
        req.send()
    };

    // The caller's id when well-formed, else a new UUID; on every response.
    let res = ping(Some("trace-me.01_HX")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "trace-me.01_HX");
    let mut new_ids = BTreeSet::new();
    for presented in [None, Some("not ok!"), Some("a/b")] {
        let res = ping(presented).await.unwrap();
        assert_eq!(res.status(), 200);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{presented:?} → {id}");
        new_ids.insert(id);
    }
    assert_eq!(new_ids.len(), 3, "a new id for each request");
    let refused = client
        .get(server.url("/api/v1/ping"))
        .header("X-Request-Id", "refused-1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-request-id"], "refused-1");

    // A log line written while serving a call carries that call's id.
    let res = client
        .post(server.url("/api/keys"))
        .header("X-Request-Id", "follow-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["x-request-id"], "follow-me-42");
    server.wait_flushed(4).await;
    let followed: Vec<Value> = server
        .log()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["span"]["request_id"] == "follow-me-42")
        .collect();
    assert_eq!(followed.len(), 1, "{:?}", server.log());
    assert_eq!(followed[0]["fields"]["message"], "user token refused");
    assert_eq!(followed[0]["span"]["name"], "request");

    let text = metrics_text(&server).await;
    let ping_ok = "http_server_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/ping\",status=\"200\"}";
    assert_eq!(sample(&text, ping_ok), 4.0);
    let ping_401 = "http_server_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/ping\",status=\"401\"}";
    assert_eq!(sample(&text, ping_401), 1.0);
    let le_inf = "http_server_request_duration_seconds_bucket{method=\"POST\",route=\"/api/keys\",status=\"401\",le=\"+Inf\"}";
    assert_eq!(sample(&text, le_inf), 1.0);
    assert_eq!(sample(&text, "usage_tracker_batch_events_sum"), 4.0);
    assert!(sample(&text, "usage_tracker_flush_duration_seconds_count") >= 1.0);
    assert_eq!(
        sample(&text, "usage_tracker_flush_duration_seconds_count"),
        sample(&text, "usage_tracker_batch_events_count")
    );
    assert_eq!(
        sample(&text, "usage_requests_total{outcome=\"admitted\"}"),
        4.0
    );
    assert_eq!(
        sample(&text, "usage_api_key_lookups_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "usage_api_key_lookups_total{result=\"hit\"}"),
        3.0
    );
    assert_eq!(sample(&text, "usage_tracker_oldest_waiting_seconds"), 0.0);
    assert_eq!(sample(&text, "usage_tracker_queue_capacity"), 100_000.0);
    let backend_name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(
        sample(
            &text,
            &format!("usage_server_info{{backend=\"{backend_name}\"}}")
        ),
        1.0
    );
    let open = sample(&text, "usage_db_pool_connections{state=\"idle\"}")
        + sample(&text, "usage_db_pool_connections{state=\"in_use\"}");
    assert!(open >= 1.0 && open <= sample(&text, "usage_db_pool_max_connections"));

    // Prometheus's own linter takes it as it is.
    let mut lint = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the shipped alerts and dashboard use is one the server exports.
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for file in ["ops/prometheus/alerts.yml", "ops/grafana/nexus-usage.json"] {
        let used = metric_names(&std::fs::read_to_string(repo_file(file)).unwrap());
        assert!(used.len() >= 10, "{file}: {used:?}");
        let missing: Vec<&String> = used
            .iter()
            .filter(|name| {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| exported.contains(base))
                    .unwrap_or(name);
                !exported.contains(family)
            })
            .collect();
        assert!(missing.is_empty(), "{file} uses {missing:?}, not exported");
    }
    let (status, _) = server.stop();
    assert!(status.success());
}

/// The names of our metrics (`usage_…`, `http_server_…`) a file mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices(['u', 'h']) {
        let rest = &text[start..];
        if !(rest.starts_with("usage_") || rest.starts_with("http_server_")) {
            continue;
        }
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn the_alert_rules_are_valid_and_fire_as_their_unit_tests_say() {
    let dir = repo_file("ops/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = promtool().args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let text = std::fs::read_to_string(repo_file("ops/grafana/nexus-usage.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["uid"], "nexus-usage");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("usage_") || expr.contains("http_server_"),
                "{}: {expr}",
                panel["title"]
            );
        }
    }
}
