//! ferry's local storage.
//!
//! - [`backing`]: the destination's backing file (sparse, the size of the
//!   source), written by fills and guest writes.
//! - [`state`]: the persistent block map beside it: which blocks are present
//!   and which chunks the guest wrote, tied to one source by its id.
//! - [`source`]: the source side: opening an image or block device
//!   read-only, finding holes and zero chunks, hashing data chunks into a
//!   [`ferry_core::Manifest`], and caching that manifest.
//!
//! Unsafe code is denied except in one private module (`mapping`: the
//! backing file's read-only mapping, used only as the source of a
//! `pwrite`).
#![deny(unsafe_code)]

pub mod backing;
mod mapping;
pub mod source;
pub mod state;

pub use backing::{Backing, BackingError};
pub use source::{SourceError, SourceImage};
pub use state::{StateError, StateFile};
