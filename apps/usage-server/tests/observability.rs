//! Following one call: `X-Request-Id` taken when well-formed, else generated, echoed on
//! every answer (metered, refused, unknown route), and carried by the log lines of the call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Backend, Db, eventually};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id_and_the_logs_follow_it() {
    let db = Db::new(Backend::Sqlite);
    let (_, key) = db.user_with_key("ada@example.com", "pro");
    let server = db.start(&[
        ("LOG_FORMAT", "json"),
        ("CRON_SECRET", "cron-secret-cron-secret-cron-secret"),
    ]);
    let client = reqwest::Client::new();
    let id_of = |res: &reqwest::Response| {
        res.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // A well-formed id is kept, on an admitted call and on a refused one.
    let res = client
        .get(server.url("/api/v1/ping"))
        .bearer_auth(&key)
        .header("X-Request-Id", "call-0001.abc_DEF")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (res.status().as_u16(), id_of(&res).as_deref()),
        (200, Some("call-0001.abc_DEF"))
    );
    let res = client
        .get(server.url("/api/v1/ping"))
        .header("X-Request-Id", "refused-call-7")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (res.status().as_u16(), id_of(&res).as_deref()),
        (401, Some("refused-call-7"))
    );
    // None, or a malformed one: a new UUID, different each time.
    let mut generated = Vec::new();
    for presented in [None, Some("not ok; id"), Some("")] {
        let mut req = client.get(server.url("/nowhere"));
        if let Some(id) = presented {
            req = req.header("X-Request-Id", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 404);
        let id = id_of(&res).unwrap();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        generated.push(id);
    }
    generated.dedup();
    assert_eq!(generated.len(), 3);

    // A call that logs (a wrong cron secret): its line carries the request's id.
    let res = client
        .post(server.url("/api/cron/process-overage"))
        .bearer_auth("wrong")
        .header("X-Request-Id", "cron-attempt-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    eventually(
        "the cron warning in the log",
        Duration::from_secs(10),
        async || {
            server
                .log()
                .iter()
                .any(|line| line.contains("cron-attempt-42"))
        },
    )
    .await;
    let line = server
        .log()
        .into_iter()
        .find(|l| l.contains("cron-attempt-42"))
        .unwrap();
    let json: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["span"]["name"], "request", "{json}");
    assert_eq!(json["span"]["id"], "cron-attempt-42", "{json}");
    assert!(
        json["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("cron call"),
        "{json}"
    );
}
