//! Taking access away: keys and users deleted (by the CLI or by hand in the database) or
//! blocked stop working within the revocation poll, on every instance, on both backends
//! (`../shared/API.md`, "Hardening rules").
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Db, Server, eventually};
use reqwest::StatusCode;

/// The user's key ids, as their own API lists them (newest first).
async fn key_ids(server: &Server, token: &str) -> Vec<String> {
    server.get_json("/api/keys", token).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits (bounded) until `key` is refused with 401.
async fn refused(server: &Server, key: &str, what: &str) {
    eventually(what, Duration::from_secs(10), async || {
        server.ping(key).await.status() == StatusCode::UNAUTHORIZED
    })
    .await;
}

/// The status of a user endpoint called with `token`.
async fn status(server: &Server, path: &str, token: &str) -> StatusCode {
    reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

const USER_PATHS: [&str; 6] = [
    "/api/usage/current",
    "/api/usage/history",
    "/api/usage/endpoints",
    "/api/usage/overage",
    "/api/usage/charges",
    "/api/keys",
];

async fn deleted_and_blocked_access_ends_within_the_poll(backend: Backend) {
    let db = Db::new(backend);
    // A cache TTL far longer than the test: only the poll can end a cached answer (before
    // this was fixed, each poll renewed it and a deleted key worked until restart).
    let server = db.start(&[
        ("KEY_REVOCATION_POLL_MS", "100"),
        ("API_KEY_CACHE_TTL_MS", "3600000"),
    ]);
    let (ada, ada_key) = db.user_with_key("ada@example.com", "pro");
    let ada_second = db.create(&["keys", "create", "--user", &ada, "--name", "second"]);
    let (bob, bob_key) = db.user_with_key("bob@example.com", "pro");
    let (cid, cid_key) = db.user_with_key("cid@example.com", "pro");
    let (dee, dee_key) = db.user_with_key("dee@example.com", "pro");
    let token = |user: &str| db.create(&["token", "--user", user]);
    let (ada_token, bob_token, cid_token, dee_token) =
        (token(&ada), token(&bob), token(&cid), token(&dee));
    // Every key is in use, so every answer is cached.
    for key in [&ada_key, &ada_second, &bob_key, &cid_key, &dee_key] {
        assert_eq!(server.ping(key).await.status(), StatusCode::OK);
    }
    let ada_ids = key_ids(&server, &ada_token).await;
    assert_eq!(ada_ids.len(), 2);

    // A key's row deleted by hand.
    let first_id = &ada_ids[1];
    db.sql(&format!("DELETE FROM eco_api_keys WHERE id = '{first_id}'"));
    refused(&server, &ada_key, "a key deleted by hand is refused").await;
    assert_eq!(server.ping(&ada_second).await.status(), StatusCode::OK);
    // `keys delete`.
    let second_id = &ada_ids[0];
    let out = db.cli(&[], &["keys", "delete", "--user", &ada, "--key", second_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(&server, &ada_second, "a key deleted by the CLI is refused").await;
    assert!(key_ids(&server, &ada_token).await.is_empty());
    let again = db.cli(&[], &["keys", "delete", "--user", &ada, "--key", second_id]);
    assert!(!again.status.success(), "deleting it twice is an error");

    // A user's row deleted by hand (SQLite: foreign keys off, as in the sqlite3 shell).
    db.sql(&format!("DELETE FROM eco_users WHERE id = '{bob}'"));
    refused(
        &server,
        &bob_key,
        "the key of a user deleted by hand is refused",
    )
    .await;
    // `users delete`.
    let out = db.cli(&[], &["users", "delete", "--user", &cid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        &server,
        &cid_key,
        "the key of a user deleted by the CLI is refused",
    )
    .await;
    // A token outlives its user: refused on every user endpoint.
    for token in [&bob_token, &cid_token] {
        for path in USER_PATHS {
            assert_eq!(
                status(&server, path, token).await,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
    }

    // `users block`: keys refused, tokens 403, no new key; unblocking lets the user in
    // again, the old keys staying revoked.
    let out = db.cli(&[], &["users", "block", "--user", &dee]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(&server, &dee_key, "a blocked user's key is refused").await;
    for path in USER_PATHS {
        assert_eq!(
            status(&server, path, &dee_token).await,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    let create = db.cli(&[], &["keys", "create", "--user", &dee]);
    assert!(!create.status.success(), "no key for a blocked user");
    assert!(String::from_utf8_lossy(&create.stderr).contains("blocked"));
    let out = db.cli(&[], &["users", "unblock", "--user", &dee]);
    assert!(out.status.success());
    assert_eq!(
        status(&server, "/api/usage/current", &dee_token).await,
        StatusCode::OK
    );
    assert_eq!(
        server.ping(&dee_key).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let fresh = db.create(&["keys", "create", "--user", &dee]);
    assert_eq!(server.ping(&fresh).await.status(), StatusCode::OK);

    let (status, _) = server.stop();
    assert!(status.success());
}

/// Rotating a revoked key issues nothing: 404, as for a key that is not the caller's.
async fn rotating_a_revoked_key_is_not_found(backend: Backend) {
    let db = Db::new(backend);
    let server = db.start(&[]);
    let (ada, _) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &ada]);
    let client = reqwest::Client::new();
    let id = key_ids(&server, &token).await.remove(0);
    let res = client
        .delete(server.url(&format!("/api/keys/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = client
        .post(server.url(&format!("/api/keys/{id}/rotate")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(key_ids(&server, &token).await.len(), 1, "no key was issued");
}

on_both_backends!(
    deleted_and_blocked_access_ends_within_the_poll,
    rotating_a_revoked_key_is_not_found,
);
