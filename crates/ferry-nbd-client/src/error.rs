//! The client's error type: each variant names the operation, and for
//! transmission errors the offset and length, and what the server said.

use std::io;

use crate::wire::{Command, ServerError, WireError};

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// The NBD URI could not be understood.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting the socket failed.
    #[error("cannot connect to the NBD server at {addr}: {source}")]
    Connect {
        /// The address (host:port or socket path).
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A socket error during the handshake.
    #[error("NBD handshake: I/O error while {during}: {source}")]
    HandshakeIo {
        /// What the client was doing.
        during: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server broke the negotiation protocol.
    #[error("NBD handshake: the server broke the protocol: {0}")]
    Handshake(String),
    /// The server requires TLS, which this client does not speak.
    #[error("NBD server requires TLS for export {export:?}: {message}")]
    TlsRequired {
        /// The export asked for.
        export: String,
        /// The server's message.
        message: String,
    },
    /// The server has no export of that name.
    #[error("NBD server has no export {export:?}: {message}")]
    NoSuchExport {
        /// The export asked for.
        export: String,
        /// The server's message.
        message: String,
    },
    /// The server refused an option the client needs.
    #[error("NBD server refused {option} for export {export:?} (reply {reply:#x}): {message}")]
    OptionRefused {
        /// The option (`NBD_OPT_GO`, ...).
        option: &'static str,
        /// The export.
        export: String,
        /// The error reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The export does not offer a meta context that was asked for (for
    /// `qemu:dirty-bitmap:NAME`: no bitmap NAME was exported with it).
    #[error(
        "NBD export {export:?} does not offer meta context {context:?} (offered: {offered:?})"
    )]
    MetaContextNotOffered {
        /// The export.
        export: String,
        /// The context asked for.
        context: String,
        /// The contexts the server did offer among those asked.
        offered: Vec<String>,
    },
    /// A block status query named a context this connection did not
    /// negotiate.
    #[error("meta context {0:?} was not negotiated on this connection")]
    ContextNotNegotiated(String),
    /// A request the client refuses to send (past the export's end,
    /// misaligned, too long, empty).
    #[error("{op} at offset {offset} length {len}: invalid request: {reason}")]
    InvalidRequest {
        /// The command.
        op: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Why it is refused.
        reason: String,
    },
    /// The server answered the request with an error.
    #[error("{op} at offset {offset} length {len} failed on the server: {error}")]
    Server {
        /// The command.
        op: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// What the server said.
        error: ServerError,
    },
    /// The server's reply to this request broke the protocol; the
    /// connection is closed.
    #[error("{op} at offset {offset} length {len}: protocol violation by the server: {source}")]
    Protocol {
        /// The command.
        op: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The violation.
        #[source]
        source: WireError,
    },
    /// The connection ended (or was closed) before the reply.
    #[error("{op} at offset {offset} length {len}: NBD connection lost: {reason}")]
    ConnectionLost {
        /// The command.
        op: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Why the connection ended.
        reason: String,
    },
}
