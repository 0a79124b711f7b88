use std::process::ExitCode;

use clap::Parser;
use usage_server::cli::{Cli, Command};

// With 100,000 keys glibc's malloc took 12% of the request workers' time; mimalloc cut the
// server's CPU per call from 42.8 to 34.4 µs there (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as clap renders them.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Bad input: one line, the reason first.
            let rendered = e.render().to_string();
            let reason = rendered.split("\n\n").next().unwrap_or_default();
            let line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("{line} (see --help)");
            return ExitCode::from(2);
        }
    };
    // Commands other than serve stay quiet unless something is wrong.
    let default_level = match cli.command {
        None | Some(Command::Serve) => "info",
        Some(_) => "warn",
    };
    usage_server::telemetry::init(cli.global.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(usage_server::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the driver put in its message.
            let message = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
