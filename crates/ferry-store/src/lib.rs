//! ferry's local storage.
//!
//! - [`backing`]: the destination's backing file (sparse, the size of the
//!   source), written by fills and guest writes.
//! - [`state`]: the persistent block map beside it: which blocks are present
//!   and which chunks the guest wrote, tied to one source by its id.
//! - [`destination`]: the two opened or created together, atomically,
//!   locked against a second `ferry pull`.
//! - [`guest_writes`]: the guest's writes kept aside by `ferry abort`, and
//!   applied to an image by `ferry apply-writes`.
//! - [`source`]: the source side: opening an image or block device
//!   read-only, its first [`ferry_core::Manifest`] from its holes and the
//!   hash cache (no data read), saving hashes learned later, its source id
//!   sidecar, and noticing changes made behind ferry's back.
//!
//! Unsafe code is denied except in one private module (`mapping`: the
//! backing file's read-only mapping, used only as the source of a
//! `pwrite`).
#![deny(unsafe_code)]

pub mod backing;
pub mod destination;
pub mod guest_writes;
mod lock;
mod mapping;
pub mod precopy;
pub mod runtime;
pub mod source;
pub mod state;

pub use backing::{Backing, BackingError, PairMark};
pub use destination::{open_or_create, Destination, DestinationError, RecoveredWrites};
pub use precopy::Precopy;
pub use runtime::{RuntimeSetting, RuntimeSettings};
pub use source::{FileIdentity, SourceError, SourceId, SourceImage};
pub use state::{Ended, Pairing, StateError, StateFile, StateHeader, Verified};

/// Makes the directory entry of a newly created `path` durable: fsync of
/// its parent directory (a file's own fsync need not cover its name).
pub fn sync_parent_dir(path: &std::path::Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}
