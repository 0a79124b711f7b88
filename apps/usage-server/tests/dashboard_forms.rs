//! The dashboard's forms as a hostile or unlucky client sends them, without a browser:
//! same-origin posts only (`PUBLIC_URL`'s origin, scheme included), sign-in links used up
//! by the POST of their page and not by a GET, a key form posted twice making one key,
//! blocked users signed out, and an icon (`../shared/API.md`, "Hardening rules").
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, hidden, no_redirects as client, session_of};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, LOCATION};

async fn forms_come_from_this_origin_only(backend: Backend) {
    let db = Db::new(backend);
    let (user, _) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &user]);
    let server = db.start(&[]);
    let http = client();
    let post = |origin: Option<&str>, fetch_site: Option<&str>| {
        let mut req = http
            .post(server.url("/dashboard/session"))
            .form(&[("token", token.as_str())]);
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        if let Some(site) = fetch_site {
            req = req.header("Sec-Fetch-Site", site);
        }
        req.send()
    };
    let base = server.base.clone();
    let host = base.trim_start_matches("http://");
    let refused: [(Option<String>, Option<&str>); 8] = [
        (Some("null".to_owned()), None),
        (Some("null".to_owned()), Some("same-origin")),
        (Some(format!("evil://{host}")), None),
        (Some(format!("https://{host}")), None),
        (
            Some("http://attacker.example".to_owned()),
            Some("same-origin"),
        ),
        (None, None),
        (None, Some("cross-site")),
        (None, Some("none")),
    ];
    for (origin, site) in refused.iter().map(|(o, s)| (o.as_deref(), *s)) {
        let res = post(origin, site).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{origin:?} {site:?}");
        assert_eq!(session_of(&res), None, "{origin:?} {site:?}");
    }
    for (origin, site) in [(Some(base.as_str()), None), (None, Some("same-origin"))] {
        let res = post(origin, site).await.unwrap();
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{origin:?} {site:?}");
        assert!(session_of(&res).is_some(), "{origin:?} {site:?}");
    }
    let (status, _) = server.stop();
    assert!(status.success());

    // With PUBLIC_URL set, its origin is the one: the server's own address is not.
    let public = "https://usage.example.com";
    let server = db.start(&[("PUBLIC_URL", public)]);
    let post = |origin: &'static str| {
        client()
            .post(server.url("/dashboard/session"))
            .header("Origin", origin)
            .form(&[("token", token.as_str())])
            .send()
    };
    assert_eq!(post(public).await.unwrap().status(), StatusCode::SEE_OTHER);
    assert_eq!(
        post("http://usage.example.com").await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "the scheme counts"
    );
    let (status, _) = server.stop();
    assert!(status.success());
}

async fn a_sign_in_link_is_used_up_by_its_post_not_by_a_get(backend: Backend) {
    let db = Db::new(backend);
    let (user, _) = db.user_with_key("ada@example.com", "pro");
    let server = db.start(&[]);
    let url = db.create(&["login-link", "--user", &user]);
    let token = url.split("token=").nth(1).unwrap().to_owned();
    let link = server.url(&format!("/dashboard/login?token={token}"));
    let http = client();
    // Mail scanners open links, some more than once: nothing is used up.
    for _ in 0..2 {
        let res = http.get(&link).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(session_of(&res), None);
        let page = res.text().await.unwrap();
        assert!(page.contains("action=\"/dashboard/login\""), "{page}");
        assert_eq!(hidden(&page, "token"), token);
    }
    let sign_in = || {
        http.post(server.url("/dashboard/login"))
            .header("Origin", &server.base)
            .form(&[("token", token.as_str())])
            .send()
    };
    // From another site: refused, and the link is still good.
    let res = http
        .post(server.url("/dashboard/login"))
        .header("Origin", "http://attacker.example")
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = sign_in().await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(res.headers()[LOCATION], "/dashboard");
    assert!(session_of(&res).is_some());
    // Once.
    let again = sign_in().await.unwrap();
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(session_of(&again), None);
    let (status, _) = server.stop();
    assert!(status.success());
}

async fn a_key_form_posted_twice_makes_one_key(backend: Backend) {
    let db = Db::new(backend);
    let (user, _) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &user]);
    let server = db.start(&[]);
    let http = client();
    let signed_in = http
        .post(server.url("/dashboard/session"))
        .header("Origin", &server.base)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = session_of(&signed_in).unwrap();
    let keys_page = server.page("/dashboard/keys", &cookie).await;
    let (csrf, form_id) = (hidden(&keys_page, "csrf"), hidden(&keys_page, "form_id"));
    let submit = || {
        http.post(server.url("/dashboard/keys"))
            .header("Cookie", &cookie)
            .header("Origin", &server.base)
            .form(&[
                ("csrf", csrf.as_str()),
                ("form_id", form_id.as_str()),
                ("name", "twice"),
            ])
            .send()
    };
    let first = submit().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.text().await.unwrap().contains("eco_live_"));
    // The browser's reload posts the same form again: nothing new, and it says so.
    let second = submit().await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let page = second.text().await.unwrap();
    assert!(page.contains("sent before"), "{page}");
    assert!(
        !page.contains("id=\"new-key\""),
        "the key is not shown again"
    );
    let listed = server.get_json("/api/keys", &token).await;
    let named_twice = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "twice")
        .count();
    assert_eq!(named_twice, 1);
    // A new page's form makes a new key.
    let fresh = server.page("/dashboard/keys", &cookie).await;
    assert_ne!(hidden(&fresh, "form_id"), form_id);

    // Blocked: the session no longer opens the dashboard.
    let out = db.cli(&[], &["users", "block", "--user", &user]);
    assert!(out.status.success());
    let page = server.page("/dashboard", &cookie).await;
    assert!(page.contains("<title>Sign in"), "{page}");
    // Signing in again is refused, and says why.
    let again = http
        .post(server.url("/dashboard/session"))
        .header("Origin", &server.base)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::FORBIDDEN);
    assert_eq!(session_of(&again), None);
    assert!(again.text().await.unwrap().contains("blocked"));
    let (status, _) = server.stop();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_has_an_icon() {
    let db = Db::new(Backend::Sqlite);
    let server = db.start(&[]);
    for path in ["/favicon.ico", "/dashboard/assets/icon.svg"] {
        let res = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert_eq!(res.headers()[CONTENT_TYPE], "image/svg+xml", "{path}");
        assert!(res.text().await.unwrap().starts_with("<svg"), "{path}");
    }
    let page = server.page("/dashboard", "").await;
    assert!(page.contains("rel=\"icon\""), "{page}");
    let (status, _) = server.stop();
    assert!(status.success());
}

on_both_backends!(
    forms_come_from_this_origin_only,
    a_sign_in_link_is_used_up_by_its_post_not_by_a_get,
    a_key_form_posted_twice_makes_one_key,
);
