//! `tidepool`: see docs/cli.md.

fn main() -> std::process::ExitCode {
    tidepool_cli::app::main()
}
