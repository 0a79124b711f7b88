//! A local stand-in for Stripe's `POST /v1/invoiceitems` on a wiremock server: it checks
//! the secret key, keeps idempotency keys like Stripe (a repeated key gets the first
//! answer again, errors included), refuses chosen customers with 402, and can be told to
//! fail or stall the next requests.
//!
//! ```no_run
//! # async fn demo() {
//! let stripe = usage_fake_stripe::FakeStripe::start().await;
//! // Point STRIPE_API_BASE at stripe.uri() and STRIPE_SECRET_KEY at usage_fake_stripe::SECRET.
//! assert!(stripe.created().is_empty());
//! # }
//! ```
// Test support: a poisoned lock means a test already failed.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const SECRET: &str = "sk_test_fake_secret_123";

/// What the next request gets, before normal processing.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// Answer with this status (and Stripe's error body), creating nothing.
    Fail {
        status: u16,
        headers: Vec<(&'static str, String)>,
    },
    /// Create the item, but answer only after this delay (the client may have given up).
    ApplyThenStall(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    pub form: HashMap<String, String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// One item created.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub idempotency_key: String,
    pub customer: String,
    pub amount: i64,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    created: Vec<Created>,
    answers: HashMap<String, (u16, serde_json::Value)>,
    script: VecDeque<Scripted>,
    refused: HashMap<String, (u16, &'static str)>,
}

#[derive(Clone)]
struct Responder(Arc<Mutex<State>>);

impl Respond for Responder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let form: HashMap<String, String> =
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(&req.body)
                .unwrap_or_default()
                .into_iter()
                .collect();
        let received = Received {
            authorization: header("authorization"),
            idempotency_key: header("idempotency-key"),
            content_type: header("content-type"),
            form: form.clone(),
            at: std::time::Instant::now(),
        };
        let mut state = self.0.lock().unwrap();
        state.received.push(received.clone());
        if received.authorization.as_deref() != Some(&format!("Bearer {SECRET}")) {
            return error(401, "invalid_api_key", "Invalid API Key provided");
        }
        let Some(key) = received.idempotency_key else {
            return error(400, "missing_idempotency_key", "this fake wants a key");
        };
        let stall = match state.script.pop_front() {
            Some(Scripted::Fail { status, headers }) => {
                let mut answer = error(status, "api_error", "scripted failure");
                for (name, value) in headers {
                    answer = answer.insert_header(name, value.as_str());
                }
                return answer;
            }
            Some(Scripted::ApplyThenStall(delay)) => Some(delay),
            None => None,
        };
        if let Some((status, body)) = state.answers.get(&key) {
            return ResponseTemplate::new(*status)
                .set_body_json(body.clone())
                .insert_header("idempotent-replayed", "true");
        }
        let customer = form.get("customer").cloned().unwrap_or_default();
        let (status, body) = if let Some((status, code)) = state.refused.get(&customer) {
            (
                *status,
                serde_json::json!({"error": {"type": "card_error", "code": code,
                                             "message": "Your card was declined."}}),
            )
        } else {
            let id = format!("ii_fake{}", state.created.len() + 1);
            let amount = form
                .get("amount")
                .and_then(|a| a.parse().ok())
                .unwrap_or(-1);
            state.created.push(Created {
                id: id.clone(),
                idempotency_key: key.clone(),
                customer,
                amount,
                form,
            });
            (
                200,
                serde_json::json!({"id": id, "object": "invoiceitem", "amount": amount}),
            )
        };
        state.answers.insert(key, (status, body.clone()));
        let answer = ResponseTemplate::new(status).set_body_json(body);
        match stall {
            Some(delay) => answer.set_delay(delay),
            None => answer,
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(
        serde_json::json!({"error": {"type": "api_error", "code": code, "message": message}}),
    )
}

/// The fake and its recordings.
pub struct FakeStripe {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
}

impl FakeStripe {
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(method("POST"))
            .and(path("/v1/invoiceitems"))
            .respond_with(Responder(Arc::clone(&state)))
            .mount(&server)
            .await;
        Self { server, state }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Queues what the next requests get.
    pub fn script(&self, steps: impl IntoIterator<Item = Scripted>) {
        self.state.lock().unwrap().script.extend(steps);
    }

    /// Stripe refuses items for `customer` with 402 `card_declined`.
    pub fn refuse(&self, customer: &str) {
        self.state
            .lock()
            .unwrap()
            .refused
            .insert(customer.to_owned(), (402, "card_declined"));
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The `Idempotency-Key` of every request received, in order.
    pub fn idempotency_keys(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .map(|r| r.idempotency_key.unwrap_or_default())
            .collect()
    }

    pub fn created(&self) -> Vec<Created> {
        self.state.lock().unwrap().created.clone()
    }
}
