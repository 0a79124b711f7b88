//! SQLite shared with another process: opening waits for a lock held elsewhere (the CLI's
//! last connection checkpointing as it closes, a backup) instead of failing at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use usage_store::PoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_waits_for_a_lock_held_by_another_connection() {
    let dir = std::env::temp_dir().join(format!("usage-sqlite-lock-{}", uuid::Uuid::now_v7()));
    let path = dir.join("usage.db");
    let url = format!("sqlite://{}", path.display());
    usage_store::migrate(&url).await.unwrap();

    // Another connection takes the whole file: in exclusive locking mode, its first
    // write keeps the lock until it closes, readers included.
    let mut other = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    other
        .batch_execute("PRAGMA locking_mode = EXCLUSIVE; BEGIN IMMEDIATE; COMMIT;")
        .unwrap();
    // The lock is held: a connection that does not wait is refused.
    let mut impatient = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    let refused = impatient
        .batch_execute("SELECT count(*) FROM sqlite_master;")
        .expect_err("the other connection holds the file");
    assert!(refused.to_string().contains("locked"), "{refused}");
    drop(impatient);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(other);
    });

    usage_store::migrate(&url).await.unwrap();
    let store = usage_store::open(&url, &PoolOptions::default())
        .await
        .unwrap();
    release.join().unwrap();
    let user = usage_core::UserId::generate();
    assert!(store.user_by_id(&user).await.unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}
