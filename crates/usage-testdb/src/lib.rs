//! Throwaway PostgreSQL for tests.
//!
//! The first call in a test process starts a private PostgreSQL server from the local
//! server binaries (`initdb` into a temporary directory, loopback only, fsync off); every
//! call then creates a fresh, empty database on it, dropped when the returned
//! [`TestDatabase`] is. Tests therefore need no running server and can run in parallel.
//!
//! The server stops and its directory is removed when the test process exits: it runs
//! under a small shell guardian that waits for the end of its standard input, which only
//! this process holds.
//!
//! Binaries are looked up in `PG_BIN_DIR`, then on `PATH`, then in
//! `/usr/lib/postgresql/<version>/bin`. Without them the call panics with the command to
//! install them: tests that need PostgreSQL fail, they never skip.
//!
//! ```no_run
//! let db = usage_testdb::fresh_database();
//! println!("connect to {}", db.url());
//! ```
#![warn(missing_docs)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, postgres, psql) were not found. \
Install them with `sudo apt-get install -y postgresql` (Debian/Ubuntu) or point PG_BIN_DIR at \
the directory that holds them (e.g. /usr/lib/postgresql/15/bin).";

/// Settings of the test server: loopback only, and speed over durability.
const SETTINGS: &str = "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB";

/// The private PostgreSQL server of this test process.
pub struct TestServer {
    port: u16,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    /// Where the server's socket lives.
    socket_dir: PathBuf,
    /// Run the server's tools as this user (when the tests run as root).
    run_as: Option<(u32, u32)>,
    // Kept open for the life of the process: its end tells the guardian to stop the server.
    _guardian_stdin: Mutex<ChildStdin>,
    _guardian: Mutex<Child>,
}

/// A fresh database on the test server, dropped with this value.
pub struct TestDatabase {
    name: String,
    url: String,
    server: &'static TestServer,
}

impl TestDatabase {
    /// `postgres://` URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server it lives on.
    pub fn server(&self) -> &'static TestServer {
        self.server
    }

    /// Runs SQL (one or more statements) as the superuser on this database.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.server.psql_on(&self.name, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort: the whole server goes away with the process anyway.
        let _ = self.server.psql(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ));
    }
}

/// The server of this process, started on first use.
///
/// # Panics
/// When the PostgreSQL binaries are missing or the server does not start; the message
/// says why and how to fix it.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<Result<TestServer, String>> = OnceLock::new();
    match SERVER.get_or_init(TestServer::start) {
        Ok(server) => server,
        Err(why) => panic!("cannot start the test PostgreSQL: {why}"),
    }
}

/// A new empty database on this process's test server.
///
/// # Panics
/// As [`server`], or when the database cannot be created.
pub fn fresh_database() -> TestDatabase {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let server = server();
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    if let Err(why) = server.psql(&format!("CREATE DATABASE \"{name}\"")) {
        panic!("cannot create test database {name}: {why}");
    }
    TestDatabase {
        url: server.url(&name),
        name,
        server,
    }
}

impl TestServer {
    /// `postgres://` URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs SQL as the superuser on the `postgres` database.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_on("postgres", sql)
    }

    /// Runs SQL as the superuser on database `database`.
    pub fn psql_on(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin_dir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", database])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    fn start() -> Result<Self, String> {
        let bin_dir = find_bin_dir().ok_or_else(|| INSTALL_HINT.to_owned())?;
        let run_as = if running_as_root() {
            Some(unprivileged_user().ok_or(
                "running as root, and PostgreSQL refuses to: no 'postgres' or 'nobody' user to run it as",
            )?)
        } else {
            None
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("usage-testdb-{}-{stamp}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot set permissions of {}: {e}", dir.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("cannot hand {} to uid {uid}: {e}", dir.display()))?;
        }
        let data_dir = dir.join("data");

        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null());
        as_user(&mut initdb, run_as);
        let out = initdb
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }

        // A port picked by the kernel can be taken again before the server binds it; retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            match Self::launch(&bin_dir, &dir, &data_dir, port, run_as) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn launch(
        bin_dir: &Path,
        dir: &Path,
        data_dir: &Path,
        port: u16,
        run_as: Option<(u32, u32)>,
    ) -> Result<Self, String> {
        let log = dir.join("server.log");
        // A failed attempt's log says FATAL: it must not fail this one.
        let _ = fs::remove_file(&log);
        // The guardian: start postgres, wait for stdin to close (this process ended), then
        // stop it fast and remove the cluster. A launch that failed (its port taken) says
        // `retry`: the cluster stays for the next attempt on another port.
        let script = r#"
"$PGBIN/postgres" -D "$PGDATA_DIR" -p "$PGPORT_NUM" -k "$TESTDB_DIR" $PGSETTINGS \
  >"$TESTDB_LOG" 2>&1 &
pid=$!
read command
kill -INT "$pid" 2>/dev/null
wait "$pid"
[ "$command" = retry ] || rm -rf "$TESTDB_DIR"
"#;
        let mut guardian = Command::new("/bin/sh");
        guardian
            .args(["-c", script])
            .env("PGBIN", bin_dir)
            .env("PGDATA_DIR", data_dir)
            .env("PGPORT_NUM", port.to_string())
            .env("PGSETTINGS", SETTINGS)
            .env("TESTDB_DIR", dir)
            .env("TESTDB_LOG", &log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_user(&mut guardian, run_as);
        let mut child = guardian
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or("cannot hold the guardian's standard input")?;
        let server = TestServer {
            port,
            bin_dir: bin_dir.to_owned(),
            data_dir: data_dir.to_owned(),
            socket_dir: dir.to_owned(),
            run_as,
            _guardian_stdin: Mutex::new(stdin),
            _guardian: Mutex::new(child),
        };

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if server.psql("SELECT 1").is_ok() {
                return Ok(server);
            }
            let mut log_text = String::new();
            if let Ok(mut f) = fs::File::open(&log) {
                let _ = f.read_to_string(&mut log_text);
            }
            if log_text.contains("FATAL") || Instant::now() > deadline {
                server.stop_for_retry();
                return Err(format!("postgres did not start: {}", log_text.trim()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops a server that did not start, keeping its cluster for another attempt.
    fn stop_for_retry(&self) {
        if let Ok(mut stdin) = self._guardian_stdin.lock() {
            let _ = stdin.write_all(b"retry\n");
        }
        if let Ok(mut guardian) = self._guardian.lock() {
            let _ = guardian.wait();
        }
    }

    /// The options the server runs with, for `pg_ctl start -o ...` after a test stopped
    /// it (a plain `pg_ctl start` would use the cluster's defaults: another port).
    pub fn postgres_options(&self) -> String {
        format!(
            "-p {} -k {} {SETTINGS}",
            self.port,
            self.socket_dir.display()
        )
    }

    /// The user the server's processes run as, when the tests run as root.
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// The directory of the server binaries (`pg_ctl` and friends).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        cmd.gid(gid).uid(uid);
    }
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot pick a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot pick a port: {e}"))
}

fn find_bin_dir() -> Option<PathBuf> {
    find_bin_dir_in(std::env::var_os("PG_BIN_DIR").map(PathBuf::from))
}

/// The binaries' directory: `pg_bin_dir` when given (and nothing else), else Debian's
/// layout, else `PATH`.
fn find_bin_dir_in(pg_bin_dir: Option<PathBuf>) -> Option<PathBuf> {
    let has_tools = |dir: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    if let Some(dir) = pg_bin_dir {
        return has_tools(&dir).then_some(dir);
    }
    // Debian's layout first: /usr/bin has psql but not initdb.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_tools(d)) {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| has_tools(d))
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// uid and gid of `postgres`, else `nobody`, from /etc/passwd.
fn unprivileged_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let lookup = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    };
    lookup("postgres").or_else(|| lookup("nobody"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_pg_bin_dir_is_not_silently_replaced() {
        assert_eq!(find_bin_dir_in(Some(PathBuf::from("/no/such/dir"))), None);
        // ...and the failure says how to install the binaries.
        assert!(INSTALL_HINT.contains("apt-get install -y postgresql"));
        assert!(INSTALL_HINT.contains("PG_BIN_DIR"));
    }

    #[test]
    fn databases_are_separate_and_dropped() {
        let a = fresh_database();
        let b = fresh_database();
        assert_ne!(a.url(), b.url());
        let name = a.name().to_owned();
        let count = |n: &str| {
            server()
                .psql(&format!(
                    "SELECT count(*) FROM pg_database WHERE datname = '{n}'"
                ))
                .unwrap()
        };
        assert_eq!(count(&name), "1");
        drop(a);
        assert_eq!(count(&name), "0");
        assert_eq!(count(b.name()), "1");
    }
}
