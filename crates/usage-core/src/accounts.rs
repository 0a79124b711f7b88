//! Creating users and changing their plans: the checks around [`UserRepository`].

use std::sync::Arc;

use thiserror::Error;

use crate::ids::normalize_email;
use crate::repo::{User, UserRepository};
use crate::terms::LiveCatalog;
use crate::{Clock, DomainError, Plan, RepoError, UserId};

/// Why an account operation was refused.
#[derive(Debug, Error)]
pub enum AccountError {
    /// A parameter is malformed; the message names it.
    #[error(transparent)]
    Invalid(#[from] DomainError),
    /// Another user has this email.
    #[error("a user with email {0} already exists")]
    EmailTaken(String),
    /// Another user is linked to this Stripe customer.
    #[error("another user is already linked to Stripe customer {0}")]
    StripeCustomerTaken(String),
    /// No user has this id.
    #[error("no user with id {0}")]
    UnknownUser(UserId),
    /// The store failed.
    #[error(transparent)]
    Repo(RepoError),
}

/// Checks a Stripe customer id (`cus_` then letters and digits).
pub fn validate_stripe_customer_id(id: &str) -> Result<(), DomainError> {
    let ok = id.strip_prefix("cus_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 250 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        Ok(())
    } else {
        Err(DomainError::InvalidStripeCustomerId(id.to_owned()))
    }
}

/// User accounts over a [`UserRepository`].
#[derive(Clone)]
pub struct Accounts {
    users: Arc<dyn UserRepository>,
    clock: Arc<dyn Clock>,
    catalog: Option<Arc<LiveCatalog>>,
}

impl Accounts {
    /// Accounts stored in `users`, timestamped by `clock`.
    pub fn new(users: Arc<dyn UserRepository>, clock: Arc<dyn Clock>) -> Self {
        Self {
            users,
            clock,
            catalog: None,
        }
    }

    /// Plans given to users must be in `catalog` and not archived (else the store's own
    /// reference decides, without naming the plans there are).
    pub fn choosing_from(mut self, catalog: Arc<LiveCatalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// `UnknownPlan` unless `plan` is an unarchived plan of the catalog (read again once
    /// when it is not: it may have been made a moment ago on another instance).
    async fn check_plan(&self, plan: &Plan) -> Result<(), AccountError> {
        let Some(live) = &self.catalog else {
            return Ok(());
        };
        if live.current().newest(plan.as_str()).is_none() {
            live.refresh().await.map_err(AccountError::Repo)?;
        }
        let catalog = live.current();
        match catalog.newest(plan.as_str()) {
            Some(v) if v.plan.archived => {
                return Err(DomainError::PlanArchived(plan.as_str().to_owned()).into());
            }
            Some(_) => return Ok(()),
            None => {}
        }
        let mut known: Vec<&str> = catalog
            .newest_versions()
            .filter(|v| !v.plan.archived)
            .map(|v| v.plan.key.as_str())
            .collect();
        if catalog.newest_versions().next().is_none() {
            // No server has started on this database yet: its first start stores the
            // built-in plans, which are what may be chosen until then.
            if Plan::BUILTIN.contains(&plan.as_str()) {
                return Ok(());
            }
            known = Plan::BUILTIN.to_vec();
        }
        Err(DomainError::UnknownPlan {
            known: known.join(", "),
            got: plan.as_str().to_owned(),
        }
        .into())
    }

    /// Creates a user with a new `eco_usr_` id.
    ///
    /// ```
    /// # tokio_test_block(async {
    /// use std::sync::Arc;
    /// use usage_core::{accounts::Accounts, Plan, SystemClock};
    /// use usage_testkit::memory::MemoryStore;
    /// let accounts = Accounts::new(Arc::new(MemoryStore::new()), Arc::new(SystemClock));
    /// let user = accounts.create_user("Ada@Example.com", Plan::pro(), None).await.unwrap();
    /// assert_eq!(user.email, "ada@example.com");
    /// assert!(accounts.create_user("ada@example.com", Plan::free(), None).await.is_err());
    /// # });
    /// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
    /// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    /// # }
    /// ```
    pub async fn create_user(
        &self,
        email: &str,
        plan: Plan,
        stripe_customer_id: Option<&str>,
    ) -> Result<User, AccountError> {
        let email = normalize_email(email)?;
        if let Some(id) = stripe_customer_id {
            validate_stripe_customer_id(id)?;
        }
        self.check_plan(&plan).await?;
        let user = User {
            id: UserId::generate(),
            email: email.clone(),
            plan,
            stripe_customer_id: stripe_customer_id.map(str::to_owned),
            created_at: self.clock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        match self.users.create_user(&user).await {
            Ok(()) => Ok(user),
            Err(RepoError::Conflict { field: "email", .. }) => Err(AccountError::EmailTaken(email)),
            Err(RepoError::Conflict {
                field: "stripe_customer_id",
                ..
            }) => Err(AccountError::StripeCustomerTaken(
                user.stripe_customer_id.unwrap_or_default(),
            )),
            Err(e) => Err(AccountError::Repo(e)),
        }
    }

    /// Moves a user to another plan. Running instances pick the change up at their next
    /// poll ([`crate::repo::UserRepository::plans_changed_since`]).
    pub async fn set_plan(&self, id: &UserId, plan: Plan) -> Result<User, AccountError> {
        self.check_plan(&plan).await?;
        match self.users.set_plan(id, plan, self.clock.now()).await {
            Ok(user) => Ok(user),
            Err(RepoError::NotFound { .. }) => Err(AccountError::UnknownUser(id.clone())),
            Err(e) => Err(AccountError::Repo(e)),
        }
    }

    /// Sets the user's own terms over their plan (`None`: drops them); every instance's
    /// key cache drops the user's limits at its next poll, as for a plan change.
    pub async fn set_overrides(
        &self,
        id: &UserId,
        overrides: Option<&crate::catalog::Overrides>,
    ) -> Result<User, AccountError> {
        match self
            .users
            .set_user_overrides(id, overrides, self.clock.now())
            .await
        {
            Ok(user) => Ok(user),
            Err(RepoError::NotFound { .. }) => Err(AccountError::UnknownUser(id.clone())),
            Err(e) => Err(AccountError::Repo(e)),
        }
    }

    /// Links a user to a Stripe customer (`cus_...`), or unlinks with `None`: overage is
    /// invoiced to that customer and its subscription events set the user's plan.
    pub async fn set_stripe_customer(
        &self,
        id: &UserId,
        customer: Option<&str>,
    ) -> Result<User, AccountError> {
        if let Some(customer) = customer {
            validate_stripe_customer_id(customer)?;
        }
        match self.users.set_stripe_customer(id, customer).await {
            Ok(user) => Ok(user),
            Err(RepoError::NotFound { .. }) => Err(AccountError::UnknownUser(id.clone())),
            Err(RepoError::Conflict { .. }) => Err(AccountError::StripeCustomerTaken(
                customer.unwrap_or_default().to_owned(),
            )),
            Err(e) => Err(AccountError::Repo(e)),
        }
    }

    /// The user with this id, or `UnknownUser`.
    pub async fn user(&self, id: &UserId) -> Result<User, AccountError> {
        match self.users.user_by_id(id).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(AccountError::UnknownUser(id.clone())),
            Err(e) => Err(AccountError::Repo(e)),
        }
    }
}
