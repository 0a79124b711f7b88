//! User JWTs: HS256 with a pinned algorithm, `exp` required, `aud` checked.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use usage_core::UserId;

use crate::AuthError;

/// Shortest secret accepted (HS256 wants at least 256 bits of key).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest token lifetime that can be configured: one year.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;
/// Longest lifetime accepted by default (`JWT_MAX_TTL_SECS`): 30 days. A token whose
/// `exp` lies further ahead is refused, whoever signed it: a leaked token must not work
/// for ever.
pub const DEFAULT_MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// JWT settings, read once from configuration.
#[derive(Clone)]
pub struct JwtConfig {
    /// `JWT_SECRET`.
    pub secret: Vec<u8>,
    /// `JWT_AUDIENCE` (default `authenticated`).
    pub audience: String,
    /// `JWT_ISSUER`, checked when set.
    pub issuer: Option<String>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"***")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// The claims nexus-usage reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    iat: i64,
    aud: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
}

/// What verification reads from a token's claims.
#[derive(Deserialize)]
struct Subject {
    sub: String,
    exp: i64,
}

/// Signs and verifies user tokens.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    audience: String,
    issuer: Option<String>,
    max_ttl_secs: u64,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Keys for `config`; refuses a secret shorter than [`MIN_SECRET_LEN`].
    pub fn new(config: &JwtConfig) -> Result<Self, AuthError> {
        if config.secret.len() < MIN_SECRET_LEN {
            return Err(AuthError::WeakSecret {
                name: "JWT_SECRET",
                min: MIN_SECRET_LEN,
            });
        }
        // The algorithm is pinned here, never taken from a token's header.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = LEEWAY_SECS;
        // `nbf` is optional, but a token that carries one is not valid before it.
        validation.validate_nbf = true;
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(&config.secret),
            decoding: DecodingKey::from_secret(&config.secret),
            validation,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            max_ttl_secs: DEFAULT_MAX_TTL_SECS,
        })
    }

    /// The same keys accepting and minting lifetimes up to `max_ttl_secs` (1 to
    /// [`MAX_TTL_SECS`]; the default is [`DEFAULT_MAX_TTL_SECS`]).
    pub fn with_max_ttl(mut self, max_ttl_secs: u64) -> Result<Self, AuthError> {
        if !(1..=MAX_TTL_SECS).contains(&max_ttl_secs) {
            return Err(AuthError::InvalidTtl {
                max: MAX_TTL_SECS,
                got: max_ttl_secs,
            });
        }
        self.max_ttl_secs = max_ttl_secs;
        Ok(self)
    }

    /// The longest lifetime a token may have.
    pub fn max_ttl_secs(&self) -> u64 {
        self.max_ttl_secs
    }

    /// A token for `user_id`, valid for `ttl_secs` from `now`.
    ///
    /// ```
    /// use usage_auth::jwt::{JwtConfig, JwtKeys};
    /// let keys = JwtKeys::new(&JwtConfig {
    ///     secret: b"0123456789abcdef0123456789abcdef".to_vec(),
    ///     audience: "authenticated".into(),
    ///     issuer: None,
    /// }).unwrap();
    /// let user = usage_core::UserId::generate();
    /// let token = keys.mint(&user, 3600, time::OffsetDateTime::now_utc()).unwrap();
    /// assert_eq!(keys.verify(&token).unwrap(), user);
    /// ```
    pub fn mint(
        &self,
        user_id: &UserId,
        ttl_secs: u64,
        now: OffsetDateTime,
    ) -> Result<String, AuthError> {
        if !(1..=self.max_ttl_secs).contains(&ttl_secs) {
            return Err(AuthError::InvalidTtl {
                max: self.max_ttl_secs,
                got: ttl_secs,
            });
        }
        let ttl = Duration::seconds(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now.unix_timestamp(),
            exp: (now + ttl).unix_timestamp(),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))
    }

    /// The user a valid token names. Any fault (signature, algorithm, expiry, an `exp`
    /// more than the maximum lifetime ahead, audience, issuer, shape of `sub`) is an
    /// [`AuthError::InvalidToken`].
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_at(token, OffsetDateTime::now_utc())
    }

    /// As [`JwtKeys::verify`], the lifetime measured from `now` (the signature's library
    /// checks expiry on the system clock).
    pub fn verify_at(&self, token: &str, now: OffsetDateTime) -> Result<UserId, AuthError> {
        // Only `sub` is read into a struct: `exp`, `aud` and `iss` are checked by the
        // validation on the raw claims, so tokens from other issuers (no `iat`, `aud` as an
        // array, extra claims) verify as long as they follow the contract.
        let data = jsonwebtoken::decode::<Subject>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let latest = now
            .unix_timestamp()
            .saturating_add_unsigned(self.max_ttl_secs + LEEWAY_SECS);
        if data.claims.exp > latest {
            return Err(AuthError::InvalidToken(format!(
                "exp lies more than {} s ahead (JWT_MAX_TTL_SECS)",
                self.max_ttl_secs
            )));
        }
        UserId::parse(&data.claims.sub).map_err(|e| AuthError::InvalidToken(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &[u8], audience: &str) -> JwtKeys {
        JwtKeys::new(&JwtConfig {
            secret: secret.to_vec(),
            audience: audience.to_owned(),
            issuer: None,
        })
        .unwrap()
    }

    const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

    #[test]
    fn round_trip_and_refusals() {
        let k = keys(SECRET, "authenticated");
        let user = UserId::generate();
        let now = OffsetDateTime::now_utc();
        let token = k.mint(&user, 60, now).unwrap();
        assert_eq!(k.verify(&token).unwrap(), user);

        let other_secret = keys(b"another-secret-another-secret-12345", "authenticated");
        assert!(other_secret.verify(&token).is_err());
        let other_aud = keys(SECRET, "service");
        assert!(other_aud.verify(&token).is_err());

        let expired = k.mint(&user, 1, now - Duration::hours(1)).unwrap();
        assert!(matches!(
            k.verify(&expired),
            Err(AuthError::InvalidToken(_))
        ));
        assert!(k.verify("not.a.jwt").is_err());
        assert!(k.mint(&user, 0, now).is_err());
        assert!(k.mint(&user, DEFAULT_MAX_TTL_SECS + 1, now).is_err());
        assert!(k.clone().with_max_ttl(MAX_TTL_SECS + 1).is_err());
        let yearly = k.clone().with_max_ttl(MAX_TTL_SECS).unwrap();
        assert!(yearly.mint(&user, MAX_TTL_SECS, now).is_ok());
    }

    #[test]
    fn an_exp_past_the_maximum_lifetime_is_refused() {
        let k = keys(SECRET, "authenticated");
        let user = UserId::generate();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let token = |exp: i64| {
            let claims = Claims {
                sub: user.to_string(),
                exp,
                iat: now,
                aud: "authenticated".to_owned(),
                iss: None,
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let max = DEFAULT_MAX_TTL_SECS as i64;
        assert_eq!(k.verify(&token(now + max)).unwrap(), user, "at the maximum");
        // The year 5138, as a probe sent: refused, and by a shorter maximum too.
        assert!(k.verify(&token(99_999_999_999)).is_err());
        assert!(k.verify(&token(now + max + 3_600)).is_err());
        let hourly = k.clone().with_max_ttl(3_600).unwrap();
        assert!(hourly.verify(&token(now + max)).is_err());
        assert_eq!(hourly.verify(&token(now + 600)).unwrap(), user);
    }

    #[test]
    fn a_token_is_not_valid_before_its_nbf() {
        #[derive(Serialize)]
        struct WithNbf {
            sub: String,
            exp: i64,
            nbf: i64,
            aud: &'static str,
        }
        let k = keys(SECRET, "authenticated");
        let user = UserId::generate();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let token = |nbf: i64| {
            let claims = WithNbf {
                sub: user.to_string(),
                exp: now + 3600,
                nbf,
                aud: "authenticated",
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let leeway = LEEWAY_SECS as i64;
        assert_eq!(k.verify(&token(now - 60)).unwrap(), user, "nbf passed");
        assert_eq!(
            k.verify(&token(now + leeway - 5)).unwrap(),
            user,
            "within the leeway"
        );
        let err = k.verify(&token(now + leeway + 600)).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidToken(m) if m.contains("ImmatureSignature")),
            "{err:?}"
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let k = keys(SECRET, "authenticated");
        let user = UserId::generate();
        let exp = OffsetDateTime::now_utc().unix_timestamp() + 600;
        let header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = base64_url(
            format!(r#"{{"sub":"{user}","exp":{exp},"aud":"authenticated"}}"#).as_bytes(),
        );
        assert!(k.verify(&format!("{header}.{payload}.")).is_err());
    }

    /// Minimal unpadded base64url, enough to forge test tokens.
    fn base64_url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    /// HMAC-SHA256 (RFC 2104) written out with `sha2` alone, so that the tokens below are
    /// signed by code that shares nothing with `jsonwebtoken`.
    fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .to_vec()
    }

    fn foreign_token(header: &str, claims: &str, secret: &[u8]) -> String {
        let signing_input = format!(
            "{}.{}",
            base64_url(header.as_bytes()),
            base64_url(claims.as_bytes())
        );
        let signature = base64_url(&hmac_sha256(secret, signing_input.as_bytes()));
        format!("{signing_input}.{signature}")
    }

    #[test]
    fn tokens_from_other_jwt_libraries_verify() {
        let k = keys(SECRET, "authenticated");
        let user = UserId::generate();
        let exp = OffsetDateTime::now_utc().unix_timestamp() + 600;
        // Shapes seen from identity providers: no `iat`, a `kid`, `aud` as an array,
        // extra claims, no `typ`.
        let accepted = [
            (
                r#"{"alg":"HS256","typ":"JWT"}"#.to_owned(),
                format!(r#"{{"sub":"{user}","exp":{exp},"aud":"authenticated"}}"#),
            ),
            (
                r#"{"alg":"HS256","kid":"k1"}"#.to_owned(),
                format!(
                    r#"{{"aud":["authenticated","other"],"exp":{exp},"sub":"{user}","role":"authenticated","email":"a@b.c","iat":1}}"#
                ),
            ),
        ];
        for (header, claims) in &accepted {
            let token = foreign_token(header, claims, SECRET);
            assert_eq!(k.verify(&token).unwrap(), user, "{claims}");
        }
        let refused = [
            // No `exp`.
            (
                r#"{"alg":"HS256"}"#.to_owned(),
                format!(r#"{{"sub":"{user}","aud":"authenticated"}}"#),
            ),
            // No `aud`.
            (
                r#"{"alg":"HS256"}"#.to_owned(),
                format!(r#"{{"sub":"{user}","exp":{exp}}}"#),
            ),
            // Another HMAC algorithm, signed with the right secret.
            (
                r#"{"alg":"HS384"}"#.to_owned(),
                format!(r#"{{"sub":"{user}","exp":{exp},"aud":"authenticated"}}"#),
            ),
            // `sub` that is not a user id.
            (
                r#"{"alg":"HS256"}"#.to_owned(),
                format!(r#"{{"sub":"admin","exp":{exp},"aud":"authenticated"}}"#),
            ),
        ];
        for (header, claims) in &refused {
            let token = foreign_token(header, claims, SECRET);
            assert!(k.verify(&token).is_err(), "{header} {claims}");
        }
        // The independent signer agrees with jsonwebtoken: a wrong secret is refused.
        let (header, claims) = &accepted[0];
        let token = foreign_token(header, claims, b"another-secret-another-secret-12345");
        assert!(k.verify(&token).is_err());
    }

    #[test]
    fn a_token_lives_at_most_its_maximum_thirty_days_by_default() {
        let (user, now) = (UserId::generate(), OffsetDateTime::now_utc());
        const MONTH: u64 = 30 * 86_400;
        let k = keys(SECRET, "authenticated");
        let token = k.mint(&user, MONTH, now).unwrap();
        assert_eq!(k.verify(&token).unwrap(), user);
        assert!(matches!(
            k.mint(&user, MONTH + 1, now),
            Err(AuthError::InvalidTtl { max: MONTH, got }) if got == MONTH + 1
        ));
        // Configured up to a year, no further.
        const YEAR: u64 = 365 * 86_400;
        let yearly = keys(SECRET, "authenticated").with_max_ttl(YEAR).unwrap();
        let token = yearly.mint(&user, YEAR, now).unwrap();
        assert_eq!(yearly.verify(&token).unwrap(), user);
        assert!(
            k.verify(&token).is_err(),
            "a year-long token is refused by default"
        );
        assert!(matches!(
            yearly.mint(&user, YEAR + 1, now),
            Err(AuthError::InvalidTtl { max: YEAR, got }) if got == YEAR + 1
        ));
    }

    #[test]
    fn settings_and_keys_debug_without_the_secret() {
        let config = JwtConfig {
            secret: b"a-secret-that-must-never-be-printed".to_vec(),
            audience: "authenticated".into(),
            issuer: Some("https://issuer.example".into()),
        };
        let keys = JwtKeys::new(&config).unwrap();
        for text in [format!("{config:?}"), format!("{keys:?}")] {
            assert!(text.contains("authenticated"), "{text}");
            assert!(!text.contains("never-be-printed"), "{text}");
        }
        assert!(format!("{config:?}").starts_with("JwtConfig {"));
        assert!(format!("{config:?}").contains("https://issuer.example"));
        assert!(format!("{keys:?}").starts_with("JwtKeys {"));
    }

    #[test]
    fn short_secrets_are_refused() {
        let err = JwtKeys::new(&JwtConfig {
            secret: b"short".to_vec(),
            audience: "authenticated".into(),
            issuer: None,
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "JWT_SECRET must be at least 32 bytes long");
    }
}
