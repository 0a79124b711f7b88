//! The nexus-usage server: configuration, routes, commands. It composes the library
//! crates and holds no business logic; `main.rs` only parses the command line and calls
//! [`run`], so tests and other programs can start the same server.
#![warn(missing_docs)]

// Layers, each using only those above it: `state` and `api_types` (what handlers share),
// `user_auth`, `admin_gate`, the API modules (`*_api`, `forward_auth`), `openapi` (the document of
// their operations), `routes` (all of them), `jobs`, and `http` (the server).
mod admin_api;
mod admin_gate;
mod api_types;
mod body_deadline;
mod catalog;
pub mod cli;
pub mod config;
mod cron_api;
mod error;
mod events_api;
mod forward_auth;
mod http;
mod jobs;
mod keys_api;
mod meters_api;
mod metrics;
mod observe;
mod openapi;
mod ops_api;
mod plans_api;
mod routes;
mod state;
pub mod telemetry;
mod user_api;
mod user_auth;
mod webhooks_api;

use std::sync::Arc;

use usage_analytics::DailyAggregation;
use usage_auth::access::UserAccess;
use usage_auth::keys::KeyIssuer;
use usage_billing::RunMode;
use usage_core::accounts::Accounts;
use usage_core::terms::LiveCatalog;
use usage_core::{Clock, Store, SystemClock};

use crate::cli::{CatalogFormat, Cli, Command, KeysCommand, PlansCommand, UsersCommand};
use crate::config::Config;
pub use crate::error::{ApiError, ServerError};

/// Runs the command of `cli` to completion.
pub async fn run(cli: Cli) -> Result<(), ServerError> {
    let config = Config::from_options(&cli.global)?;
    let clock = config.clock();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => http::serve(config).await,
        Command::Migrate => {
            let applied = usage_store::migrate(&config.database_url).await?;
            eprintln!(
                "applied {applied} migration(s) to {}",
                usage_store::redact(&config.database_url)
            );
            Ok(())
        }
        Command::Users(UsersCommand::Create {
            email,
            plan,
            stripe_customer_id,
        }) => {
            let store = open_migrated(&config).await?;
            // Read, not seeded: the server's first start stores the built-in plans from
            // its own plan variables.
            let catalog = LiveCatalog::load(store.clone()).await?;
            let user = Accounts::new(store, clock)
                .choosing_from(catalog)
                .create_user(&email, plan, stripe_customer_id.as_deref())
                .await?;
            println!("{}", user.id);
            Ok(())
        }
        Command::Users(UsersCommand::SetPlan { user, plan }) => {
            let store = open_migrated(&config).await?;
            let catalog = LiveCatalog::load(store.clone()).await?;
            let user = Accounts::new(store, clock)
                .choosing_from(catalog)
                .set_plan(&user, plan)
                .await?;
            eprintln!("{} is now on the {} plan", user.id, user.plan);
            Ok(())
        }
        Command::Users(UsersCommand::SetStripeCustomer { user, customer }) => {
            let store = open_migrated(&config).await?;
            let user = Accounts::new(store, clock)
                .set_stripe_customer(&user, Some(&customer))
                .await?;
            eprintln!("{} is linked to Stripe customer {customer}", user.id);
            Ok(())
        }
        Command::Users(UsersCommand::Block { user }) => {
            let store = open_migrated(&config).await?;
            let (user, revoked) = UserAccess::new(store, clock).block(&user).await?;
            eprintln!("{} is blocked; {} key(s) revoked", user.id, revoked.len());
            Ok(())
        }
        Command::Users(UsersCommand::Unblock { user }) => {
            let store = open_migrated(&config).await?;
            let user = UserAccess::new(store, clock).unblock(&user).await?;
            eprintln!("{} is no longer blocked", user.id);
            Ok(())
        }
        Command::Users(UsersCommand::Delete { user }) => {
            let store = open_migrated(&config).await?;
            let revoked = UserAccess::new(store, clock).delete(&user).await?;
            eprintln!("{user} is deleted; {} key(s) revoked first", revoked.len());
            Ok(())
        }
        Command::Keys(KeysCommand::Delete { user, key }) => {
            let store = open_migrated(&config).await?;
            KeyIssuer::new(store, clock).delete(&user, &key).await?;
            eprintln!("{key} is deleted");
            Ok(())
        }
        Command::Keys(KeysCommand::Create { user, name }) => {
            let store = open_migrated(&config).await?;
            let issued = UserAccess::new(store, clock)
                .issue_key(&user, &name)
                .await?;
            println!("{}", issued.plaintext);
            Ok(())
        }
        Command::Keys(KeysCommand::Revoke { user, key }) => {
            let store = open_migrated(&config).await?;
            let revoked = KeyIssuer::new(store, clock).revoke(&user, &key).await?;
            eprintln!("{} is revoked", revoked.id);
            Ok(())
        }
        Command::Aggregate { date } => {
            let date = date
                .as_deref()
                .map(usage_analytics::daily::parse_day)
                .transpose()?;
            let store = open_migrated(&config).await?;
            let report = DailyAggregation::new(store, clock).run(date).await?;
            println!("{}", serde_json::json!(report));
            Ok(())
        }
        Command::BillOverage { dry_run } => {
            let store = open_migrated(&config).await?;
            let mode = if dry_run {
                RunMode::DryRun
            } else {
                RunMode::Live
            };
            let (_, catalog) = catalog::open(&config, store.clone(), clock.clone()).await?;
            let summary = config
                .billing(store, catalog, clock)?
                .process_all(mode)
                .await?;
            println!("{}", serde_json::json!(summary));
            Ok(())
        }
        Command::ResolveCharge {
            key,
            stripe_item,
            not_created,
        } => {
            let store = open_migrated(&config).await?;
            let (_, catalog) = catalog::open(&config, store.clone(), clock.clone()).await?;
            let resolution = match (stripe_item, not_created) {
                (Some(item), _) => usage_billing::Resolution::Created {
                    stripe_invoice_item_id: item,
                },
                (None, reason) => usage_billing::Resolution::NotCreated {
                    reason: reason.unwrap_or_default(),
                },
            };
            let charge = config
                .billing(store, catalog, clock)?
                .resolve_charge(&key, resolution)
                .await?;
            eprintln!(
                "charge {} is now {}",
                charge.idempotency_key,
                charge.status.as_str()
            );
            Ok(())
        }
        Command::DeadLetters { replay } => {
            let store = open_migrated(&config).await?;
            if replay {
                let report = usage_core::dead_letter::replay(store.as_ref()).await?;
                println!("{}", serde_json::json!(report));
            } else {
                let (count, items) = usage_core::dead_letter::list(store.as_ref(), 100).await?;
                println!("{}", serde_json::json!({ "count": count, "items": items }));
            }
            Ok(())
        }
        Command::PruneUsage { dry_run } => {
            let days = config
                .usage_retention_days
                .ok_or(ServerError::NoRetention)?;
            let store = open_migrated(&config).await?;
            let report = usage_analytics::retention::UsageRetention::new(store, clock, days)
                .run(dry_run)
                .await?;
            println!("{}", serde_json::json!(report));
            Ok(())
        }
        Command::Export {
            user,
            from,
            to,
            format,
        } => {
            let store = open_migrated(&config).await?;
            let events = usage_analytics::events::UsageEvents::new(store, clock.clone());
            if let (Some(from), Some(to)) = (from, to)
                && from >= to
            {
                // Both given and inverted: a mistake, not an empty export.
                return Err(usage_analytics::AnalyticsError::InvalidParameter {
                    name: "from",
                    message: "--from must be before --to".to_owned(),
                }
                .into());
            }
            let from = from.unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let to = to.unwrap_or_else(|| clock.now());
            export(&events, &user, (from, to), format).await
        }
        Command::ReconcileOverage { attention_only } => {
            let store = open_migrated(&config).await?;
            let (_, catalog) = catalog::open(&config, store.clone(), clock.clone()).await?;
            let items: Vec<_> = config
                .billing(store, catalog, clock)?
                .reconcile()
                .await?
                .into_iter()
                .filter(|r| !attention_only || r.status != "ok")
                .collect();
            let drift = items.iter().filter(|r| r.status == "drift").count();
            println!("{}", serde_json::json!({ "drift": drift, "items": items }));
            if drift > 0 {
                return Err(ServerError::BillingDrift(drift));
            }
            Ok(())
        }
        Command::LoginLink(args) => {
            let store = open_migrated(&config).await?;
            let sessions = usage_auth::session::DashboardSessions::new(store, clock.clone());
            let token = sessions.issue_login_link(&args.user, args.ttl_secs).await?;
            println!("{}/dashboard/login?token={token}", config.public_url);
            Ok(())
        }
        Command::Plans(command) => {
            let store = open_migrated(&config).await?;
            let (plans, _) = catalog::open(&config, store, clock.clone()).await?;
            plans_command(&plans, command).await
        }
        Command::Token(args) => {
            let keys = config.jwt_keys()?;
            let store = open_migrated(&config).await?;
            // A token for a user that does not exist would only fail later, less clearly.
            Accounts::new(store, clock.clone()).user(&args.user).await?;
            // The system clock, not a shifted one: tokens are checked on the real clock.
            let now = SystemClock.now();
            println!("{}", keys.mint(&args.user, args.ttl_secs, now)?);
            Ok(())
        }
    }
}

/// Opens the database, applying pending migrations first so that every command works on
/// a fresh SQLite file.
async fn open_migrated(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    usage_store::migrate(&config.database_url).await?;
    Ok(usage_store::open(&config.database_url, &config.pool).await?)
}

/// `plans list`, `plans apply`, `plans export`.
async fn plans_command(
    plans: &usage_core::plans::Plans,
    command: PlansCommand,
) -> Result<(), ServerError> {
    use usage_core::catalog::CatalogFile;
    use usage_core::plans::Change;
    match command {
        PlansCommand::List => {
            for summary in plans.list().await? {
                let plan = &summary.plan;
                println!(
                    "{}\tv{}\t{}\t{}.{:02} {}/month\t{} subscriber(s){}",
                    plan.key,
                    plan.version,
                    plan.name,
                    plan.price_cents / 100,
                    plan.price_cents % 100,
                    plan.currency,
                    summary.subscribers,
                    if plan.archived { "\tarchived" } else { "" }
                );
            }
        }
        PlansCommand::Export { format } => {
            let file = CatalogFile {
                meters: plans.meters().await?.iter().cloned().collect(),
                plans: plans.list().await?.into_iter().map(|s| s.plan).collect(),
                costs: Some(plans.costs().await?.items),
            };
            let text = match format {
                CatalogFormat::Toml => toml::to_string(&file).map_err(|e| e.to_string()),
                CatalogFormat::Json => serde_json::to_string_pretty(&file)
                    .map(|json| json + "\n")
                    .map_err(|e| e.to_string()),
            }
            .map_err(|e| {
                ServerError::Output(std::io::Error::other(format!(
                    "cannot write the catalog: {e}"
                )))
            })?;
            print!("{text}");
        }
        PlansCommand::Apply { file, dry_run } => {
            let unreadable = |reason: String| ServerError::CatalogFile {
                path: file.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(&file).map_err(|e| unreadable(e.to_string()))?;
            // JSON when the file says so (its extension, or an object first), else TOML.
            let json = file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"))
                || text.trim_start().starts_with('{');
            let catalog: CatalogFile = if json {
                usage_core::catalog::from_json(text.as_bytes())
                    .map_err(|e| unreadable(e.to_string()))?
            } else {
                toml::from_str(&text).map_err(|e| unreadable(e.to_string().trim().to_owned()))?
            };
            for (key, change) in plans.apply(&catalog, dry_run).await? {
                let what = match (change, dry_run) {
                    (Change::Created, false) => "created",
                    (Change::Created, true) => "would create",
                    (Change::Revised, false) => {
                        "revised (a new version; users move at their next period)"
                    }
                    (Change::Revised, true) => {
                        "would revise (a new version; users move at their next period)"
                    }
                    (Change::Archived, false) => "archived",
                    (Change::Archived, true) => "would archive",
                    (Change::Restored, false) => "restored",
                    (Change::Restored, true) => "would restore",
                    (Change::Updated, false) => "updated",
                    (Change::Updated, true) => "would update",
                    (Change::Unchanged, _) => "unchanged",
                };
                println!("{key}\t{what}");
            }
        }
    }
    Ok(())
}

/// Streams `user`'s calls to stdout; a reader that goes away (`| head`) ends it quietly.
async fn export(
    events: &usage_analytics::events::UsageEvents,
    user: &usage_core::UserId,
    (from, to): (time::OffsetDateTime, time::OffsetDateTime),
    format: cli::ExportFormat,
) -> Result<(), ServerError> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if format == cli::ExportFormat::Csv {
        writeln!(out, "{}", usage_analytics::events::EventItem::CSV_HEADER)
            .map_err(ServerError::Output)?;
    }
    let written = events
        .export(user, from, to, |page| -> std::io::Result<()> {
            for item in page {
                match format {
                    cli::ExportFormat::Ndjson => {
                        serde_json::to_writer(&mut out, item).map_err(std::io::Error::other)?;
                        out.write_all(b"\n")?;
                    }
                    cli::ExportFormat::Csv => writeln!(out, "{}", item.csv_row())?,
                }
            }
            Ok(())
        })
        .await?
        .and_then(|n| out.flush().map(|()| n));
    match written {
        Ok(n) => {
            tracing::info!(calls = n, "export done");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(ServerError::Output(e)),
    }
}
