//! Errors of the destination daemon's library.

use std::path::PathBuf;

/// What went wrong opening or preparing a destination disk, or ending its
/// migration.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Opening or creating the backing file and its state file, or
    /// keeping the writes recovered from a previous run.
    #[error(transparent)]
    Destination(#[from] ferry_store::DestinationError),
    /// Reading or recording in the state file.
    #[error(transparent)]
    State(#[from] ferry_store::StateError),
    /// Keeping the guest's writes aside.
    #[error(transparent)]
    Writes(#[from] ferry_store::guest_writes::WritesError),
    /// Other I/O.
    #[error("cannot {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No state file: no migration there.
    #[error("no state file {state}: no migration of that disk to act on (pass --state if it is elsewhere)")]
    NoState {
        /// The path looked at.
        state: PathBuf,
    },
    /// The migration was aborted already.
    #[error(
        "the migration recorded in {state} was aborted at {}; the source \
         is the truth and the guest's writes made here are kept in {}: apply them to the source's \
         image with `ferry apply-writes DIR --to IMAGE`, or remove that directory to discard them; \
         `ferry pull --start-over` discards this disk and pulls it afresh",
        crate::lifecycle::utc(*at_unix),
        crate::lifecycle::shown(writes)
    )]
    Aborted {
        /// The state file.
        state: PathBuf,
        /// When.
        at_unix: u64,
        /// Where the writes were kept.
        writes: PathBuf,
    },
    /// The migration was committed: nothing to abort to.
    #[error(
        "the migration recorded in {state} was committed at {}: the \
         destination is the disk now and its source may be gone, so it cannot be aborted",
        crate::lifecycle::utc(*at_unix)
    )]
    Committed {
        /// The state file.
        state: PathBuf,
        /// When.
        at_unix: u64,
    },
    /// Commit before the copy was verified.
    #[error("not committed: {what}; the source is still needed (wait with `ferry status --wait`, then commit)")]
    NotVerified {
        /// What the state is.
        what: String,
    },
}
