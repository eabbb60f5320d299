use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tidepool_agent::config::{Args, Config};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in collected logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tidepool-agent: {error}");
            return ExitCode::from(2);
        }
    };
    // One thread: the agent does little, and should cost the node little.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidepool-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tidepool_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
