//! `serve` on both backends: health and readiness, JSON errors, clean stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_usage-server");

/// A running server on a kernel-chosen port; killed if the test fails before stopping it.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(env: &[(&str, &str)], dir: &std::path::Path) -> Self {
        let mut child = Command::new(BIN)
            .current_dir(dir)
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .env_remove("JWT_SECRET")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usage-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not start listening");
        Self { child, base }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn check_operations(server: &Server, backend: &str) {
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", server.base)).send();

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

    let wrong_method = client
        .delete(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_sqlite_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!(
        "usage-serve-{}",
        usage_core::ids::random_base62(12)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(&[], &dir);
    check_operations(&server, "sqlite").await;
    assert!(server.stop().success(), "clean exit on SIGTERM");
    assert!(dir.join("data/usage.db").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_on_postgres_and_reports_an_unready_database() {
    let db = usage_testdb::fresh_database();
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    let server = Server::start(
        &[("DATABASE_URL", db.url()), ("JWT_SECRET", secret)],
        &std::env::temp_dir(),
    );
    check_operations(&server, "postgres").await;

    // Take the database away under the running server: ready turns to 503, health stays.
    db.server()
        .psql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", db.name()))
        .unwrap();
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().contains_key("retry-after"));
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["error"], "database_unavailable");
    let health = client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(server.stop().success());
}
