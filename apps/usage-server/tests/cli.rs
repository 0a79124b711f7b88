//! The command line as a newcomer uses it: the README walkthrough on SQLite and on
//! PostgreSQL, and bad input answered with one clear line and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::{Backend, Db, SECRET};
use usage_auth::jwt::{JwtConfig, JwtKeys};
use usage_auth::keys::hash_api_key;
use usage_core::{Plan, UserId};

fn stdout_line(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout, got {text:?}");
    lines[0].to_owned()
}

/// Asserts a failure with exactly one line on stderr that contains `expected`.
fn assert_one_line_error(out: &Output, code: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {stderr:?}");
    assert!(
        lines[0].contains(expected),
        "{:?} does not contain {expected:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
}

/// The walkthrough: create a user, a key, a token; check each against the database.
async fn walkthrough(db: &Db, secret: impl Fn() -> Vec<u8>) {
    let user = stdout_line(&db.cli(
        &[],
        &[
            "users",
            "create",
            "--email",
            "ada@example.com",
            "--plan",
            "pro",
        ],
    ));
    let user_id = UserId::parse(&user).expect("a user id");
    let key = stdout_line(&db.cli(&[], &["keys", "create", "--user", &user, "--name", "ci"]));
    assert!(usage_auth::keys::looks_like_api_key(&key), "{key}");
    let token = stdout_line(&db.cli(&[], &["token", "--user", &user, "--ttl-secs", "600"]));
    let set = db.cli(
        &[],
        &["users", "set-plan", "--user", &user, "--plan", "enterprise"],
    );
    assert!(set.status.success() && set.stdout.is_empty());

    let jwt = JwtKeys::new(&JwtConfig {
        secret: secret(),
        audience: "authenticated".into(),
        issuer: None,
    })
    .unwrap();
    assert_eq!(jwt.verify(&token).unwrap(), user_id);

    let store = db.store().await;
    let stored_user = store.user_by_id(&user_id).await.unwrap().unwrap();
    assert_eq!(
        (stored_user.email.as_str(), stored_user.plan),
        ("ada@example.com", Plan::enterprise())
    );
    let stored_key = store
        .api_key_by_hash(&hash_api_key(&key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (&stored_key.user_id, stored_key.name.as_str()),
        (&user_id, "ci")
    );
    assert!(key.starts_with(&stored_key.prefix));

    // The same email again is refused clearly.
    let again = db.cli(
        &[],
        &[
            "users",
            "create",
            "--email",
            "ADA@example.com",
            "--plan",
            "free",
        ],
    );
    assert_one_line_error(
        &again,
        1,
        "a user with email ada@example.com already exists",
    );

    // Revoking prints nothing on stdout; a second revoke of an unknown key id fails clearly.
    let revoke = db.cli(
        &[],
        &[
            "keys",
            "revoke",
            "--user",
            &user,
            "--key",
            stored_key.id.as_str(),
        ],
    );
    assert!(revoke.status.success() && revoke.stdout.is_empty());
    let revoked = store
        .api_key_by_hash(&hash_api_key(&key))
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let unknown = db.cli(
        &[],
        &[
            "keys",
            "revoke",
            "--user",
            &user,
            "--key",
            "eco_key_nosuchkey",
        ],
    );
    assert_one_line_error(&unknown, 1, "no API key with id eco_key_nosuchkey");
}

#[tokio::test(flavor = "multi_thread")]
async fn walkthrough_on_the_sqlite_default() {
    let db = Db::sqlite_default();
    let secret_file = db.dir.0.join("data/jwt_secret");
    walkthrough(&db, || std::fs::read(&secret_file).unwrap()).await;
    assert!(
        db.dir.0.join("data/usage.db").exists(),
        "the default database was created"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn walkthrough_on_postgres() {
    let db = Db::new(Backend::Postgres);
    walkthrough(&db, || SECRET.as_bytes().to_vec()).await;
    assert!(
        !db.dir.0.join("data").exists(),
        "nothing written beside a PostgreSQL deployment"
    );

    let no_secret = db.cli(&[("JWT_SECRET", "")], &["token", "--user", "eco_usr_x"]);
    assert_one_line_error(&no_secret, 1, "JWT_SECRET is required with PostgreSQL");
}

#[test]
fn bad_input_gets_one_clear_line() {
    let db = Db::sqlite_default();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["users", "create", "--email", "a@b.co", "--plan", "gold"],
            1,
            "plan must be one of free, pro, enterprise",
        ),
        (
            &["users", "create", "--email", "a@b.co", "--plan", "Gold"],
            2,
            "plan must be a plan key",
        ),
        (
            &[
                "users",
                "create",
                "--email",
                "not-an-email",
                "--plan",
                "pro",
            ],
            1,
            "email must look like name@example.com",
        ),
        (&["users", "create", "--plan", "pro"], 2, "--email"),
        (
            &[
                "users",
                "create",
                "--email",
                "a@b.co",
                "--plan",
                "pro",
                "--stripe-customer-id",
                "acct_1",
            ],
            1,
            "stripe customer id must look like cus_",
        ),
        (
            &[
                "users",
                "set-plan",
                "--user",
                "eco_usr_missing",
                "--plan",
                "pro",
            ],
            1,
            "no user with id eco_usr_missing",
        ),
        (
            &["users", "set-plan", "--user", "usr_1", "--plan", "pro"],
            2,
            "user id must look like eco_usr_",
        ),
        (
            &[
                "users",
                "set-stripe-customer",
                "--user",
                "eco_usr_missing",
                "--customer",
                "cus_1",
            ],
            1,
            "no user with id eco_usr_missing",
        ),
        (
            &[
                "users",
                "set-stripe-customer",
                "--user",
                "eco_usr_missing",
                "--customer",
                "acct_1",
            ],
            1,
            "cus_",
        ),
        (
            &["keys", "create", "--user", "eco_usr_missing"],
            1,
            "no user with id eco_usr_missing",
        ),
        (
            &["keys", "create", "--user", "eco_usr_missing", "--name", ""],
            1,
            "name must be 1 to 64 printable characters",
        ),
        (
            &[
                "keys",
                "revoke",
                "--user",
                "eco_usr_missing",
                "--key",
                "key_1",
            ],
            2,
            "API key id must look like eco_key_",
        ),
        (
            &["token", "--user", "eco_usr_missing"],
            1,
            "no user with id eco_usr_missing",
        ),
        (
            &["token", "--user", "eco_usr_x", "--ttl-secs", "0"],
            2,
            "--ttl-secs",
        ),
        (
            &["--database-url", "mysql://x/y", "migrate"],
            1,
            "DATABASE_URL must start with postgres:// or sqlite://",
        ),
        (
            &[
                "--database-url",
                "postgres://app:hunter2@127.0.0.1:1/usage",
                "users",
                "create",
                "--email",
                "a@b.co",
                "--plan",
                "pro",
            ],
            1,
            "cannot connect to postgres://app:***@127.0.0.1:1/usage",
        ),
        (
            &["--free-monthly-calls", "0", "migrate"],
            2,
            "--free-monthly-calls",
        ),
        (
            &["--usage-batch-size", "0", "migrate"],
            2,
            "--usage-batch-size",
        ),
        (&["--bind", "not-an-address"], 2, "--bind"),
    ];
    for (args, code, expected) in cases {
        let out = db.cli(&[], args);
        assert_one_line_error(&out, *code, expected);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    }
    let burst_alone = db.cli(&[("RATE_LIMIT_PRO_BURST", "5")], &["migrate"]);
    assert_one_line_error(&burst_alone, 2, "--rate-limit-pro-per-sec");
    let from_env = db.cli(&[("PRO_MONTHLY_CALLS", "lots")], &["migrate"]);
    assert_one_line_error(
        &from_env,
        2,
        "invalid value 'lots' for '--pro-monthly-calls",
    );
    let weak = db.cli(
        &[("JWT_SECRET", "short")],
        &["token", "--user", "eco_usr_x"],
    );
    assert_one_line_error(&weak, 1, "JWT_SECRET must be at least 32 bytes long");
}

#[test]
fn help_explains_the_commands() {
    let db = Db::sqlite_default();
    let out = db.cli(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "migrate",
        "users",
        "keys",
        "token",
        "DATABASE_URL",
        "sqlite://data/usage.db",
        "USAGE_BATCH_SIZE",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
    assert!(
        !help.contains("bench-unmetered"),
        "the benchmark switch stays hidden"
    );
    let out = db.cli(&[], &["users", "create", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--stripe-customer-id") && help.contains("free, pro or enterprise"),
        "{help}"
    );
}
