//! A deadline on request bodies: a body that has not arrived whole within
//! `REQUEST_BODY_TIMEOUT_SECS` of the request's start ends the request with 408 and closes
//! the connection. Headers have their own timeout (actix's `client_request_timeout`);
//! without this, a client announcing a body and sending it a byte at a time would hold a
//! connection, and a file descriptor, for as long as it likes.
//!
//! Wrapped around the routes that read bodies, not around the metered API (whose handlers
//! read none: actix answers and closes such a connection without waiting for its body).

use std::cell::Cell;
use std::future::Future;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::error::PayloadError;
use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use actix_web::web::Bytes;
use actix_web::{Error, HttpMessage as _, ResponseError};
use futures_util::Stream;
use futures_util::future::LocalBoxFuture;

use crate::ApiError;

/// The middleware: see the module's documentation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline {
    limit: Duration,
}

impl BodyDeadline {
    /// Bodies must arrive within `limit` of the request's start.
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S, B> Transform<S, ServiceRequest> for BodyDeadline
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = BodyDeadlineService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(BodyDeadlineService {
            service: Rc::new(service),
            limit: self.limit,
        }))
    }
}

/// [`BodyDeadline`] around a service.
pub(crate) struct BodyDeadlineService<S> {
    service: Rc<S>,
    limit: Duration,
}

/// Whether the request announces a body (a length other than 0, or chunks).
fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// The 408 of a body too slow: the connection closes after it.
fn body_timeout(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "The request body did not arrive within {} s (REQUEST_BODY_TIMEOUT_SECS).",
            limit.as_secs()
        ),
    )
}

impl<S, B> Service<ServiceRequest> for BodyDeadlineService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        if !has_body(&req) {
            return Box::pin(async move { Ok(service.call(req).await?.map_into_left_body()) });
        }
        let expired = Rc::new(Cell::new(false));
        let body = DeadlineBody {
            inner: req.take_payload(),
            deadline: Box::pin(tokio::time::sleep(self.limit)),
            expired: Rc::clone(&expired),
        };
        let body: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(body);
        req.set_payload(Payload::from(body));
        let limit = self.limit;
        Box::pin(async move {
            let response = service.call(req).await?;
            if !expired.get() {
                return Ok(response.map_into_left_body());
            }
            // Whatever the handler made of the failed read, the answer is the deadline's.
            tracing::info!(
                path = response.request().path(),
                "request body too slow: 408"
            );
            let mut timeout = body_timeout(limit).error_response();
            timeout
                .head_mut()
                .set_connection_type(actix_web::http::ConnectionType::Close);
            Ok(response.into_response(timeout).map_into_right_body())
        })
    }
}

/// The request's body, ending in an error once the deadline passes.
struct DeadlineBody {
    inner: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Rc<Cell<bool>>,
}

impl Stream for DeadlineBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.expired.get() {
            return Poll::Ready(None);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired.set(true);
                Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request body deadline passed",
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
