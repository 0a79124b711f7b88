//! `/metrics` in the Prometheus text format 0.0.4, through the `prometheus` crate: the
//! histograms the server observes (requests per route, batch writes), billing and
//! webhook counters, and the libraries' live figures read at each scrape.
//!
//! Names follow Prometheus conventions (base units, `_total` on counters); the names of
//! the hand-formatted text this replaced all still exist (docs/OPERATIONS.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use usage_auth::verify::KeyVerifier;
use usage_billing::{BillingSummary, WebhookError, WebhookOutcome};
use usage_core::Store;
use usage_core::quota::QuotaBook;
use usage_core::tracker::{BatchObserver, UsageTracker};
use usage_door::middleware::MeteringStats;

/// Every metric of one server.
pub(crate) struct Metrics {
    registry: Registry,
    requests: HistogramVec,
    batches: Arc<BatchMetrics>,
    billing_runs: IntCounterVec,
    billing_users: IntCounterVec,
    billing_cents: IntCounter,
    webhook_events: IntCounterVec,
    ingested_events: IntCounterVec,
}

/// Request latency buckets (seconds): 0.25 ms to 10 s.
const REQUEST_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Batch write buckets (seconds): 1 ms to 30 s.
const BATCH_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Batch size buckets (calls).
const BATCH_EVENTS_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0,
];

impl Metrics {
    /// A registry with every metric the server observes itself; [`Metrics::watch`] adds
    /// the live figures once the parts that keep them exist.
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = HistogramVec::new(
            HistogramOpts::new(
                "http_server_request_duration_seconds",
                "Time from a request's arrival to its response, by route pattern, method and status.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )?;
        let batches = Arc::new(BatchMetrics {
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "usage_tracker_flush_duration_seconds",
                    "Time of each successful batch write of usage events.",
                )
                .buckets(BATCH_SECONDS_BUCKETS.to_vec()),
            )?,
            events: Histogram::with_opts(
                HistogramOpts::new(
                    "usage_tracker_batch_events",
                    "Usage events per successful batch write.",
                )
                .buckets(BATCH_EVENTS_BUCKETS.to_vec()),
            )?,
        });
        let billing_runs = IntCounterVec::new(
            Opts::new(
                "usage_billing_runs_total",
                "Overage billing runs, by outcome (completed, dry_run, failed).",
            ),
            &["outcome"],
        )?;
        let billing_users = IntCounterVec::new(
            Opts::new(
                "usage_billing_users_total",
                "Users looked at by live billing runs, by result (charged, skipped, failed).",
            ),
            &["result"],
        )?;
        let billing_cents = IntCounter::new(
            "usage_billing_charged_cents_total",
            "Overage billed by live runs, in cents.",
        )?;
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "usage_stripe_webhook_events_total",
                "Stripe webhook deliveries, by outcome (applied, duplicate, stale, unknown_customer, unknown_price, ignored, invalid_signature, invalid_event, failed).",
            ),
            &["outcome"],
        )?;
        let ingested_events = IntCounterVec::new(
            Opts::new(
                "usage_ingested_events_total",
                "Events sent to POST /api/events, by outcome (accepted, duplicate, rejected).",
            ),
            &["outcome"],
        )?;
        for outcome in ["accepted", "duplicate", "rejected"] {
            ingested_events.with_label_values(&[outcome]);
        }
        // Every outcome is there from the start, at 0: a rate over a series that appears
        // only with its first event misses that event.
        for outcome in ["completed", "dry_run", "failed"] {
            billing_runs.with_label_values(&[outcome]);
        }
        for result in ["charged", "skipped", "failed"] {
            billing_users.with_label_values(&[result]);
        }
        for outcome in WEBHOOK_OUTCOMES {
            webhook_events.with_label_values(&[outcome]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(batches.duration.clone()))?;
        registry.register(Box::new(batches.events.clone()))?;
        registry.register(Box::new(billing_runs.clone()))?;
        registry.register(Box::new(billing_users.clone()))?;
        registry.register(Box::new(billing_cents.clone()))?;
        registry.register(Box::new(webhook_events.clone()))?;
        registry.register(Box::new(ingested_events.clone()))?;
        Ok(Self {
            registry,
            requests,
            batches,
            billing_runs,
            billing_users,
            billing_cents,
            webhook_events,
            ingested_events,
        })
    }

    /// What the tracker tells of each batch it stores.
    pub(crate) fn batch_observer(&self) -> Arc<dyn BatchObserver> {
        self.batches.clone()
    }

    /// Adds the figures read from these parts at each scrape.
    pub(crate) fn watch(&self, sources: Sources) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(LiveFigures::new(sources)?))
    }

    /// The latency series of requests to `route` with `method`, answered `status`.
    pub(crate) fn request_histogram(
        &self,
        route: &str,
        method: &str,
        status: &str,
    ) -> Option<Histogram> {
        self.requests
            .get_metric_with_label_values(&[route, method, status])
            .ok()
    }

    /// One billing run finished (or failed as a whole).
    pub(crate) fn billing_run<E>(&self, result: &Result<BillingSummary, E>) {
        let outcome = match result {
            Ok(summary) if summary.dry_run => "dry_run",
            Ok(_) => "completed",
            Err(_) => "failed",
        };
        self.billing_runs.with_label_values(&[outcome]).inc();
        if let Ok(summary) = result
            && !summary.dry_run
        {
            for (result, users) in [
                ("charged", summary.charged),
                ("skipped", summary.skipped),
                ("failed", summary.failed),
            ] {
                self.billing_users
                    .with_label_values(&[result])
                    .inc_by(users);
            }
            self.billing_cents
                .inc_by(u64::try_from(summary.amount_cents).unwrap_or(0));
        }
    }

    /// One webhook delivery handled (its outcome is one of [`WEBHOOK_OUTCOMES`]).
    pub(crate) fn webhook(&self, result: &Result<WebhookOutcome, WebhookError>) {
        let outcome = match result {
            Ok(outcome) => outcome.as_str(),
            Err(WebhookError::InvalidSignature(_)) => "invalid_signature",
            Err(WebhookError::InvalidEvent(_)) => "invalid_event",
            Err(WebhookError::Repo(_)) => "failed",
        };
        self.webhook_events.with_label_values(&[outcome]).inc();
    }

    /// What one batch of `POST /api/events` did.
    pub(crate) fn events_ingested(&self, answer: &usage_core::ingest::IngestAnswer) {
        let count = |outcome: &str, n: u64| {
            self.ingested_events.with_label_values(&[outcome]).inc_by(n);
        };
        count("accepted", answer.accepted);
        count("duplicate", answer.duplicates);
        count("rejected", answer.rejected.len() as u64);
    }

    /// The text Prometheus scrapes.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        // The text encoder fails only on a family it cannot write (none of ours).
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The outcomes a webhook delivery is counted under.
const WEBHOOK_OUTCOMES: [&str; 9] = [
    "applied",
    "duplicate",
    "stale",
    "unknown_customer",
    "unknown_price",
    "ignored",
    "invalid_signature",
    "invalid_event",
    "failed",
];

/// Batch write histograms, observed by the tracker's writer.
#[derive(Debug)]
struct BatchMetrics {
    duration: Histogram,
    events: Histogram,
}

impl BatchObserver for BatchMetrics {
    fn batch_stored(&self, events: usize, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        self.events.observe(events as f64);
    }
}

/// Where the live figures come from.
pub(crate) struct Sources {
    pub metering: Arc<MeteringStats>,
    pub tracker: UsageTracker,
    pub quota: Arc<QuotaBook>,
    pub verifier: Arc<KeyVerifier>,
    pub store: Arc<dyn Store>,
}

/// One family read at scrape time: its description, then its samples (label values and
/// value) from the sources.
struct Family {
    desc: Desc,
    kind: MetricType,
    samples: fn(&Sources) -> Vec<(&'static str, f64)>,
}

/// The figures the libraries keep in atomics, as counters and gauges.
struct LiveFigures {
    sources: Sources,
    families: Vec<Family>,
}

fn load(counter: &impl Count) -> f64 {
    counter.count() as f64
}

/// The libraries' counts: plain atomics, and the striped counters of the hot path.
trait Count {
    fn count(&self) -> u64;
}

impl Count for AtomicU64 {
    fn count(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Count for usage_core::counter::Counter {
    fn count(&self) -> u64 {
        self.get()
    }
}

/// A family without labels.
fn one(value: f64) -> Vec<(&'static str, f64)> {
    vec![("", value)]
}

impl LiveFigures {
    fn new(sources: Sources) -> Result<Self, prometheus::Error> {
        use MetricType::{COUNTER, GAUGE};
        type Samples = fn(&Sources) -> Vec<(&'static str, f64)>;
        let table: [(&str, &str, MetricType, Option<&str>, Samples); 18] = [
            (
                "usage_requests_total",
                "Metered API requests by outcome (the quota and rate decisions among them).",
                COUNTER,
                Some("outcome"),
                |s| {
                    let m = &s.metering;
                    vec![
                        ("admitted", load(&m.admitted)),
                        ("unauthorized", load(&m.unauthorized)),
                        ("quota_exceeded", load(&m.quota_rejected)),
                        ("rate_limited", load(&m.rate_limited)),
                        ("unavailable", load(&m.unavailable)),
                    ]
                },
            ),
            (
                "usage_quota_rejections_total",
                "Calls refused by the monthly quota.",
                COUNTER,
                None,
                |s| one(load(&s.metering.quota_rejected)),
            ),
            (
                "usage_tracker_queue_depth",
                "Admitted calls waiting to be written.",
                GAUGE,
                None,
                |s| one(s.tracker.queue_depth() as f64),
            ),
            (
                "usage_tracker_queue_capacity",
                "Calls the tracker queue holds before requests wait for room.",
                GAUGE,
                None,
                |s| one(s.tracker.queue_capacity() as f64),
            ),
            (
                "usage_tracker_oldest_waiting_seconds",
                "Age of the oldest admitted call not yet written (0 when none waits).",
                GAUGE,
                None,
                |s| one(s.tracker.oldest_waiting().map_or(0.0, |d| d.as_secs_f64())),
            ),
            (
                "usage_tracker_queue_full_total",
                "Times a request waited because the tracker queue was full.",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().queue_full_waits)),
            ),
            (
                "usage_tracker_events_flushed_total",
                "Usage events written to the database.",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().flushed)),
            ),
            (
                "usage_tracker_events_duplicate_total",
                "Replayed usage events the database already had.",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().duplicates)),
            ),
            (
                "usage_tracker_flush_failures_total",
                "Failed batch writes (each retried).",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().flush_failures)),
            ),
            (
                "usage_tracker_dead_letters_total",
                "Calls the store refused for good (unknown user or key), kept in eco_usage_dead_letters.",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().dead_letters)),
            ),
            (
                "usage_tracker_spool_failures_total",
                "Calls the durable spool could not write (kept in memory only).",
                COUNTER,
                None,
                |s| one(load(&s.tracker.stats().spool_failures)),
            ),
            (
                "usage_tracker_keys_remembered",
                "Keys whose last use the tracker remembers (used in the last minute or two).",
                GAUGE,
                None,
                |s| one(load(&s.tracker.stats().keys_remembered)),
            ),
            (
                "usage_quota_users_in_memory",
                "Users this instance holds quota state for (idle ones are forgotten).",
                GAUGE,
                None,
                |s| one(s.quota.users_in_memory() as f64),
            ),
            (
                "usage_api_key_cache_entries",
                "API key answers cached (known and unknown keys).",
                GAUGE,
                None,
                |s| one(s.verifier.cached() as f64),
            ),
            (
                "usage_api_key_lookups_total",
                "API keys checked, by where the answer came from (hit: the cache, miss: the database).",
                COUNTER,
                Some("result"),
                |s| {
                    let l = s.verifier.lookups();
                    vec![("hit", load(&l.hits)), ("miss", load(&l.misses))]
                },
            ),
            (
                "usage_db_pool_connections",
                "Open database connections, by state (idle, in_use).",
                GAUGE,
                Some("state"),
                |s| {
                    s.store.pool_state().map_or_else(Vec::new, |p| {
                        vec![
                            ("idle", f64::from(p.idle)),
                            ("in_use", f64::from(p.open.saturating_sub(p.idle))),
                        ]
                    })
                },
            ),
            (
                "usage_db_pool_max_connections",
                "Most database connections the pool opens.",
                GAUGE,
                None,
                |s| {
                    s.store
                        .pool_state()
                        .map_or_else(Vec::new, |p| one(f64::from(p.max)))
                },
            ),
            (
                "usage_server_info",
                "Always 1; the database backend this server uses as a label.",
                GAUGE,
                Some("backend"),
                |s| vec![(s.store.backend_name(), 1.0)],
            ),
        ];
        let families = table
            .into_iter()
            .map(|(name, help, kind, label, samples)| {
                let labels = label.map(str::to_owned).into_iter().collect();
                Ok(Family {
                    desc: Desc::new(name.into(), help.into(), labels, Default::default())?,
                    kind,
                    samples,
                })
            })
            .collect::<Result<_, prometheus::Error>>()?;
        Ok(Self { sources, families })
    }
}

impl Collector for LiveFigures {
    fn desc(&self) -> Vec<&Desc> {
        self.families.iter().map(|f| &f.desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families
            .iter()
            .map(|family| {
                let label = family.desc.variable_labels.first();
                let metrics = (family.samples)(&self.sources)
                    .into_iter()
                    .map(|(label_value, value)| {
                        let mut metric = proto::Metric::default();
                        if let Some(name) = label {
                            let mut pair = proto::LabelPair::default();
                            pair.set_name(name.clone());
                            pair.set_value(label_value.to_owned());
                            metric.set_label(vec![pair]);
                        }
                        if family.kind == MetricType::COUNTER {
                            let mut counter = proto::Counter::default();
                            counter.set_value(value);
                            metric.set_counter(counter);
                        } else {
                            let mut gauge = proto::Gauge::default();
                            gauge.set_value(value);
                            metric.set_gauge(gauge);
                        }
                        metric
                    })
                    .collect();
                let mut out = MetricFamily::default();
                out.set_name(family.desc.fq_name.clone());
                out.set_help(family.desc.help.clone());
                out.set_field_type(family.kind);
                out.set_metric(metrics);
                out
            })
            .collect()
    }
}
