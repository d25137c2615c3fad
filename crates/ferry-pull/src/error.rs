//! Errors of the destination daemon's library.

/// What went wrong opening or preparing a destination disk.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Opening or creating the backing file and its state file, or
    /// keeping the writes recovered from a previous run.
    #[error(transparent)]
    Destination(#[from] ferry_store::DestinationError),
}
