//! `X-Request-Id` on every request: the caller's when well-formed, else a new UUID v7,
//! echoed in the response, and the `request` span every log line of the call is in (so
//! one call can be followed through the JSON logs).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument;

/// The header, both ways.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id taken from a caller.
const MAX_LEN: usize = 128;

/// The caller's id when it is 1 to 128 of `A-Z a-z 0-9 . _ -` (a UUID, a ULID, a
/// proxy's token), else a new one: nothing else reaches the logs or the response.
pub(crate) fn request_id(presented: Option<&HeaderValue>) -> String {
    presented
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// The middleware (`actix_web::middleware::from_fn`).
pub(crate) async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = request_id(req.headers().get(&REQUEST_ID));
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.path());
    let mut res = next.call(req).instrument(span).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_are_kept_and_others_replaced() {
        let keep = |s: &str| request_id(Some(&HeaderValue::from_str(s).unwrap()));
        assert_eq!(
            keep("3f2b9c1e-7d4a-4b8e-9f00-1a2b3c4d5e6f"),
            "3f2b9c1e-7d4a-4b8e-9f00-1a2b3c4d5e6f"
        );
        assert_eq!(keep("req_01HX.abc-DEF"), "req_01HX.abc-DEF");
        for bad in ["", "has space", "semi;colon", "quote\"", &"a".repeat(129)] {
            let new = keep(bad);
            assert_ne!(new, bad);
            assert!(uuid::Uuid::parse_str(&new).is_ok(), "{new}");
        }
        assert!(uuid::Uuid::parse_str(&request_id(None)).is_ok());
        assert_eq!(keep(&"a".repeat(128)), "a".repeat(128));
    }
}
