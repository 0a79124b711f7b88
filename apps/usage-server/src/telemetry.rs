//! The one tracing setup: stderr, `RUST_LOG` filter (default given by the command),
//! text or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

use crate::cli::LogFormat;

/// Installs the global subscriber; does nothing if one is already installed.
pub fn init(format: LogFormat, default_directive: &str) {
    let wanted = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default_directive.to_owned());
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(layer);
    // Levels per target (nearly every RUST_LOG) go through `Targets`, which keeps no
    // state per span; `EnvFilter`, needed only for span and field directives, takes a
    // lock at every entry into a span, and every request runs in one.
    let _ = match wanted.parse::<Targets>() {
        Ok(targets) => registry.with(targets).try_init(),
        Err(_) => registry
            .with(EnvFilter::try_new(&wanted).unwrap_or_else(|_| EnvFilter::new(default_directive)))
            .try_init(),
    };
}
