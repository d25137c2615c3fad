//! [`TransportError`]: everything the server and client can fail with. Each
//! variant names the operation (and the peer address where there is one)
//! and keeps its cause.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::{Fingerprint, IdentityError};
use crate::wire::{ErrorCode, WireError};

/// Errors of the QUIC transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding the UDP socket failed (e.g. the port is in use).
    #[error("cannot bind UDP socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause (`AddrInUse` when the port is taken).
        #[source]
        source: io::Error,
    },
    /// Creating the QUIC endpoint failed.
    #[error("cannot create the QUIC endpoint: {source}")]
    Endpoint {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A server option is out of its range.
    #[error("invalid server options: {reason}")]
    Options {
        /// What is wrong, with the allowed range.
        reason: String,
    },
    /// Starting the source's background read threads failed.
    #[error("cannot start the background read threads: {source}")]
    Threads {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Building the TLS configuration failed.
    #[error("TLS setup ({what}): {source}")]
    Tls {
        /// What was being built.
        what: &'static str,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// Building the QUIC crypto configuration failed.
    #[error("QUIC crypto setup: {0}")]
    QuicCrypto(String),
    /// An identity could not be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The source's host name could not be resolved.
    #[error("cannot resolve the source's name {name}: {source}")]
    Resolve {
        /// The name and port as given.
        name: String,
        /// The resolver's answer.
        #[source]
        source: io::Error,
    },
    /// No connection within the connect timeout.
    #[error("source {addr} unreachable after {} s", after.as_secs_f64())]
    Unreachable {
        /// The source's address.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// Starting a connection failed locally (bad address, endpoint closed).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The source's address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection failed.
    #[error("connection to {addr} failed during {op}: {source}")]
    Connection {
        /// The peer's address.
        addr: SocketAddr,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The source presented a certificate other than the pinned one.
    #[error(
        "source {addr} presented certificate fingerprint {presented}, \
         which is not the pinned {expected}: refusing to talk to it"
    )]
    ServerNotTrusted {
        /// The source's address.
        addr: SocketAddr,
        /// The fingerprint it presented.
        presented: Fingerprint,
        /// The fingerprint we pinned.
        expected: Fingerprint,
    },
    /// The source refused our certificate.
    #[error(
        "the source {addr} refused our certificate (fingerprint {ours}): \
         add `--trust-peer {ours}` at the source"
    )]
    CertificateRefused {
        /// The source's address.
        addr: SocketAddr,
        /// Our fingerprint.
        ours: Fingerprint,
    },
    /// A stream failed (reset, stopped, or the connection went away).
    #[error("stream failed during {op}: {reason}")]
    Stream {
        /// What was being done.
        op: &'static str,
        /// What happened.
        reason: String,
    },
    /// The peer sent a frame that does not decode.
    #[error("malformed frame during {op}: {source}")]
    Wire {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: WireError,
    },
    /// The peer sent something that breaks the protocol.
    #[error("protocol error during {op}: {reason}")]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The source answered with an `Error` frame.
    #[error("source refused {op}: {code}: {message}")]
    Remote {
        /// The request.
        op: &'static str,
        /// The error code.
        code: ErrorCode,
        /// The source's explanation.
        message: String,
    },
    /// The source's manifest cannot be decoded.
    #[error("the source's manifest is invalid: {0}")]
    Manifest(#[from] ferry_core::ManifestError),
    /// After a reconnect the source serves different content (invariant 6):
    /// every request fails from now on.
    #[error(
        "the source changed: its manifest id was {before}, it is now {after}; \
         refusing to mix data of two different disks"
    )]
    SourceChanged {
        /// Source id (hex) at the first connection.
        before: String,
        /// Source id (hex) after the reconnect.
        after: String,
    },
}

impl TransportError {
    /// The server's `Error` code, if this is one.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            TransportError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}
