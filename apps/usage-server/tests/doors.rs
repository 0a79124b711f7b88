//! One table of cases through every door of the same meter: the actix middleware (the
//! server's `/api/v1/ping`), forward auth asked directly, forward auth behind a real nginx
//! (`auth_request`, configured by `docs/forward-auth/nginx.conf` as documented), and the
//! tower layer in an axum router started by `usage-embed` in this process. Each door must
//! give the same answers: admitted with the quota headers (`X-RateLimit-*` and the IETF
//! fields), unknown or missing key 401, revoked key 401, over quota 429, database down 503;
//! and record each admitted call once with its route pattern.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Extension, Path};
use axum::routing::get;
use common::{Backend, Db, TempDir, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use usage_core::{BillingPeriod, Caller, PlanCatalog, UserId};
use usage_embed::{UsageMeter, UsageOptions};

on_both_backends!(
    every_door_gives_the_same_answers,
    forged_forwarded_headers_are_overwritten_by_nginx
);

/// Free calls a month in this suite.
const FREE_CALLS: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// The actix middleware in usage-server: `/api/v1/ping`.
    Actix,
    /// `/api/forward-auth` asked directly, the original call in `X-Forwarded-*`.
    ForwardAuth,
    /// nginx `auth_request` in front of an upstream.
    Nginx,
    /// The tower layer on an axum router, from `usage-embed`.
    Axum,
}

const DOORS: [Door; 4] = [Door::Actix, Door::ForwardAuth, Door::Nginx, Door::Axum];

struct Doors {
    server: common::Server,
    nginx: Nginx,
    axum: String,
    client: reqwest::Client,
}

impl Doors {
    /// A call through `door` with `key` (`None`: no credential).
    async fn call(&self, door: Door, key: Option<&str>) -> reqwest::Response {
        let request = match door {
            Door::Actix => self.client.get(self.server.url("/api/v1/ping")),
            Door::ForwardAuth => self
                .client
                .get(self.server.url("/api/forward-auth"))
                .header("X-Forwarded-Method", "GET")
                .header("X-Forwarded-Uri", "/v1/items/42?color=red"),
            Door::Nginx => self.client.get(format!("{}/v1/items/42", self.nginx.base)),
            Door::Axum => self.client.get(format!("{}/v1/items/42", self.axum)),
        };
        let request = match key {
            Some(key) => request.header("Authorization", format!("Bearer {key}")),
            None => request,
        };
        request.send().await.unwrap()
    }

    /// The route pattern each door records.
    fn endpoint(door: Door) -> &'static str {
        match door {
            Door::Actix => "/api/v1/ping",
            _ => "/v1/items/{id}",
        }
    }
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    let values: Vec<_> = res.headers().get_all(name).iter().collect();
    assert!(values.len() <= 1, "{name} sent {} times", values.len());
    values.first().map(|v| v.to_str().unwrap().to_owned())
}

/// Checks a refusal: status, error code, and the headers that go with it.
async fn assert_refused(door: Door, res: reqwest::Response, status: StatusCode, error: &str) {
    assert_eq!(res.status(), status, "{door:?}: status");
    let content_type = header(&res, "content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{door:?}: content type {content_type:?}"
    );
    match status {
        StatusCode::UNAUTHORIZED => {
            assert_eq!(
                header(&res, "www-authenticate").as_deref(),
                Some("Bearer"),
                "{door:?}"
            );
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_eq!(
                header(&res, "retry-after").as_deref(),
                Some("5"),
                "{door:?}"
            );
        }
        _ => {}
    }
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], error, "{door:?}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// The seconds of the current month, the IETF `w` of the monthly policy.
fn month_seconds() -> i64 {
    let period = BillingPeriod::containing(time::OffsetDateTime::now_utc());
    (period.end() - period.start()).whole_seconds()
}

async fn every_door_gives_the_same_answers(backend: Backend) {
    let db = Db::new(backend);
    let free_calls = FREE_CALLS.to_string();
    let server = db.start(&[
        ("FREE_MONTHLY_CALLS", free_calls.as_str()),
        (
            "FORWARD_AUTH_ROUTES",
            "/v1/items/{id},/v1/users/{id}/orders",
        ),
        ("KEY_REVOCATION_POLL_MS", "100"),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
    ]);
    let (axum, axum_usage, axum_stop) = start_axum(&db.url).await;
    let nginx = Nginx::start(port_of(&server.base));
    let doors = Doors {
        server,
        nginx,
        axum,
        client: reqwest::Client::new(),
    };

    for door in DOORS {
        // Admitted: the quota headers count down; the IETF fields say the same.
        let (user, key) = db.user_with_key(&format!("{door:?}@example.com"), "free");
        for remaining in (0..FREE_CALLS).rev() {
            let res = doors.call(door, Some(&key)).await;
            assert_eq!(res.status(), StatusCode::OK, "{door:?}");
            assert_eq!(header(&res, "x-ratelimit-limit"), Some(free_calls.clone()));
            assert_eq!(
                header(&res, "x-ratelimit-remaining"),
                Some(remaining.to_string()),
                "{door:?}"
            );
            assert!(header(&res, "x-ratelimit-reset").is_some(), "{door:?}");
            assert_eq!(
                header(&res, "ratelimit-policy"),
                Some(format!("\"monthly\";q={FREE_CALLS};w={}", month_seconds())),
                "{door:?}"
            );
            let state = header(&res, "ratelimit").unwrap_or_default();
            assert!(
                state.starts_with(&format!("\"monthly\";r={remaining};t=")),
                "{door:?}: RateLimit {state:?}"
            );
            // Who is calling reaches the handler or upstream.
            match door {
                Door::ForwardAuth => {
                    assert_eq!(header(&res, "x-usage-user-id"), Some(user.clone()));
                    assert_eq!(header(&res, "x-usage-plan").as_deref(), Some("free"));
                    assert_eq!(res.text().await.unwrap(), "");
                }
                _ => {
                    let body: Value = res.json().await.unwrap();
                    assert_eq!(body["user_id"], user.as_str(), "{door:?}: {body}");
                }
            }
        }
        // Over quota.
        let res = doors.call(door, Some(&key)).await;
        assert_eq!(header(&res, "x-ratelimit-remaining").as_deref(), Some("0"));
        assert!(header(&res, "retry-after").is_some(), "{door:?}");
        let state = header(&res, "ratelimit").unwrap_or_default();
        assert!(state.starts_with("\"monthly\";r=0;t="), "{door:?}: {state}");
        assert_refused(door, res, StatusCode::TOO_MANY_REQUESTS, "quota_exceeded").await;

        // Every admitted call is recorded once, under its route pattern.
        let store = db.store().await;
        let user_id = UserId::parse(&user).unwrap();
        let period = BillingPeriod::containing(time::OffsetDateTime::now_utc());
        eventually(
            &format!("{door:?}: three calls recorded"),
            Duration::from_secs(10),
            async || {
                store
                    .count_usage_events(&user_id, period.start(), period.end())
                    .await
                    .unwrap()
                    == FREE_CALLS
            },
        )
        .await;
        let events = store
            .usage_events_page(&user_id, period.start(), period.end(), None, 10)
            .await
            .unwrap();
        for event in &events {
            assert_eq!(event.endpoint, Doors::endpoint(door), "{door:?}");
            assert_eq!(event.method, "GET");
            assert_eq!(event.status_code, 200);
        }

        // Unknown, missing and revoked keys.
        let res = doors
            .call(door, Some("eco_live_doesnotexistdoesnotexist0000"))
            .await;
        assert_refused(door, res, StatusCode::UNAUTHORIZED, "unauthorized").await;
        let res = doors.call(door, None).await;
        assert_refused(door, res, StatusCode::UNAUTHORIZED, "unauthorized").await;

        let (revoked_user, key) = db.user_with_key(&format!("revoked-{door:?}@example.com"), "pro");
        assert_eq!(doors.call(door, Some(&key)).await.status(), StatusCode::OK);
        let keys = store
            .api_keys_for_user(&UserId::parse(&revoked_user).unwrap())
            .await
            .unwrap();
        let key_id = keys[0].id.to_string();
        db.create(&["keys", "revoke", "--user", &revoked_user, "--key", &key_id]);
        let mut last = StatusCode::OK;
        eventually(
            &format!("{door:?}: the revoked key is refused"),
            Duration::from_secs(10),
            async || {
                last = doors.call(door, Some(&key)).await.status();
                last == StatusCode::UNAUTHORIZED
            },
        )
        .await;
        let res = doors.call(door, Some(&key)).await;
        assert_refused(door, res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }

    // Database down (PostgreSQL refusing connections): a key never seen gets 503 at every
    // door, with Retry-After; nothing else is said.
    if let Some(pg) = &db.pg {
        let fresh: Vec<_> = DOORS
            .iter()
            .map(|door| {
                db.user_with_key(&format!("down-{door:?}@example.com"), "pro")
                    .1
            })
            .collect();
        let name = pg.name();
        pg.server()
            .psql(&format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
            ))
            .unwrap();
        for (door, key) in DOORS.iter().zip(&fresh) {
            let res = doors.call(*door, Some(key)).await;
            assert_refused(
                *door,
                res,
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
            )
            .await;
        }
        pg.server()
            .psql(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
            .unwrap();
        // Back: the same keys work through every door.
        for (door, key) in DOORS.iter().zip(&fresh) {
            let mut last = StatusCode::SERVICE_UNAVAILABLE;
            eventually(
                &format!("{door:?}: admitted once the database is back"),
                Duration::from_secs(20),
                async || {
                    last = doors.call(*door, Some(key)).await.status();
                    last == StatusCode::OK
                },
            )
            .await;
        }
    }

    let _ = axum_stop.send(());
    let report = axum_usage.await.unwrap();
    assert_eq!(report.usage.unwritten, 0);
    let (status, _) = doors.server.stop();
    assert!(status.success());
}

/// A client behind nginx cannot choose the recorded endpoint or method: the documented
/// configuration overwrites `X-Forwarded-*` and `X-Original-*` on the auth subrequest.
async fn forged_forwarded_headers_are_overwritten_by_nginx(backend: Backend) {
    let db = Db::new(backend);
    let server = db.start(&[
        ("FORWARD_AUTH_ROUTES", "/v1/items/{id}"),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
    ]);
    let nginx = Nginx::start(port_of(&server.base));
    let (user, key) = db.user_with_key("forger@example.com", "pro");
    let client = reqwest::Client::new();
    let forged = [
        ("X-Forwarded-Uri", "/totally/fake"),
        ("X-Forwarded-Method", "DELETE"),
        ("X-Original-URI", "/also/fake"),
        ("X-Original-Method", "PATCH"),
    ];
    for _ in 0..2 {
        let mut request = client
            .get(format!("{}/v1/items/777", nginx.base))
            .bearer_auth(&key);
        for (name, value) in forged {
            request = request.header(name, value);
        }
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["upstream"], true, "{body}");
    }
    let store = db.store().await;
    let user_id = UserId::parse(&user).unwrap();
    let period = BillingPeriod::containing(time::OffsetDateTime::now_utc());
    eventually("both calls recorded", Duration::from_secs(10), async || {
        store
            .count_usage_events(&user_id, period.start(), period.end())
            .await
            .unwrap()
            == 2
    })
    .await;
    let events = store
        .usage_events_page(&user_id, period.start(), period.end(), None, 10)
        .await
        .unwrap();
    for event in &events {
        assert_eq!(
            (event.endpoint.as_str(), event.method.as_str()),
            ("/v1/items/{id}", "GET"),
            "what nginx served is recorded, not what the client claimed"
        );
    }
    drop(nginx);
    let (status, _) = server.stop();
    assert!(status.success());
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn item(Path(id): Path<u32>, Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({"item": id, "user_id": caller.user_id}))
}

/// An axum router behind the tower layer, metering into the same database. Returns its
/// base URL, the task that ends with the handle's shutdown report, and the stop signal.
async fn start_axum(
    url: &str,
) -> (
    String,
    tokio::task::JoinHandle<usage_embed::ShutdownReport>,
    tokio::sync::oneshot::Sender<()>,
) {
    let mut plans = PlanCatalog::default();
    plans.free.monthly_calls = Some(FREE_CALLS);
    let options = UsageOptions {
        plans,
        access_poll: Duration::from_millis(100),
        ..UsageOptions::default()
    };
    let usage = UsageMeter::start(url, options).await.unwrap();
    let app = axum::Router::new()
        .route("/v1/items/{id}", get(item))
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
        usage.shutdown().await
    });
    (base, task, stop)
}

/// nginx on loopback with the documented configuration, in front of a tiny upstream that
/// echoes who is calling.
struct Nginx {
    child: Child,
    base: String,
    dir: TempDir,
}

impl Nginx {
    fn start(usage_port: u16) -> Self {
        let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("nginx not found: .ci/run installs it (apt-get install nginx-light)");
        let dir = TempDir::new("nginx");
        let (front, upstream) = (free_port(), free_port());
        let documented = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/forward-auth/nginx.conf"),
        )
        .unwrap();
        // Only the addresses change.
        let snippet = documented
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{usage_port}"))
            .replace("127.0.0.1:3000", &format!("127.0.0.1:{upstream}"))
            .replace("listen 80;", &format!("listen 127.0.0.1:{front};"));
        assert_ne!(snippet, documented);
        let d = dir.0.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # The upstream: any service; this one says who nginx told it was calling.
    server {{
        listen 127.0.0.1:{upstream};
        location / {{
            default_type application/json;
            return 200 '{{"upstream":true,"user_id":"$http_x_usage_user_id","plan":"$http_x_usage_plan"}}';
        }}
    }}
{snippet}
}}
"#
        );
        std::fs::write(dir.0.join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(dir.0.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut nginx = Self {
            child,
            base: format!("http://127.0.0.1:{front}"),
            dir,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", front)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}: {}", nginx.error_log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not start: {}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
