//! What the server's integration tests share: a database of either backend, the CLI,
//! and a server process on a kernel-chosen port.
#![allow(dead_code, unused_macros, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use usage_core::{BillingPeriod, Store, UserId};
use usage_store::PoolOptions;

/// Prints a measured figure straight to the process's stderr, past the test harness's
/// capture: the fault tests' counts appear in every `cargo test` log, CI's included.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Expands async scenarios `fn(Backend)` into one test per scenario and backend.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

pub const BIN: &str = env!("CARGO_BIN_EXE_usage-server");
pub const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

/// Variables of ours that must not leak in from the environment running the tests.
const OUR_VARS: &[&str] = &[
    "DATABASE_URL",
    "JWT_SECRET",
    "INGEST_SECRET",
    "LATE_EVENT_DAYS",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "BIND_ADDR",
    "RUST_LOG",
    "DEFAULT_PLAN",
    "FREE_MONTHLY_CALLS",
    "PRO_MONTHLY_CALLS",
    "USAGE_CLOCK_START",
    "USAGE_BATCH_SIZE",
    "USAGE_FLUSH_INTERVAL_MS",
    "USAGE_QUEUE_CAPACITY",
    "USAGE_SPOOL_DIR",
    "DATABASE_CONNECT_TIMEOUT_SECS",
    "API_KEY_CACHE_TTL_MS",
    "API_KEY_CACHE_STALE_IF_ERROR_MS",
    "KEY_REVOCATION_POLL_MS",
    "QUOTA_SYNC_MS",
    "QUOTA_LEASE_MAX",
    "QUOTA_LEASE_SHARE",
    "QUOTA_FORGET_IDLE_MS",
    "QUOTA_PUSH_WITHIN_MS",
    "CRON_SECRET",
    "STRIPE_WEBHOOK_SECRET",
    "ADMIN_AUDIT_RETENTION_DAYS",
    "USAGE_RETENTION_DAYS",
    "STRIPE_SECRET_KEY",
    "ADMIN_ECO_IDS",
    "ADMIN_RATE_LIMIT_PER_SEC",
    "ADMIN_RATE_LIMIT_BURST",
    "STRIPE_API_BASE",
    "STRIPE_PRICE_PRO",
    "STRIPE_PRICE_ENTERPRISE",
    "STRIPE_TIMEOUT_MS",
    "STRIPE_MAX_ATTEMPTS",
    "OVERAGE_BILLING_CONCURRENCY",
    "DAILY_AGGREGATION",
    "LOG_FORMAT",
];

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "usage-{label}-{}",
            usage_core::ids::random_base62(12)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh database of one backend, and a working directory for the processes.
pub struct Db {
    /// Absolute URL, for the tests' own connections.
    pub url: String,
    pub dir: TempDir,
    pub pg: Option<usage_testdb::TestDatabase>,
    /// Processes get no DATABASE_URL: they use the default, `sqlite://data/usage.db`
    /// in their working directory (which `url` points at too).
    pub default_url: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    pub fn new(backend: Backend) -> Self {
        let dir = TempDir::new("server");
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}/data/usage.db", dir.0.display()),
                dir,
                pg: None,
                default_url: false,
            },
            Backend::Postgres => {
                let pg = usage_testdb::fresh_database();
                Self {
                    url: pg.url().to_owned(),
                    dir,
                    pg: Some(pg),
                    default_url: false,
                }
            }
        }
    }

    /// SQLite at the default location, with no DATABASE_URL and no JWT_SECRET given.
    pub fn sqlite_default() -> Self {
        Self {
            default_url: true,
            ..Self::new(Backend::Sqlite)
        }
    }

    pub fn command(&self, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&self.dir.0);
        for var in OUR_VARS {
            cmd.env_remove(var);
        }
        if !self.default_url {
            cmd.env("DATABASE_URL", &self.url).env("JWT_SECRET", SECRET);
        }
        cmd.envs(env.iter().copied());
        cmd
    }

    /// Runs the CLI against this database with extra environment.
    pub fn cli(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        self.command(env)
            .args(args)
            .output()
            .expect("run usage-server")
    }

    /// Runs the CLI and returns its one line of output.
    pub fn create(&self, args: &[&str]) -> String {
        let out = self.cli(&[], args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A user on `plan` and one API key: (user id, key).
    pub fn user_with_key(&self, email: &str, plan: &str) -> (String, String) {
        let user = self.create(&["users", "create", "--email", email, "--plan", plan]);
        let key = self.create(&["keys", "create", "--user", &user]);
        (user, key)
    }

    /// Runs SQL on the database behind the server's back, as an operator's shell would
    /// (SQLite: the sqlite3 shell's defaults, foreign keys off).
    pub fn sql(&self, sql: &str) {
        match &self.pg {
            Some(pg) => {
                pg.psql(sql).unwrap();
            }
            None => {
                use diesel::connection::SimpleConnection;
                use diesel::{Connection, SqliteConnection};
                let path = self.url.strip_prefix("sqlite://").unwrap();
                let mut conn = SqliteConnection::establish(path).unwrap();
                conn.batch_execute(&format!("PRAGMA busy_timeout = 10000; {sql}"))
                    .unwrap();
            }
        }
    }

    pub fn start(&self, env: &[(&str, &str)]) -> Server {
        Server::start(self, env)
    }

    pub async fn store(&self) -> Arc<dyn Store> {
        usage_store::open(&self.url, &PoolOptions::default())
            .await
            .unwrap()
    }

    /// Stored events and the period counter of `user` for the current period.
    pub async fn stored(&self, user: &str) -> (u64, u64, u64) {
        let store = self.store().await;
        let user = UserId::parse(user).unwrap();
        let period = BillingPeriod::containing(time::OffsetDateTime::now_utc());
        let events = store
            .count_usage_events(&user, period.start(), period.end())
            .await
            .unwrap();
        let record = store.usage_record(&user, period.start()).await.unwrap();
        let (calls, overage) = record.map_or((0, 0), |r| (r.api_calls, r.overage_calls));
        (events, calls, overage)
    }
}

/// A running server; killed if a test fails before stopping it.
pub struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(db: &Db, env: &[(&str, &str)]) -> Self {
        let mut cmd = db.command(env);
        cmd.args(["serve", "--bind", "127.0.0.1:0"]);
        Self::spawn(cmd)
    }

    /// The server with at most `open_files` file descriptors (soft and hard limit), as an
    /// operator's `ulimit -n` would set.
    pub fn start_with_file_limit(db: &Db, env: &[(&str, &str)], open_files: u32) -> Self {
        let mut cmd = db.command(env);
        let program = cmd.get_program().to_owned();
        let mut limited = Command::new("sh");
        limited
            .arg("-c")
            .arg(format!("ulimit -n {open_files} && exec \"$0\" \"$@\""))
            .arg(program)
            .args(["serve", "--bind", "127.0.0.1:0"])
            .current_dir(&db.dir.0);
        for (name, value) in cmd.get_envs() {
            match value {
                Some(value) => limited.env(name, value),
                None => limited.env_remove(name),
            };
        }
        let _ = &mut cmd;
        Self::spawn(limited)
    }

    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usage-server");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    // Text logs end the line there; JSON logs close the string.
                    let addr = addr.split(['"', ' ']).next().unwrap_or_default();
                    let _ = tx.send(addr.trim().to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => panic!("server did not start: {:?}", log.lock().unwrap()),
        };
        Self { child, base, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// One metered call to the sample route with `key`.
    pub async fn ping(&self, key: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.url("/api/v1/ping"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// Waits (bounded) until the tracker has written `events` events in all.
    pub async fn wait_flushed(&self, events: u64) {
        eventually(
            &format!("{events} events written"),
            Duration::from_secs(30),
            async || self.metric("usage_tracker_events_flushed_total").await == events as f64,
        )
        .await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log.lock().unwrap().clone());
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the process ends at once, with whatever it held in memory.
    pub fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        self.log.lock().unwrap().clone()
    }

    /// The most memory the process has held so far (`VmHWM`, KiB).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {status}"))
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// `GET path` with a user token: the JSON answer (a 2xx asserted).
    pub async fn get_json(&self, path: &str, token: &str) -> serde_json::Value {
        let res = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    /// `GET path` with a cookie: the page's text.
    pub async fn page(&self, path: &str, cookie: &str) -> String {
        reqwest::Client::new()
            .get(self.url(path))
            .header("Cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A counter's value from `/metrics`.
    /// The server's resident memory, in KiB (`VmRSS`).
    pub fn resident_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `check` holds.
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Runs `pg_ctl` on this process's test PostgreSQL server (stop, start, restart).
pub fn pg_ctl(args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let server = usage_testdb::server();
    let mut cmd = Command::new(server.bin_dir().join("pg_ctl"));
    cmd.arg("-D").arg(server.data_dir()).args(args);
    if args.first() == Some(&"start") {
        cmd.arg("-o").arg(server.postgres_options());
    }
    if let Some((uid, gid)) = server.run_as() {
        cmd.uid(uid).gid(gid);
    }
    // A started postmaster inherits pg_ctl's standard streams: never pipes, or waiting
    // for their end would wait for the server's.
    let log = server.data_dir().join("restart.log");
    cmd.arg("-l").arg(&log);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = cmd.status().unwrap();
    assert!(status.success(), "pg_ctl {args:?}: {status:?}");
}

/// Stops a server started by `pg_ctl` at the end, however the test ends: it is no longer
/// the guardian's child, which would leave it running. One per test binary.
pub struct StopRestarted;

impl Drop for StopRestarted {
    fn drop(&mut self) {
        pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// Makes this test database commit as production does: the test server trades
/// durability for speed (`synchronous_commit=off`: a commit is acknowledged before its WAL
/// is written, and an immediate stop loses it).
pub fn commit_synchronously(db: &Db) {
    let pg = db.pg.as_ref().unwrap();
    pg.psql(&format!(
        "ALTER DATABASE \"{}\" SET synchronous_commit = on",
        pg.name()
    ))
    .unwrap();
}

/// A user JWT for `user` (an `eco_usr_...` id), signed with [`SECRET`], valid 10 minutes.
pub fn token(user: &str) -> String {
    usage_auth::jwt::JwtKeys::new(&usage_auth::jwt::JwtConfig {
        secret: SECRET.as_bytes().to_vec(),
        audience: "authenticated".to_owned(),
        issuer: None,
    })
    .unwrap()
    .mint(
        &UserId::parse(user).unwrap(),
        600,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap()
}

/// An HTTP client that does not follow redirects (a form's 303 is what is asserted).
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A dashboard session of `user`, signed in with a token the CLI made: its cookie.
pub async fn sign_in(db: &Db, server: &Server, user: &str) -> String {
    let token = db.create(&["token", "--user", user]);
    let res = no_redirects()
        .post(server.url("/dashboard/session"))
        .header("Origin", &server.base)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    session_of(&res).unwrap()
}

/// The session cookie a sign-in answered with (`name=value`), if any.
pub fn session_of(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("usage_session=") && !c.starts_with("usage_session=;"))
        .map(|c| c.split(';').next().unwrap().to_owned())
}

/// The value of the hidden input `name` in a page.
pub fn hidden(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_owned()
}
