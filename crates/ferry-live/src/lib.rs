//! The live source of issue 26 (item 2a): a disk that a running VM keeps
//! writing, read through the NBD export of its QEMU (or
//! qemu-storage-daemon), with what changed learnt from dirty-bitmap
//! generations (see `docs/decisions/live-source-through-qemu-nbd.md` and
//! `docs/decisions/live-source-rounds.md`).
//!
//! - [`Qmp`]: an async QMP client (the monitor that adds, freezes, exports
//!   and removes the bitmaps).
//! - [`LiveSource`]: a pool of read-only NBD connections to the export:
//!   size, per-chunk allocation from `base:allocation` (no data read), and
//!   reads bounded by the server's block size.
//! - [`ChangeTracker`]: pre-copy rounds. Writes land in the recording
//!   generation; a round freezes it and starts the next in one QMP
//!   `transaction`, exports the frozen one on its own export, reads its
//!   `qemu:dirty-bitmap` context, unexports it, and keeps it until the
//!   caller says the round's chunks were sent ([`ChangeTracker::complete`])
//!   or not ([`ChangeTracker::abandon`]: merged back, nothing lost).
//! - [`WriteWatch`]: whether a node was written at all since a moment (one
//!   bitmap's count), for a source that must not change.
//!
//! Everything is bounded: every QMP command and NBD operation has a
//! timeout, the number of rounds is capped, and chunk sets are one bit per
//! chunk.
#![forbid(unsafe_code)]

mod chunks;
mod error;
pub mod qmp;
mod rounds;
mod source;
mod watch;

pub use chunks::ChunkSet;
pub use error::LiveError;
pub use qmp::{Qmp, QmpError};
pub use rounds::{ChangeTracker, Round, TrackerConfig};
pub use source::{dirty_chunks, LiveSource, SourceConfig, MAX_CHUNK_SIZE, MAX_CONNECTIONS};
pub use watch::{export_node, vm_running, WriteWatch};

/// ferry's chunk size, and the dirty-bitmap granularity the tracker uses by
/// default: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
