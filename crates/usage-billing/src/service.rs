//! The overage billing run: what to bill, the charge ledger, Stripe, and reconciliation.
//!
//! A charge bills the overage calls between what a period has invoiced (`calls_from`) and
//! its overage now (`calls_to`). Its amount is what the period's calls cost under the terms
//! the user holds for the period (the plan version and their own terms, from the catalog),
//! less what the period's charges already invoiced, never below zero: a change of terms
//! prices the whole period anew, and never takes back what was billed. It is first
//! recorded as pending with a deterministic
//! idempotency key, then sent to Stripe with that key, then marked succeeded together with
//! the period's `overage_invoiced_calls`. A run that stops anywhere in between leaves a
//! pending charge that the next run sends again with the same key, so Stripe creates the
//! item once. Two runs at once cannot both record a live charge starting at the same
//! `calls_from` (a unique index), so one range is never billed twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use tokio::sync::Semaphore;
use usage_core::catalog::{API_CALLS, PlanDefinition};
use usage_core::repo::{
    ChargeStatus, NewOverageCharge, OverageCharge, OverageLedgerEntry, UninvoicedOverage, User,
};
use usage_core::terms::LiveCatalog;
use usage_core::{BillingPeriod, Clock, MicroUsd, RepoError, Store, UserId};

use crate::stripe::{InvoiceItem, StripeClient};

/// How a billing run behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingOptions {
    /// Users billed at once (each is a few database writes and one Stripe request).
    pub concurrency: usize,
    /// How long Stripe remembers an idempotency key (24 h), less a margin. A pending
    /// charge older than this is not sent again automatically: Stripe could create a
    /// second item. It is reported for a person to check instead.
    pub idempotency_window: Duration,
    /// How long a pending charge is left alone after its last change, because the run
    /// that made it may still be sending it: longer than one send with all its retries.
    pub in_flight_grace: Duration,
}

impl Default for BillingOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            idempotency_window: Duration::hours(23),
            in_flight_grace: Duration::minutes(5),
        }
    }
}

/// A real run, or one that only says what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Records charges and sends them to Stripe.
    Live,
    /// Reads only: no charge recorded, nothing sent.
    DryRun,
}

/// What a run did (the contract's summary of `POST /api/cron/process-overage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingSummary {
    /// Users looked at: everyone whose terms bill overage calls, and anyone else with
    /// overage not invoiced yet (after a change of terms).
    pub processed: u64,
    /// Users with at least one charge completed (or, in a dry run, to complete) and no
    /// failure.
    pub charged: u64,
    /// Users with nothing to bill now.
    pub skipped: u64,
    /// Users with at least one failure (the reasons are in `errors`).
    pub failed: u64,
    /// Cents billed by this run.
    pub amount_cents: i64,
    /// One entry per failure.
    pub errors: Vec<BillingFailure>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Why one user's overage was not (all) billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingFailure {
    /// Whose.
    pub user_id: UserId,
    /// A stable code, for programs.
    pub code: FailureCode,
    /// What went wrong, for a person. Never database text: that goes to the log.
    pub reason: String,
}

/// What kind of failure a [`BillingFailure`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The user has overage but no Stripe customer id.
    NoStripeCustomer,
    /// A live run without `STRIPE_SECRET_KEY`.
    StripeNotConfigured,
    /// Stripe refused the item; a new attempt gets a new key.
    StripeRefused,
    /// Stripe gave no definitive answer (or refused our key); the charge stays pending
    /// and is sent again with the same key.
    StripeUnavailable,
    /// A charge pending longer than Stripe keeps idempotency keys: settle it by hand.
    PendingTooLong,
    /// The database failed; the detail is in the server log.
    DatabaseError,
}

/// One failure while billing a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its kind.
    pub code: FailureCode,
    /// A sentence safe to show to an API client.
    pub reason: String,
}

impl Failure {
    fn new(code: FailureCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// A database failure while `doing` something: logged in full, answered without the
    /// database's text.
    fn database(user_id: &UserId, doing: &str, error: &RepoError) -> Self {
        tracing::error!(user_id = %user_id, error = %error, "overage billing: {doing} failed");
        Self::new(
            FailureCode::DatabaseError,
            format!(
                "{doing} failed: the database did not answer as expected (details in the server log)"
            ),
        )
    }
}

/// What billing one user did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserBilling {
    /// Charges completed by this run (or planned, in a dry run: then not stored).
    pub charges: Vec<OverageCharge>,
    /// Their total.
    pub amount_cents: i64,
    /// What went wrong.
    pub failures: Vec<Failure>,
}

/// One user and period in the reconciliation: the counters, the ledger, and what does not
/// add up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reconciliation {
    /// Counters and ledger totals.
    #[serde(flatten)]
    pub entry: OverageLedgerEntry,
    /// Overage calls (another meter's units) not invoiced yet: billed by the next run
    /// (a meter's once they cost more than was billed, or when the period ends).
    pub uninvoiced_calls: u64,
    /// What the invoiced calls cost under the terms the user holds for the period.
    pub expected_cents: i64,
    /// The user's terms changed during the period or since (a plan move, their own terms,
    /// a version taken up): charges made under earlier terms need not add up to
    /// `expected_cents`, so the two are not compared.
    pub terms_changed: bool,
    /// `ok`, `uninvoiced`, `pending` or `drift`.
    pub status: &'static str,
    /// Each inconsistency, for a person.
    pub problems: Vec<String>,
}

/// Errors of the billing service.
#[derive(Debug, Error)]
pub enum BillingError {
    /// A live run needs Stripe.
    #[error("Stripe is not configured: set STRIPE_SECRET_KEY (a dry run works without it)")]
    StripeNotConfigured,
    /// No such user.
    #[error("no user with id {0}")]
    UnknownUser(UserId),
    /// No charge has this idempotency key.
    #[error("no overage charge with idempotency key {0:?}")]
    UnknownCharge(String),
    /// Only a pending charge can be resolved by hand.
    #[error("charge {key:?} is {status}, not pending: there is nothing to resolve")]
    NotPending {
        /// The charge's key.
        key: String,
        /// Its status.
        status: &'static str,
    },
    /// The database failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// What a person found in Stripe about a pending charge (see
/// [`OverageService::resolve_charge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Stripe has the item: the charge succeeded.
    Created {
        /// Stripe's id of the item (`ii_...`).
        stripe_invoice_item_id: String,
    },
    /// Stripe has no such item: the charge failed, and the next run bills its range under
    /// a new key.
    NotCreated {
        /// Why, for the ledger.
        reason: String,
    },
}

/// Overage billing over the repositories and a [`StripeClient`].
#[derive(Clone)]
pub struct OverageService {
    store: Arc<dyn Store>,
    stripe: Option<Arc<dyn StripeClient>>,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
    options: BillingOptions,
}

impl std::fmt::Debug for OverageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverageService")
            .field("stripe", &self.stripe.is_some())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One user's work in a run.
struct UserWork {
    user_id: UserId,
    periods: Vec<UninvoicedOverage>,
}

impl OverageService {
    /// A service pricing by `catalog`; without `stripe`, only dry runs, reports and
    /// reconciliation work.
    pub fn new(
        store: Arc<dyn Store>,
        stripe: Option<Arc<dyn StripeClient>>,
        catalog: Arc<LiveCatalog>,
        clock: Arc<dyn Clock>,
        options: BillingOptions,
    ) -> Self {
        Self {
            store,
            stripe,
            catalog,
            clock,
            options: BillingOptions {
                concurrency: options.concurrency.max(1),
                ..options
            },
        }
    }

    /// Bills everything not yet invoiced, for every user, `concurrency` users at a time.
    /// One user's failure is in the summary and does not stop the others.
    pub async fn process_all(&self, mode: RunMode) -> Result<BillingSummary, BillingError> {
        if mode == RunMode::Live && self.stripe.is_none() {
            return Err(BillingError::StripeNotConfigured);
        }
        let now = self.clock.now();
        let mut by_user: BTreeMap<UserId, UserWork> = BTreeMap::new();
        for period in self.store.uninvoiced_overage().await? {
            by_user
                .entry(period.user_id.clone())
                .or_insert_with(|| UserWork {
                    user_id: period.user_id.clone(),
                    periods: Vec::new(),
                })
                .periods
                .push(period);
        }
        let catalog = self.catalog.current();
        let on_overage_terms: u64 = self
            .store
            .count_users_by_terms()
            .await?
            .into_iter()
            .filter(|(subscription, _)| {
                catalog
                    .effective(subscription, now)
                    .is_some_and(|terms| bills_calls(&terms))
            })
            .map(|(_, users)| users)
            .sum();

        let permits = Arc::new(Semaphore::new(self.options.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for work in by_user.into_values() {
            let service = self.clone();
            let permits = Arc::clone(&permits);
            tasks.spawn(async move {
                // The semaphore is never closed, so acquiring only waits.
                let _permit = permits.acquire_owned().await;
                let user_id = work.user_id.clone();
                let (on_overage_terms, billed) = service.bill_user(work, mode, now).await;
                (user_id, on_overage_terms, billed)
            });
        }
        let mut summary = BillingSummary {
            processed: on_overage_terms,
            dry_run: mode == RunMode::DryRun,
            ..BillingSummary::default()
        };
        while let Some(joined) = tasks.join_next().await {
            let (user_id, on_overage_terms, billed) = match joined {
                Ok(done) => done,
                // A panicking user task must not take the run down; nothing of it is lost
                // (its charges are pending or not recorded) and the next run sees them.
                Err(e) => {
                    tracing::error!(error = %e, "a billing task failed");
                    summary.failed += 1;
                    continue;
                }
            };
            // Overage left by earlier terms: a user not counted among those whose terms
            // bill overage now.
            if !on_overage_terms {
                summary.processed += 1;
            }
            summary.amount_cents += billed.amount_cents;
            if !billed.failures.is_empty() {
                summary.failed += 1;
                summary
                    .errors
                    .extend(billed.failures.into_iter().map(|f| BillingFailure {
                        user_id: user_id.clone(),
                        code: f.code,
                        reason: f.reason,
                    }));
            } else if !billed.charges.is_empty() {
                summary.charged += 1;
            }
        }
        summary.errors.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        summary.skipped = summary
            .processed
            .saturating_sub(summary.charged + summary.failed);
        tracing::info!(
            processed = summary.processed,
            charged = summary.charged,
            failed = summary.failed,
            amount_cents = summary.amount_cents,
            dry_run = summary.dry_run,
            "overage billing run done"
        );
        Ok(summary)
    }

    /// Settles a pending charge by hand, after looking in Stripe for an item with its
    /// idempotency key (in the item's metadata range): for a charge left pending longer
    /// than Stripe keeps keys, which runs no longer resend.
    pub async fn resolve_charge(
        &self,
        idempotency_key: &str,
        resolution: Resolution,
    ) -> Result<OverageCharge, BillingError> {
        let charge = self
            .store
            .overage_charge_by_key(idempotency_key)
            .await?
            .ok_or_else(|| BillingError::UnknownCharge(idempotency_key.to_owned()))?;
        if charge.status != ChargeStatus::Pending {
            return Err(BillingError::NotPending {
                key: charge.idempotency_key,
                status: charge.status.as_str(),
            });
        }
        let now = self.clock.now();
        let resolved = match resolution {
            Resolution::Created {
                stripe_invoice_item_id,
            } => {
                self.store
                    .complete_overage_charge(charge.id, Some(&stripe_invoice_item_id), now)
                    .await?
            }
            Resolution::NotCreated { reason } => {
                self.store
                    .fail_overage_charge(charge.id, &format!("resolved by hand: {reason}"), now)
                    .await?
            }
        };
        tracing::info!(
            key = idempotency_key,
            status = resolved.status.as_str(),
            "charge resolved by hand"
        );
        Ok(resolved)
    }

    /// A user's overage per period: counters, what was charged, what is pending.
    pub async fn user_overage(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<Reconciliation>, BillingError> {
        if self.store.user_by_id(user_id).await?.is_none() {
            return Err(BillingError::UnknownUser(user_id.clone()));
        }
        Ok(self
            .reconcile()
            .await?
            .into_iter()
            .filter(|r| &r.entry.user_id == user_id)
            .collect())
    }

    /// Every user, period and meter with overage or charges, and whatever does not add up:
    /// invoiced calls (units) that differ from the succeeded charges, invoiced beyond the
    /// overage (quantity), and, for a user whose terms for the meter did not change during
    /// the period or since, charged cents that differ from what the invoiced calls (units)
    /// cost under those terms. A meter the terms do not price is listed only when it has
    /// cents, a charge pending or failed, or a problem.
    pub async fn reconcile(&self) -> Result<Vec<Reconciliation>, BillingError> {
        let now = self.clock.now();
        let catalog = self.catalog.current();
        let entries = self.store.overage_ledger().await?;
        let mut users: HashMap<UserId, Option<User>> = HashMap::new();
        // Per period: the users whose plan or own terms were set since it started.
        let mut changed_since: HashMap<OffsetDateTime, HashSet<UserId>> = HashMap::new();
        for entry in &entries {
            if !users.contains_key(&entry.user_id) {
                let user = self.store.user_by_id(&entry.user_id).await?;
                users.insert(entry.user_id.clone(), user);
            }
            if let std::collections::hash_map::Entry::Vacant(slot) =
                changed_since.entry(entry.period_start)
            {
                let changed = self.store.plans_changed_since(entry.period_start).await?;
                slot.insert(changed.into_iter().collect());
            }
        }
        Ok(entries
            .into_iter()
            .filter_map(|entry| {
                let period = BillingPeriod::containing(entry.period_start);
                let subscription = users
                    .get(&entry.user_id)
                    .and_then(Option::as_ref)
                    .map(User::subscription);
                let held = subscription
                    .as_ref()
                    .and_then(|s| catalog.effective(s, terms_time(period, now)));
                // Only the meter's limit prices it: a version that changed anything else
                // (or a limit the user's own terms replace) changes nothing here.
                let meter_limit = |terms: &Option<PlanDefinition>| {
                    terms.as_ref().and_then(|t| t.limit(&entry.meter)).cloned()
                };
                let terms_changed = subscription.is_none_or(|s| {
                    changed_since[&entry.period_start].contains(&entry.user_id)
                        || meter_limit(&catalog.effective(&s, period.start())) != meter_limit(&held)
                });
                let (expected_cents, (unit, units)) = if entry.meter == API_CALLS {
                    let cents = held.as_ref().map_or(0, |terms| {
                        overage_cents(terms, entry.overage_invoiced_calls)
                    });
                    (cents, ("call(s)", "calls"))
                } else {
                    let cents = held.as_ref().map_or(0, |terms| {
                        meter_cost(terms, &entry.meter, entry.overage_invoiced_calls)
                    });
                    (cents, ("unit(s)", "units"))
                };
                let mut problems = Vec::new();
                if entry.charged_calls != entry.overage_invoiced_calls {
                    problems.push(format!(
                        "{} {unit} invoiced but succeeded charges cover {}",
                        entry.overage_invoiced_calls, entry.charged_calls
                    ));
                }
                if !terms_changed && entry.charged_cents != expected_cents {
                    problems.push(format!(
                        "charged {} cent(s) where the invoiced {units} cost {expected_cents}",
                        entry.charged_cents
                    ));
                }
                if entry.overage_invoiced_calls > entry.overage_calls && !terms_changed {
                    let what = if entry.meter == API_CALLS {
                        "overage"
                    } else {
                        "used"
                    };
                    problems.push(format!(
                        "{} {unit} invoiced but only {} {what}",
                        entry.overage_invoiced_calls, entry.overage_calls
                    ));
                }
                let uninvoiced_calls = entry
                    .overage_calls
                    .saturating_sub(entry.overage_invoiced_calls);
                // A meter's units not invoiced yet are billed by the next run once they
                // cost more than was billed, or when the period ends.
                let bills_more = entry.meter == API_CALLS
                    || period.end() <= now
                    || held.as_ref().is_some_and(|t| {
                        meter_cost(t, &entry.meter, entry.overage_calls) > expected_cents
                    });
                // A meter the terms do not price, with no cents and nothing wrong, is no
                // money to reconcile (its period is settled at 0 cents when it ends).
                let priced = held.as_ref().is_some_and(|t| bills(t, &entry.meter));
                if entry.meter != API_CALLS
                    && !priced
                    && problems.is_empty()
                    && entry.charged_cents == 0
                    && entry.pending_charges == 0
                    && entry.failed_charges == 0
                {
                    return None;
                }
                let status = if !problems.is_empty() {
                    "drift"
                } else if entry.pending_charges > 0 {
                    "pending"
                } else if uninvoiced_calls > 0 && bills_more {
                    "uninvoiced"
                } else {
                    "ok"
                };
                Some(Reconciliation {
                    entry,
                    uninvoiced_calls,
                    expected_cents,
                    terms_changed,
                    status,
                    problems,
                })
            })
            .collect())
    }

    /// Finishes a user's pending charges, then bills each period's new overage. Says also
    /// whether the user's terms bill overage calls now (for the run's `processed`).
    async fn bill_user(
        &self,
        work: UserWork,
        mode: RunMode,
        now: OffsetDateTime,
    ) -> (bool, UserBilling) {
        let mut out = UserBilling::default();
        let user_id = &work.user_id;
        let user = match self.store.user_by_id(user_id).await {
            Ok(Some(user)) => user,
            // Deleted since the run began: its charges and counters went with it.
            Ok(None) => return (false, out),
            Err(e) => {
                out.failures
                    .push(Failure::database(user_id, "reading the user", &e));
                return (false, out);
            }
        };
        let subscription = user.subscription();
        let mut terms = Vec::with_capacity(work.periods.len());
        for period in &work.periods {
            let at = terms_time(BillingPeriod::containing(period.period_start), now);
            match self.catalog.effective(&subscription, at).await {
                Ok(resolved) => terms.push(resolved.terms),
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "reading the plan catalog", &e));
                    return (false, out);
                }
            }
        }
        let on_overage_terms = self
            .catalog
            .current()
            .effective(&subscription, now)
            .is_some_and(|t| bills_calls(&t));
        let customer = user.stripe_customer_id.clone();
        let billed = |(p, t): (&UninvoicedOverage, &PlanDefinition)| bills(t, &p.meter);
        if customer.is_none() && work.periods.iter().zip(&terms).any(billed) {
            let calls: u64 = work
                .periods
                .iter()
                .filter(|p| p.meter == API_CALLS)
                .map(|p| p.overage_calls - p.overage_invoiced_calls)
                .sum();
            let meters: BTreeSet<&str> = work
                .periods
                .iter()
                .zip(&terms)
                .filter(|pair| billed(*pair))
                .map(|(p, _)| p.meter.as_str())
                .filter(|m| *m != API_CALLS)
                .collect();
            let what = match (calls, meters.is_empty()) {
                (0, _) => format!(
                    "usage of {}",
                    meters.into_iter().collect::<Vec<_>>().join(", ")
                ),
                (_, true) => format!("{calls} overage call(s)"),
                (_, false) => format!(
                    "{calls} overage call(s) and usage of {}",
                    meters.into_iter().collect::<Vec<_>>().join(", ")
                ),
            };
            out.failures.push(Failure::new(
                FailureCode::NoStripeCustomer,
                format!("{what} to bill but the user has no Stripe customer id"),
            ));
            return (on_overage_terms, out);
        }
        let customer = customer.as_deref();
        let mut charges = match self.store.overage_charges_for_user(user_id).await {
            Ok(charges) => charges,
            Err(e) => {
                out.failures
                    .push(Failure::database(user_id, "reading the charge ledger", &e));
                return (on_overage_terms, out);
            }
        };

        // Periods (of a meter) with a charge still pending, or refused just now, get no new
        // charge this run.
        let mut unresolved = HashSet::new();
        for charge in charges
            .iter_mut()
            .filter(|c| c.status == ChargeStatus::Pending)
        {
            unresolved.insert((charge.period_start, charge.meter.clone()));
            if now - charge.created_at > self.options.idempotency_window {
                out.failures.push(Failure::new(
                    FailureCode::PendingTooLong,
                    format!(
                        "charge {} has been pending since {}, longer than Stripe keeps \
                         idempotency keys: look for an invoice item with this key's metadata \
                         in Stripe before billing this range again",
                        charge.idempotency_key, charge.created_at
                    ),
                ));
                continue;
            }
            if now - charge.updated_at < self.options.in_flight_grace {
                // Probably being sent by another run right now; it finishes it.
                continue;
            }
            if mode == RunMode::DryRun {
                out.amount_cents += charge.amount_cents;
                out.charges.push(charge.clone());
                continue;
            }
            match self
                .store
                .claim_overage_charge(charge.id, charge.updated_at, now)
                .await
            {
                Ok(Some(claimed)) => *charge = claimed,
                // Another run resumed it first.
                Ok(None) => continue,
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "resuming a pending charge", &e));
                    continue;
                }
            }
            self.send(customer, charge, now, &mut out).await;
        }
        // A resumed charge that succeeded leaves its period free for the calls after it.
        for charge in &charges {
            if charge.status == ChargeStatus::Succeeded && charge.updated_at == now {
                let still_pending = charges.iter().any(|c| {
                    c.period_start == charge.period_start
                        && c.meter == charge.meter
                        && c.status == ChargeStatus::Pending
                });
                if !still_pending {
                    unresolved.remove(&(charge.period_start, charge.meter.clone()));
                }
            }
        }

        for (period, terms) in work.periods.iter().zip(&terms) {
            let meter = period.meter.as_str();
            if unresolved.contains(&(period.period_start, period.meter.clone())) {
                continue;
            }
            // The counters now, then the ledger: a charge that moved the invoiced count
            // before the read is among the charges read after it, so `from` and the cents
            // invoiced agree. (A run that completes one after the read started at this
            // `from` too, and recording this one is then refused.)
            let (from, to, used) = match self.invoicing(user_id, period, &mut out).await {
                Some(range) => range,
                None => continue,
            };
            if to <= from {
                continue;
            }
            let ledger = match self.store.overage_charges_for_user(user_id).await {
                Ok(ledger) => ledger,
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "reading the charge ledger", &e));
                    continue;
                }
            };
            let invoiced_cents: i64 = ledger
                .iter()
                .filter(|c| {
                    c.period_start == period.period_start
                        && c.meter == meter
                        && c.status == ChargeStatus::Succeeded
                        && c.calls_to <= from
                })
                .map(|c| c.amount_cents)
                .sum();
            // The period's cost rounded once, less what its items billed: every item in
            // whole cents, and together the period's total.
            let cost = meter_cost(terms, meter, used);
            let amount = cost.saturating_sub(invoiced_cents).max(0);
            let ended = period.period_end <= now;
            if amount == 0 && !ended {
                // Nothing more to bill yet (less than half a cent, or terms that cost no
                // more than was billed): wait for more calls, or the period's end.
                continue;
            }
            let refused_before = ledger
                .iter()
                .filter(|c| {
                    c.period_start == period.period_start
                        && c.meter == meter
                        && c.calls_from == from
                        && c.status == ChargeStatus::Failed
                })
                .count();
            let new = NewOverageCharge {
                user_id: user_id.clone(),
                period_start: period.period_start,
                meter: meter.to_owned(),
                calls_from: from,
                calls_to: to,
                amount_cents: amount,
                idempotency_key: idempotency_key(
                    user_id,
                    period.period_start,
                    meter,
                    (from, to),
                    refused_before,
                ),
                created_at: now,
            };
            if mode == RunMode::DryRun {
                out.amount_cents += amount;
                out.charges.push(planned(&new));
                continue;
            }
            let mut charge = match self.store.create_overage_charge(&new).await {
                Ok(charge) => charge,
                // Another run holds this range: it bills it.
                Err(RepoError::Conflict { .. }) => continue,
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "recording a charge", &e));
                    continue;
                }
            };
            if amount == 0 {
                // An ended period with nothing more to bill: settled without an item.
                match self
                    .store
                    .complete_overage_charge(charge.id, None, now)
                    .await
                {
                    Ok(done) => out.charges.push(done),
                    Err(e) => out.failures.push(Failure::database(
                        user_id,
                        "settling a zero-cent range",
                        &e,
                    )),
                }
                continue;
            }
            self.send(customer, &mut charge, now, &mut out).await;
            charges.push(charge);
        }
        (on_overage_terms, out)
    }

    /// The range a period of a meter has left to invoice, read now: (invoiced before,
    /// up to, the usage it prices). Calls: overage calls, priced by all the period's
    /// calls. Another meter: its quantity, priced whole (its `included` inside).
    async fn invoicing(
        &self,
        user_id: &UserId,
        period: &UninvoicedOverage,
        out: &mut UserBilling,
    ) -> Option<(u64, u64, u64)> {
        if period.meter == API_CALLS {
            match self.store.usage_record(user_id, period.period_start).await {
                Ok(Some(r)) => Some((r.overage_invoiced_calls, r.overage_calls, r.api_calls)),
                Ok(None) => None,
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "reading usage", &e));
                    None
                }
            }
        } else {
            match self
                .store
                .meter_invoicing(user_id, period.period_start, &period.meter)
                .await
            {
                Ok(Some((quantity, invoiced))) => Some((invoiced, quantity, quantity)),
                Ok(None) => None,
                Err(e) => {
                    out.failures
                        .push(Failure::database(user_id, "reading metered usage", &e));
                    None
                }
            }
        }
    }

    /// The units included in the period of a charge of another meter, under the terms
    /// that price it (0 when the terms no longer say: the item's quantity is then the
    /// whole range).
    async fn included_units(&self, charge: &OverageCharge) -> u64 {
        let Ok(Some(user)) = self.store.user_by_id(&charge.user_id).await else {
            return 0;
        };
        let at = terms_time(
            BillingPeriod::containing(charge.period_start),
            charge.created_at,
        );
        match self.catalog.effective(&user.subscription(), at).await {
            Ok(resolved) => resolved
                .terms
                .limit(&charge.meter)
                .and_then(|l| l.included)
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Sends one recorded charge to Stripe and records the outcome on it.
    async fn send(
        &self,
        customer: Option<&str>,
        charge: &mut OverageCharge,
        now: OffsetDateTime,
        out: &mut UserBilling,
    ) {
        let Some(stripe) = self.stripe.as_ref() else {
            out.failures.push(Failure::new(
                FailureCode::StripeNotConfigured,
                BillingError::StripeNotConfigured.to_string(),
            ));
            return;
        };
        let Some(customer) = customer else {
            // Unlinked since the charge was recorded: it stays pending for when one is.
            out.failures.push(Failure::new(
                FailureCode::NoStripeCustomer,
                format!(
                    "charge {} is pending but the user has no Stripe customer id",
                    charge.idempotency_key
                ),
            ));
            return;
        };
        let (month, year) = (
            u8::from(charge.period_start.month()),
            charge.period_start.year(),
        );
        let (quantity, description) = if charge.meter == API_CALLS {
            let calls = charge.calls_to - charge.calls_from;
            (
                calls,
                format!(
                    "API overage {year}-{month:02}: {calls} call(s) past the plan's monthly limit"
                ),
            )
        } else {
            // Units past the limit this item covers (its range is of the whole quantity).
            let included = self.included_units(charge).await;
            let past = |q: u64| q.saturating_sub(included);
            let units = past(charge.calls_to) - past(charge.calls_from);
            (
                units,
                format!(
                    "{} overage {year}-{month:02}: {units} unit(s) past the plan's monthly limit",
                    charge.meter
                ),
            )
        };
        let calls = if charge.meter == API_CALLS {
            quantity
        } else {
            0
        };
        let item = InvoiceItem {
            customer: customer.to_owned(),
            amount_cents: charge.amount_cents,
            description,
            meter: charge.meter.clone(),
            quantity,
            user_id: charge.user_id.clone(),
            period_start: charge.period_start,
            // Stable across retries: the stored creation time, not now.
            period_end: BillingPeriod::containing(charge.period_start)
                .end()
                .min(charge.created_at)
                .max(charge.period_start),
            overage_calls: calls,
            calls_from: charge.calls_from,
            calls_to: charge.calls_to,
        };
        match stripe
            .create_invoice_item(&item, &charge.idempotency_key)
            .await
        {
            Ok(created) => {
                match self
                    .store
                    .complete_overage_charge(charge.id, Some(&created.id), now)
                    .await
                {
                    Ok(done) => {
                        out.amount_cents += done.amount_cents;
                        out.charges.push(done.clone());
                        *charge = done;
                    }
                    Err(e) => {
                        let doing = format!(
                            "recording invoice item {} of charge {} (Stripe created it; the \
                             next run sends the same key and records it)",
                            created.id, charge.idempotency_key
                        );
                        out.failures
                            .push(Failure::database(&charge.user_id, &doing, &e));
                    }
                }
            }
            Err(e) if e.is_refusal() => {
                let reason = e.to_string();
                if let Ok(failed) = self
                    .store
                    .fail_overage_charge(charge.id, &reason, now)
                    .await
                {
                    *charge = failed;
                }
                out.failures
                    .push(Failure::new(FailureCode::StripeRefused, reason));
            }
            Err(e) => {
                let reason = e.to_string();
                if let Ok(noted) = self
                    .store
                    .note_overage_charge_attempt(charge.id, &reason, now)
                    .await
                {
                    *charge = noted;
                }
                out.failures.push(Failure::new(
                    FailureCode::StripeUnavailable,
                    format!(
                        "{reason}; charge {} stays pending and is sent again with the same key",
                        charge.idempotency_key
                    ),
                ));
            }
        }
    }
}

/// The instant whose terms price a period: now while it runs, its last instant once it
/// has ended (a late charge of an ended period is priced as the period was, not under a
/// version taken up since).
fn terms_time(period: BillingPeriod, now: OffsetDateTime) -> OffsetDateTime {
    now.min(period.end() - Duration::nanoseconds(1))
}

/// Whether `terms` bill calls past their limit.
fn bills_calls(terms: &PlanDefinition) -> bool {
    bills(terms, API_CALLS)
}

/// Whether `terms` bill units of `meter` past its limit.
fn bills(terms: &PlanDefinition, meter: &str) -> bool {
    terms.limit(meter).is_some_and(|limit| {
        limit.over_limit == usage_core::OverLimit::Overage
            && limit.included.is_some()
            && limit.overage.is_some()
    })
}

/// What a period with `used` units of `meter` costs under `terms`, in cents: the meter's
/// line of a quote (nothing for a meter the terms do not price).
fn meter_cost(terms: &PlanDefinition, meter: &str, used: u64) -> i64 {
    if meter == API_CALLS {
        terms.calls_line(used).amount_cents
    } else {
        terms.limit(meter).map_or(0, |l| l.quote(used).amount_cents)
    }
}

/// What `units` calls past the limit cost under `terms`, rounded half-up to the cent.
fn overage_cents(terms: &PlanDefinition, units: u64) -> i64 {
    terms
        .limit(API_CALLS)
        .and_then(|limit| limit.overage.as_ref())
        .map_or(0, |model| {
            MicroUsd(model.price(units).amount_micros).in_cents().0
        })
}

/// The key of a charge: the same user, period and range always give the same key, so
/// that a resent charge is recognised by Stripe. `refused_before` counts charges of the
/// same start that Stripe refused: a new attempt after a refusal needs a new key, or
/// Stripe would replay the refusal.
///
/// A calls' key keeps the form it had before meters (`overage_<user>_<YYYY-MM>_<from>-<to>`)
/// so that a charge pending across an upgrade is recognised; another meter's names it
/// (`overage_<user>_<YYYY-MM>_<meter>_<from>-<to>`).
pub fn idempotency_key(
    user_id: &UserId,
    period_start: OffsetDateTime,
    meter: &str,
    (from, to): (u64, u64),
    refused_before: usize,
) -> String {
    let month = format!(
        "{}-{:02}",
        period_start.year(),
        u8::from(period_start.month())
    );
    let base = if meter == API_CALLS {
        format!("overage_{user_id}_{month}_{from}-{to}")
    } else {
        format!("overage_{user_id}_{month}_{meter}_{from}-{to}")
    };
    if refused_before == 0 {
        base
    } else {
        format!("{base}_retry{refused_before}")
    }
}

/// A charge as a dry run would record it (never stored).
fn planned(new: &NewOverageCharge) -> OverageCharge {
    OverageCharge {
        id: 0,
        user_id: new.user_id.clone(),
        period_start: new.period_start,
        meter: new.meter.clone(),
        calls_from: new.calls_from,
        calls_to: new.calls_to,
        amount_cents: new.amount_cents,
        idempotency_key: new.idempotency_key.clone(),
        status: ChargeStatus::Pending,
        stripe_invoice_item_id: None,
        attempts: 0,
        last_error: None,
        created_at: new.created_at,
        updated_at: new.created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::SystemClock;
    use usage_testkit::memory::MemoryStore;

    #[test]
    fn debug_says_whether_stripe_is_configured_and_nothing_else() {
        let store = Arc::new(MemoryStore::new());
        let service = OverageService::new(
            store.clone(),
            None,
            Arc::new(LiveCatalog::new(store)),
            Arc::new(SystemClock),
            BillingOptions::default(),
        );
        let shown = format!("{service:?}");
        assert!(
            shown.starts_with("OverageService { stripe: false, options: "),
            "{shown}"
        );
        assert!(shown.ends_with(", .. }"), "{shown}");
    }

    #[test]
    fn keys_are_deterministic_and_change_after_a_refusal() {
        let user = UserId::parse("eco_usr_abc").unwrap();
        let nov = datetime!(2026-11-01 00:00 UTC);
        assert_eq!(
            idempotency_key(&user, nov, API_CALLS, (0, 5000), 0),
            "overage_eco_usr_abc_2026-11_0-5000"
        );
        assert_eq!(
            idempotency_key(&user, nov, API_CALLS, (0, 5000), 0),
            idempotency_key(&user, nov, API_CALLS, (0, 5000), 0)
        );
        assert_eq!(
            idempotency_key(&user, nov, API_CALLS, (0, 5000), 2),
            "overage_eco_usr_abc_2026-11_0-5000_retry2"
        );
        assert_eq!(
            idempotency_key(&user, nov, "tokens", (0, 12_000), 0),
            "overage_eco_usr_abc_2026-11_tokens_0-12000"
        );
    }
}
