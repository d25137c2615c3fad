//! The live source's error type: each variant says what failed and with
//! which input (export, bitmap, offset, round).

use std::time::Duration;

use ferry_nbd_client::NbdClientError;

use crate::qmp::QmpError;

/// Errors of the live source and its change tracker.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// An NBD operation failed.
    #[error("live source: {during}: {source}")]
    Nbd {
        /// What was being done (with the export and range).
        during: String,
        /// The client's error.
        #[source]
        source: NbdClientError,
    },
    /// An NBD operation or a wait took longer than its limit.
    #[error("live source: {during}: no answer within {after:?}")]
    Timeout {
        /// What was being done.
        during: String,
        /// The limit.
        after: Duration,
    },
    /// A QMP command failed.
    #[error("live source: {during}: {source}")]
    Qmp {
        /// What was being done (node, bitmap, export).
        during: String,
        /// The monitor's error.
        #[source]
        source: QmpError,
    },
    /// The export does not offer the dirty bitmap asked for.
    #[error(
        "NBD export {export:?} does not export dirty bitmap {bitmap:?} (export it with \
         block-export-add ... \"bitmaps\": [{bitmap:?}])"
    )]
    BitmapNotExported {
        /// The export.
        export: String,
        /// The bitmap.
        bitmap: String,
    },
    /// The export does not offer `base:allocation` (not a QEMU-like server).
    #[error("NBD export {export:?} does not offer base:allocation: cannot map its holes")]
    NoAllocationContext {
        /// The export.
        export: String,
    },
    /// A configuration value is out of range.
    #[error("live source: invalid {what} {value}: {reason}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The dirty bitmap's granularity is coarser than ferry's chunks.
    #[error(
        "dirty bitmap granularity {granularity} is larger than the chunk size {chunk_size}: \
         a dirty grain would cover several chunks; use a granularity that divides {chunk_size}"
    )]
    GranularityTooCoarse {
        /// The bitmap's granularity.
        granularity: u32,
        /// The chunk size.
        chunk_size: u32,
    },
    /// A read outside the export or not aligned as the export requires.
    #[error("live source: read at {offset} of {len} bytes is invalid: {reason}")]
    BadRead {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: u64,
        /// Why.
        reason: String,
    },
    /// The change tracker's call does not fit its state.
    #[error("change tracker: {0}")]
    State(String),
    /// The round limit was reached.
    #[error("change tracker: {max} rounds done, the limit; take the final round")]
    TooManyRounds {
        /// The limit.
        max: u32,
    },
    /// A round failed and its generation was merged back into the recording
    /// one: nothing is lost, the next round reports its chunks again.
    #[error("round {round} failed (its changes were kept for the next round): {source}")]
    RoundFailed {
        /// The generation that failed.
        round: u32,
        /// Why.
        #[source]
        source: Box<LiveError>,
    },
    /// A round failed AND its changes could not be merged back: the
    /// chunks changed during that generation are unknown. The caller must
    /// treat the whole disk as changed.
    #[error(
        "round {round} failed ({cause}) and merging bitmap {bitmap:?} back also failed: \
         {merge}; the changes of that round are unknown, treat every chunk as changed"
    )]
    ChangesLost {
        /// The generation.
        round: u32,
        /// Its bitmap.
        bitmap: String,
        /// Why the round failed.
        cause: String,
        /// Why the merge failed.
        merge: String,
    },
}
