//! `ferry`: move a live virtual-machine disk from one host to another.
//!
//! `ferry serve` exports a disk read-only over QUIC at the source;
//! `ferry pull` presents it at the destination at once (NBD, or ublk),
//! fetching absent data on demand and copying the rest in the background.

mod cli;
mod control;
mod docs;
mod notify;
mod pull;
#[cfg(test)]
mod readme;
mod serve;

use anyhow::Result;
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            if e.downcast_ref::<control::PullStopped>().is_some() {
                std::process::ExitCode::from(control::PullStopped::EXIT_CODE)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Keygen(a) => {
            let id = ferry_transport::identity::Identity::generate_into(&a.dir)?;
            control::emit(&format!("{}\n", id.fingerprint()))
        }
        cli::Command::Fingerprint(a) => {
            let id = ferry_transport::identity::Identity::load(&a.identity)?;
            control::emit(&format!("{}\n", id.fingerprint()))
        }
        cli::Command::Serve(a) => serve::run(a),
        cli::Command::Pull(a) => pull::run(a),
        cli::Command::Status(a) => control::status_command(&a),
        cli::Command::Background(a) => control::background_command(&a),
        cli::Command::GenerateDocs(a) => {
            for f in docs::generate(&a.out)? {
                control::emit(&format!("{}\n", f.display()))?;
            }
            Ok(())
        }
    }
}
