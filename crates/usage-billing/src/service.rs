//! The overage billing run: what to bill, the charge ledger, Stripe, and reconciliation.
//!
//! A charge bills the overage calls between what a period has invoiced (`calls_from`) and
//! its overage now (`calls_to`). It is first recorded as pending with a deterministic
//! idempotency key, then sent to Stripe with that key, then marked succeeded together with
//! the period's `overage_invoiced_calls`. A run that stops anywhere in between leaves a
//! pending charge that the next run sends again with the same key, so Stripe creates the
//! item once. Two runs at once cannot both record a live charge starting at the same
//! `calls_from` (a unique index), so one range is never billed twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use tokio::sync::Semaphore;
use usage_core::repo::{
    ChargeStatus, NewOverageCharge, OverageCharge, OverageLedgerEntry, UninvoicedOverage,
    UsageRecord,
};
use usage_core::{BillingPeriod, Clock, PlanCatalog, RepoError, Store, UserId};

use crate::stripe::{InvoiceItem, StripeClient};
use crate::{OverageCost, overage_cost};

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
    /// Users looked at: everyone on a plan with overage, and anyone else with overage
    /// not invoiced yet (after a plan change).
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
    /// Overage calls not invoiced yet (billed by the next run).
    pub uninvoiced_calls: u64,
    /// What the invoiced calls cost at today's price.
    pub expected_cents: i64,
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
    catalog: PlanCatalog,
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
    stripe_customer_id: Option<String>,
    periods: Vec<UninvoicedOverage>,
}

impl OverageService {
    /// A service; without `stripe`, only dry runs, reports and reconciliation work.
    pub fn new(
        store: Arc<dyn Store>,
        stripe: Option<Arc<dyn StripeClient>>,
        catalog: PlanCatalog,
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

    /// The overage cost of a usage record (see [`overage_cost`]).
    pub fn calculate(&self, record: &UsageRecord) -> OverageCost {
        overage_cost(record, &self.catalog)
    }

    /// Bills everything not yet invoiced, for every user, `concurrency` users at a time.
    /// One user's failure is in the summary and does not stop the others.
    pub async fn process_all(&self, mode: RunMode) -> Result<BillingSummary, BillingError> {
        if mode == RunMode::Live && self.stripe.is_none() {
            return Err(BillingError::StripeNotConfigured);
        }
        let now = self.clock.now();
        let mut by_user: BTreeMap<UserId, UserWork> = BTreeMap::new();
        let mut off_plan_users = 0u64;
        for period in self.store.uninvoiced_overage().await? {
            let work = by_user.entry(period.user_id.clone()).or_insert_with(|| {
                if self
                    .catalog
                    .included_calls_if_billed(&period.plan)
                    .is_none()
                {
                    off_plan_users += 1;
                }
                UserWork {
                    user_id: period.user_id.clone(),
                    stripe_customer_id: period.stripe_customer_id.clone(),
                    periods: Vec::new(),
                }
            });
            work.periods.push(period);
        }
        let on_overage_plans: u64 = self
            .store
            .count_users_by_plan()
            .await?
            .into_iter()
            .filter(|(plan, _)| self.catalog.included_calls_if_billed(plan).is_some())
            .map(|(_, n)| n)
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
                (user_id, service.bill_user(work, mode, now).await)
            });
        }
        let mut summary = BillingSummary {
            processed: on_overage_plans + off_plan_users,
            dry_run: mode == RunMode::DryRun,
            ..BillingSummary::default()
        };
        while let Some(joined) = tasks.join_next().await {
            let (user_id, billed) = match joined {
                Ok(done) => done,
                // A panicking user task must not take the run down; nothing of it is lost
                // (its charges are pending or not recorded) and the next run sees them.
                Err(e) => {
                    tracing::error!(error = %e, "a billing task failed");
                    summary.failed += 1;
                    continue;
                }
            };
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

    /// Every user and period with overage or charges, and whatever does not add up:
    /// invoiced calls that differ from the succeeded charges, charged cents that differ
    /// from the price of the invoiced calls, invoiced beyond the overage.
    pub async fn reconcile(&self) -> Result<Vec<Reconciliation>, BillingError> {
        let price = self.catalog.overage_price;
        Ok(self
            .store
            .overage_ledger()
            .await?
            .into_iter()
            .map(|entry| {
                let expected_cents = price.total_in_cents(entry.overage_invoiced_calls).0;
                let mut problems = Vec::new();
                if entry.charged_calls != entry.overage_invoiced_calls {
                    problems.push(format!(
                        "{} call(s) invoiced but succeeded charges cover {}",
                        entry.overage_invoiced_calls, entry.charged_calls
                    ));
                }
                if entry.charged_cents != expected_cents {
                    problems.push(format!(
                        "charged {} cent(s) where the invoiced calls cost {expected_cents}",
                        entry.charged_cents
                    ));
                }
                if entry.overage_invoiced_calls > entry.overage_calls {
                    problems.push(format!(
                        "{} call(s) invoiced but only {} overage",
                        entry.overage_invoiced_calls, entry.overage_calls
                    ));
                }
                let uninvoiced_calls = entry
                    .overage_calls
                    .saturating_sub(entry.overage_invoiced_calls);
                let status = if !problems.is_empty() {
                    "drift"
                } else if entry.pending_charges > 0 {
                    "pending"
                } else if uninvoiced_calls > 0 {
                    "uninvoiced"
                } else {
                    "ok"
                };
                Reconciliation {
                    entry,
                    uninvoiced_calls,
                    expected_cents,
                    status,
                    problems,
                }
            })
            .collect())
    }

    /// Finishes a user's pending charges, then bills each period's new overage.
    async fn bill_user(&self, work: UserWork, mode: RunMode, now: OffsetDateTime) -> UserBilling {
        let mut out = UserBilling::default();
        let user_id = &work.user_id;
        let Some(customer) = work.stripe_customer_id.as_deref() else {
            let calls: u64 = work
                .periods
                .iter()
                .map(|p| p.overage_calls - p.overage_invoiced_calls)
                .sum();
            out.failures.push(Failure::new(
                FailureCode::NoStripeCustomer,
                format!("{calls} overage call(s) to bill but the user has no Stripe customer id"),
            ));
            return out;
        };
        let mut charges = match self.store.overage_charges_for_user(user_id).await {
            Ok(charges) => charges,
            Err(e) => {
                out.failures
                    .push(Failure::database(user_id, "reading the charge ledger", &e));
                return out;
            }
        };

        // Periods with a charge still pending, or refused just now, get no new charge
        // this run.
        let mut unresolved = HashSet::new();
        for charge in charges
            .iter_mut()
            .filter(|c| c.status == ChargeStatus::Pending)
        {
            unresolved.insert(charge.period_start);
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
                    c.period_start == charge.period_start && c.status == ChargeStatus::Pending
                });
                if !still_pending {
                    unresolved.remove(&charge.period_start);
                }
            }
        }

        let price = self.catalog.overage_price;
        for period in &work.periods {
            if unresolved.contains(&period.period_start) {
                continue;
            }
            // A charge resumed above moved the invoiced count: read it again. Another
            // run may have moved it too, but then this run's range starts where that
            // run's succeeded charge started, and recording it is refused (open range).
            let resumed = charges
                .iter()
                .any(|c| c.period_start == period.period_start && c.updated_at == now);
            let (from, to) = if resumed {
                match self.store.usage_record(user_id, period.period_start).await {
                    Ok(Some(r)) => (r.overage_invoiced_calls, r.overage_calls),
                    Ok(None) => continue,
                    Err(e) => {
                        out.failures
                            .push(Failure::database(user_id, "reading usage", &e));
                        continue;
                    }
                }
            } else {
                (period.overage_invoiced_calls, period.overage_calls)
            };
            if to <= from {
                continue;
            }
            // Billing the difference of the rounded totals keeps every item in whole
            // cents while the items of a period add up to its total rounded once.
            let amount = price.total_in_cents(to).0 - price.total_in_cents(from).0;
            let ended = period.period_end <= now;
            if amount == 0 && !ended {
                // Less than half a cent so far: wait for more calls (or the period's end).
                continue;
            }
            let refused_before = charges
                .iter()
                .filter(|c| {
                    c.period_start == period.period_start
                        && c.calls_from == from
                        && c.status == ChargeStatus::Failed
                })
                .count();
            let new = NewOverageCharge {
                user_id: user_id.clone(),
                period_start: period.period_start,
                calls_from: from,
                calls_to: to,
                amount_cents: amount,
                idempotency_key: idempotency_key(
                    user_id,
                    period.period_start,
                    from,
                    to,
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
                // An ended period's last fraction of a cent: settled without an item.
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
        out
    }

    /// Sends one recorded charge to Stripe and records the outcome on it.
    async fn send(
        &self,
        customer: &str,
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
        let calls = charge.calls_to - charge.calls_from;
        let item = InvoiceItem {
            customer: customer.to_owned(),
            amount_cents: charge.amount_cents,
            description: format!(
                "API overage {}-{:02}: {calls} call(s) past the plan's monthly limit",
                charge.period_start.year(),
                u8::from(charge.period_start.month())
            ),
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

/// The key of a charge: the same user, period and range always give the same key, so
/// that a resent charge is recognised by Stripe. `refused_before` counts charges of the
/// same start that Stripe refused: a new attempt after a refusal needs a new key, or
/// Stripe would replay the refusal.
pub fn idempotency_key(
    user_id: &UserId,
    period_start: OffsetDateTime,
    calls_from: u64,
    calls_to: u64,
    refused_before: usize,
) -> String {
    let base = format!(
        "overage_{user_id}_{}-{:02}_{calls_from}-{calls_to}",
        period_start.year(),
        u8::from(period_start.month())
    );
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
        let service = OverageService::new(
            Arc::new(MemoryStore::new()),
            None,
            PlanCatalog::default(),
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
            idempotency_key(&user, nov, 0, 5000, 0),
            "overage_eco_usr_abc_2026-11_0-5000"
        );
        assert_eq!(
            idempotency_key(&user, nov, 0, 5000, 0),
            idempotency_key(&user, nov, 0, 5000, 0)
        );
        assert_eq!(
            idempotency_key(&user, nov, 0, 5000, 2),
            "overage_eco_usr_abc_2026-11_0-5000_retry2"
        );
    }
}
