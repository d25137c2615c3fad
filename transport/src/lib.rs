//! ferry's QUIC transport: the wire protocol between a source (`ferry serve`)
//! and a destination (`ferry pull`).
//!
//! - [`identity`]: self-signed certificates (rcgen) and their SHA-256
//!   fingerprints, which both ends pin.
//! - [`tls`]: rustls configurations (ring provider, TLS 1.3 only, ALPN
//!   `ferry/1`) that accept exactly the pinned peer certificates, both ways.
//! - [`wire`]: versioned, length-prefixed frames; pure encode/decode.
//! - `codec`: framing and compression for both ends: frames read from and
//!   written to quinn streams, chunk frames built (zstd) and opened.
//! - [`tuning`]: QUIC windows sized to the bandwidth-delay product, socket
//!   buffers, keep-alive and idle timeout.
//! - [`server`]: the source side, serving chunks of a [`server::ChunkSource`].
//! - [`client`]: the destination side, with reconnect and re-issue.
//! - `socket`: the UDP socket under quinn, whose receive wake-ups are
//!   moderated (one per window while datagrams stream in).
//! - `background`: the threads, of lower CPU priority, on which the source
//!   reads and compresses background chunks.
//! - [`path`]: the source's packet-loss estimate and the destination's rule
//!   for hedging on-demand reads on a lossy path.
//!
//! Every error is typed ([`IdentityError`], [`WireError`],
//! [`TransportError`]); nothing a peer sends can make this crate panic.
#![forbid(unsafe_code)]

mod background;
pub mod client;
mod codec;
pub mod congestion;
pub mod error;
pub mod identity;
mod net;
pub mod path;
pub mod server;
mod socket;
pub mod tls;
pub mod tuning;
pub mod wire;

pub use client::{
    ChangeFeed, Changes, Client, ClientOptions, ClientStats, ConnState, Fetched, ServerAddr,
    ServerAddrParseError, SourceInfo,
};
pub use error::TransportError;
pub use identity::{Fingerprint, FingerprintParseError, Identity, IdentityError};
pub use server::{ChunkSource, DiskReads, LiveChanges, Server, ServerOptions};
pub use tuning::Tuning;
pub use wire::{ErrorCode, Message, Priority, WireError, PROTOCOL_VERSION};
