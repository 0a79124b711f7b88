//! Calls the store refused for good (their user or key does not exist), kept by the
//! tracker in `eco_usage_dead_letters`, and their replay once the cause is fixed (the
//! user restored, or the spool replayed against the right database).

use serde::Serialize;
use time::OffsetDateTime;

use crate::RepoError;
use crate::repo::{DeadLetter, IncludedCalls, UsageRepository};

/// Letters read and written at once.
const PAGE: u32 = 500;

/// A kept letter as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterView {
    /// The call's id.
    pub event_id: uuid::Uuid,
    /// Its user.
    pub user_id: String,
    /// Its key.
    pub api_key_id: String,
    /// Route pattern and method.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// When the call was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Why the store refused it.
    pub reason: String,
    /// When it was refused.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(l: &DeadLetter) -> Self {
        Self {
            event_id: l.event.event_id,
            user_id: l.event.user_id.to_string(),
            api_key_id: l.event.api_key_id.to_string(),
            endpoint: l.event.endpoint.clone(),
            method: l.event.method.clone(),
            created_at: l.event.created_at,
            reason: l.reason.clone(),
            failed_at: l.failed_at,
        }
    }
}

/// Every kept letter: how many, and the first `show` of them.
pub async fn list(
    usage: &dyn UsageRepository,
    show: usize,
) -> Result<(u64, Vec<DeadLetterView>), RepoError> {
    let (mut count, mut shown, mut after) = (0, Vec::new(), None);
    loop {
        let page = usage.dead_letters(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok((count, shown));
        };
        after = Some(last.event.event_id);
        count += page.len() as u64;
        let room = show.saturating_sub(shown.len());
        shown.extend(page.iter().take(room).map(DeadLetterView::from));
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Calls stored now (and counted).
    pub stored: u64,
    /// Calls the store already had (stored once, not again).
    pub already_stored: u64,
    /// Calls still refused, kept for later.
    pub still_refused: u64,
}

/// Stores every kept letter that the store now takes, forgets those, and keeps the rest.
/// Safe to run at any time and more than once: replayed calls keep their ids.
pub async fn replay(usage: &dyn UsageRepository) -> Result<ReplayReport, RepoError> {
    let mut report = ReplayReport::default();
    let mut after = None;
    loop {
        let page = usage.dead_letters(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(report);
        };
        after = Some(last.event.event_id);
        // The page at once; when some letter is still refused, one by one.
        let done = match store(usage, &page).await? {
            Some(outcome) => {
                report.stored += outcome.inserted;
                report.already_stored += outcome.duplicates;
                page.iter().map(|l| l.event.event_id).collect()
            }
            None => {
                let mut done = Vec::new();
                for letter in &page {
                    match store(usage, std::slice::from_ref(letter)).await? {
                        Some(outcome) => {
                            report.stored += outcome.inserted;
                            report.already_stored += outcome.duplicates;
                            done.push(letter.event.event_id);
                        }
                        None => report.still_refused += 1,
                    }
                }
                done
            }
        };
        usage.remove_dead_letters(&done).await?;
    }
}

/// Records `letters`; `None` when the store still refuses them for good.
async fn store(
    usage: &dyn UsageRepository,
    letters: &[DeadLetter],
) -> Result<Option<crate::repo::RecordOutcome>, RepoError> {
    let events: Vec<_> = letters.iter().map(|l| l.event.clone()).collect();
    let included: IncludedCalls = letters
        .iter()
        .filter_map(|l| l.included_calls.map(|n| (l.event.user_id.clone(), n)))
        .collect();
    match usage.record_usage(&events, &included).await {
        Ok(outcome) => Ok(Some(outcome)),
        Err(e) if e.is_permanent() => Ok(None),
        Err(e) => Err(e),
    }
}
