//! `ferry`: move a live virtual-machine disk from one host to another.
//!
//! `ferry serve` exports a disk read-only over QUIC at the source;
//! `ferry pull` presents it at the destination at once (NBD, or ublk),
//! fetching absent data on demand and copying the rest in the background.

mod cli;
mod control;
mod docs;
mod index;
mod logging;
mod metrics;
mod notify;
mod present;
mod pull;
#[cfg(test)]
mod readme;
mod serve;
mod serve_nbd;
mod verbs;
mod watch;

use anyhow::Result;
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let log_format = cli.log_format;
    logging::init(log_format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            logging::report_error(log_format, &e);
            if e.downcast_ref::<control::PullStopped>().is_some() {
                std::process::ExitCode::from(control::PullStopped::EXIT_CODE)
            } else if e.downcast_ref::<verbs::MigrationAborted>().is_some() {
                std::process::ExitCode::from(verbs::MigrationAborted::EXIT_CODE)
            } else if e.downcast_ref::<watch::TimedOut>().is_some() {
                std::process::ExitCode::from(watch::TimedOut::EXIT_CODE)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// The `--disk` values as one log field.
fn disk_names(disks: &[std::path::PathBuf]) -> String {
    let v: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
    v.join(",")
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
        cli::Command::Serve(a) => {
            let disk = match (a.disks.is_empty(), &a.nbd_source) {
                (false, _) => disk_names(&a.disks),
                (true, Some(uri)) => uri.clone(),
                (true, None) => String::new(),
            };
            let span = tracing::info_span!("serve", disk = %disk);
            let _in = span.enter();
            serve::run(a)
        }
        cli::Command::Pull(a) => {
            // Lines of several pulls in one journal tell their disk.
            let span = tracing::info_span!("pull", disk = %disk_names(&a.disks));
            let _in = span.enter();
            pull::run(a)
        }
        cli::Command::Status(a) => control::status_command(&a),
        cli::Command::Switchover(a) => control::switchover_command(&a),
        cli::Command::Background(a) => control::background_command(&a),
        cli::Command::Abort(a) => verbs::abort_command(&a),
        cli::Command::Commit(a) => verbs::commit_command(&a),
        cli::Command::List(a) => verbs::list_command(&a),
        cli::Command::ApplyWrites(a) => verbs::apply_writes_command(&a),
        cli::Command::Index(a) => index::run(a),
        cli::Command::GenerateDocs(a) => {
            for f in docs::generate(&a.out)? {
                control::emit(&format!("{}\n", f.display()))?;
            }
            Ok(())
        }
    }
}
