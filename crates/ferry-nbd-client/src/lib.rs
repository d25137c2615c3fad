//! A read-only async NBD client, for reading a live source through the
//! NBD export of a running QEMU (or qemu-storage-daemon) and learning what
//! the VM changed from a dirty bitmap, as libvirt's backup API does.
//!
//! It speaks fixed newstyle negotiation with `NBD_OPT_GO` (and
//! `NBD_INFO_BLOCK_SIZE`), structured replies, meta contexts
//! (`base:allocation`, `qemu:dirty-bitmap:NAME`), and sends only READ,
//! BLOCK_STATUS and DISC: it has no way to write ([`Command`] has no
//! write). Many requests may be in flight on one connection. Every length
//! the server sends is bounded before anything is allocated for it (see
//! [`wire`]), and the reply parser is a pure function over bytes
//! ([`wire::parse_reply`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_nbd_client::NbdClientError> {
//! use ferry_nbd_client::{dirty_bitmap_context, NbdClient, NbdUri, STATE_DIRTY};
//!
//! let uri = NbdUri::parse("nbd+unix:///disk0?socket=/run/qsd/nbd.sock")?;
//! let bitmap = dirty_bitmap_context("b0");
//! let client = NbdClient::connect(&uri, &[bitmap.clone()]).await?;
//! for e in client.extents(&bitmap, 0, client.size()).await? {
//!     if e.flags & STATE_DIRTY != 0 {
//!         let first = client.read(e.offset, 4096.min(e.length as u32)).await?;
//!         println!("dirty {}+{}: starts with {:?}", e.offset, e.length, &first[..4]);
//!     }
//! }
//! client.disconnect().await
//! # }
//! ```
#![forbid(unsafe_code)]

mod client;
mod error;
mod handshake;
pub mod wire;

pub use client::{NbdAddr, NbdClient, NbdUri, DEFAULT_PORT};
pub use error::NbdClientError;
pub use handshake::{BlockSize, ExportInfo, MetaContext};
pub use wire::{
    Command, ContextExtents, Extent, ServerError, WireError, FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY,
    MAX_READ_LEN,
};

/// The `base:allocation` meta context: which ranges are holes or read as
/// zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the range is not allocated (a hole).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the range is dirty (written since the bitmap
/// was created or last cleared).
pub const STATE_DIRTY: u32 = 1;

/// The meta context name of QEMU's dirty bitmap `name`, as exported with
/// `block-export-add ... bitmaps: [name]`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}
