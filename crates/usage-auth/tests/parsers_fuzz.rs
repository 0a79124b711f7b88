//! Property tests of everything that parses a credential from a request: arbitrary input
//! never panics and is never accepted by accident.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use time::OffsetDateTime;
use usage_auth::admin::AdminList;
use usage_auth::jwt::{JwtConfig, JwtKeys};
use usage_auth::keys::{generate_api_key, hash_api_key, looks_like_api_key};
use usage_core::UserId;

fn keys() -> JwtKeys {
    JwtKeys::new(&JwtConfig {
        secret: b"property-secret-property-secret-12".to_vec(),
        audience: "authenticated".to_owned(),
        issuer: None,
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_text_as_a_token_is_refused(token in ".{0,400}") {
        prop_assert!(keys().verify(&token).is_err());
    }

    #[test]
    fn any_three_part_token_is_refused(a in "[A-Za-z0-9_-]{0,80}", b in "[A-Za-z0-9_-]{0,200}",
                                       c in "[A-Za-z0-9_-]{0,90}") {
        let token = format!("{a}.{b}.{c}");
        prop_assert!(keys().verify(&token).is_err());
    }

    #[test]
    fn a_valid_token_with_any_byte_changed_is_refused(index in 0usize..400, byte in 0u8..128) {
        let k = keys();
        let user = UserId::generate();
        let token = k.mint(&user, 600, OffsetDateTime::now_utc()).unwrap();
        let mut bytes = token.clone().into_bytes();
        let i = index % bytes.len();
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        // A change in base64 padding bits can decode to the same bytes: then the token is
        // the same token and may verify. Anything else must not.
        if let Ok(changed) = String::from_utf8(bytes)
            && let Ok(who) = k.verify(&changed)
        {
            prop_assert_eq!(who, user);
        }
    }

    #[test]
    fn key_shape_checks_and_hashing_never_panic(candidate in ".{0,300}") {
        let _ = looks_like_api_key(&candidate);
        let hash = hash_api_key(&candidate);
        prop_assert_eq!(hash.len(), 64);
    }

    #[test]
    fn ids_and_admin_lists_never_panic(text in ".{0,200}") {
        let _ = UserId::parse(&text);
        let _ = AdminList::parse(&text);
    }
}

#[test]
fn generated_keys_always_look_like_keys_and_hash_differently() {
    let mut hashes = std::collections::HashSet::new();
    for _ in 0..1_000 {
        let key = generate_api_key();
        assert!(looks_like_api_key(&key.plaintext));
        assert!(hashes.insert(hash_api_key(&key.plaintext)));
    }
}
