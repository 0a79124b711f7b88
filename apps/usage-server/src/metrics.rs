//! `/metrics` in the Prometheus text format, from the live counters of the middleware
//! and the tracker.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use usage_auth::verify::KeyVerifier;
use usage_core::middleware::MeteringStats;
use usage_core::quota::QuotaBook;
use usage_core::tracker::UsageTracker;

/// Where the figures come from.
pub(crate) struct Sources<'a> {
    pub metering: &'a MeteringStats,
    pub tracker: &'a UsageTracker,
    pub quota: &'a QuotaBook,
    pub verifier: &'a KeyVerifier,
}

/// Renders every metric.
pub(crate) fn render(sources: &Sources<'_>) -> String {
    let Sources {
        metering,
        tracker,
        quota,
        verifier,
    } = *sources;
    let mut out = String::with_capacity(2_048);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);

    family(
        &mut out,
        "usage_requests_total",
        "counter",
        "Metered API requests by outcome.",
    );
    for (outcome, value) in [
        ("admitted", load(&metering.admitted)),
        ("unauthorized", load(&metering.unauthorized)),
        ("quota_exceeded", load(&metering.quota_rejected)),
        ("rate_limited", load(&metering.rate_limited)),
        ("unavailable", load(&metering.unavailable)),
    ] {
        let _ = writeln!(out, "usage_requests_total{{outcome=\"{outcome}\"}} {value}");
    }
    let stats = tracker.stats();
    let flush_seconds = load(&stats.flush_micros) as f64 / 1e6;
    let samples: [(&str, &str, &str, String); 13] = [
        (
            "usage_quota_rejections_total",
            "counter",
            "Calls refused by the monthly quota.",
            load(&metering.quota_rejected).to_string(),
        ),
        (
            "usage_tracker_queue_depth",
            "gauge",
            "Admitted calls waiting to be written.",
            tracker.queue_depth().to_string(),
        ),
        (
            "usage_tracker_queue_full_total",
            "counter",
            "Times a request waited because the tracker queue was full.",
            load(&stats.queue_full_waits).to_string(),
        ),
        (
            "usage_tracker_events_flushed_total",
            "counter",
            "Usage events written to the database.",
            load(&stats.flushed).to_string(),
        ),
        (
            "usage_tracker_events_duplicate_total",
            "counter",
            "Replayed usage events the database already had.",
            load(&stats.duplicates).to_string(),
        ),
        (
            "usage_tracker_flush_failures_total",
            "counter",
            "Failed batch writes (each retried).",
            load(&stats.flush_failures).to_string(),
        ),
        (
            "usage_quota_users_in_memory",
            "gauge",
            "Users this instance holds quota state for (idle ones are forgotten).",
            quota.users_in_memory().to_string(),
        ),
        (
            "usage_api_key_cache_entries",
            "gauge",
            "API key answers cached (known and unknown keys).",
            verifier.cached().to_string(),
        ),
        (
            "usage_tracker_keys_remembered",
            "gauge",
            "Keys whose last use the tracker remembers (used in the last minute or two).",
            load(&stats.keys_remembered).to_string(),
        ),
        (
            "usage_tracker_dead_letters_total",
            "counter",
            "Calls the store refused for good (unknown user or key), kept in eco_usage_dead_letters.",
            load(&stats.dead_letters).to_string(),
        ),
        (
            "usage_tracker_spool_failures_total",
            "counter",
            "Calls the durable spool could not write (kept in memory only).",
            load(&stats.spool_failures).to_string(),
        ),
        (
            "usage_tracker_flush_duration_seconds_sum",
            "counter",
            "Total time of successful batch writes.",
            format!("{flush_seconds:.6}"),
        ),
        (
            "usage_tracker_flush_duration_seconds_count",
            "counter",
            "Successful batch writes.",
            load(&stats.flushes).to_string(),
        ),
    ];
    for (name, kind, help, value) in samples {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
