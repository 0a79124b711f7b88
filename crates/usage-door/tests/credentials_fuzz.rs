//! Property tests of reading a bearer credential from request headers: any header value
//! never panics, and what comes out is always the trimmed, non-empty part after a Bearer
//! scheme.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use actix_web::http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use proptest::prelude::*;
use usage_door::middleware::bearer_credential;

fn with_authorization(value: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    headers
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn any_header_bytes_give_a_clean_credential_or_an_error(
        prefix in prop::sample::select(vec!["", "Bearer ", "bEaReR  ", "Bearer", "Basic "]),
        tail in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "[ -~]{0,200}".prop_map(String::into_bytes),
        ],
    ) {
        let bytes = [prefix.as_bytes(), &tail].concat();
        // Bytes an HTTP parser would never hand over (line breaks, NUL) are refused here.
        let Ok(value) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
        let headers = with_authorization(value);
        if let Ok(credential) = bearer_credential(&headers) {
            let text = std::str::from_utf8(&bytes).unwrap();
            let (scheme, rest) = text.split_once(' ').unwrap();
            prop_assert!(scheme.eq_ignore_ascii_case("bearer"));
            prop_assert_eq!(credential, rest.trim());
            prop_assert!(!credential.is_empty());
        }
    }

    #[test]
    fn a_bearer_credential_comes_back_whatever_the_spacing_and_case(
        scheme in "[bB][eE][aA][rR][eE][rR]",
        before in " {1,3}",
        credential in "[!-~]{1,200}",
        after in " {0,3}",
    ) {
        let value = format!("{scheme}{before}{credential}{after}");
        let headers = with_authorization(HeaderValue::from_str(&value).unwrap());
        prop_assert_eq!(bearer_credential(&headers), Ok(credential.as_str()));
    }

    #[test]
    fn other_schemes_are_refused(
        scheme in "[A-Za-z]{1,12}".prop_filter("not bearer", |s| !s.eq_ignore_ascii_case("bearer")),
        credential in "[!-~]{1,100}",
    ) {
        let headers = with_authorization(HeaderValue::from_str(&format!("{scheme} {credential}")).unwrap());
        prop_assert!(bearer_credential(&headers).is_err());
    }
}

#[test]
fn a_missing_or_empty_credential_is_refused() {
    assert!(bearer_credential(&HeaderMap::new()).is_err());
    for value in ["", "Bearer", "Bearer ", "Bearer    ", "eco_live_abc"] {
        let headers = with_authorization(HeaderValue::from_str(value).unwrap());
        assert!(bearer_credential(&headers).is_err(), "{value:?}");
    }
}
