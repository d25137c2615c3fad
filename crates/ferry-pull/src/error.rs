//! Errors of the destination daemon's library.

use std::path::PathBuf;

/// What went wrong opening or preparing a destination disk.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Opening or creating the backing file and its state file.
    #[error(transparent)]
    Destination(#[from] ferry_store::DestinationError),
    /// Syncing the backing file before recording the writes recovered from
    /// a previous run.
    #[error("cannot sync the backing file {path}")]
    SyncBacking {
        /// The backing file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Recording the writes recovered from a previous run in the state file.
    #[error(transparent)]
    State(#[from] ferry_store::StateError),
}
