//! The destination side: connects to a source, learns its geometry and
//! id with the handshake (the source pushes its Welcome as 0.5-RTT data, so
//! the disk can be served as soon as the QUIC handshake is done), fetches
//! the manifest when asked, and fetches chunks.
//!
//! A [`Client`] is a cheap, clonable handle; many tasks may call
//! [`Client::read_chunks`] at once, each request on its own QUIC stream.
//! When the connection is lost, the first caller to notice reconnects
//! (exponential backoff from 100 ms doubling to 5 s, forever) while the
//! others wait for it, then every caller re-issues its request: guest I/O
//! waits instead of failing. A reconnect takes the new Welcome and compares
//! its source id with the first one: if the source disk changed,
//! every caller gets [`TransportError::SourceChanged`] from then on
//! (design invariant 6).
//!
//! By job: `connection` (connect, authentication, `Path` reports,
//! reconnect and retry), `read` (read requests), `hedge` (copies of
//! on-demand requests on a lossy path), `manifest` (the manifest fetch),
//! `precopy` (a live source's change rounds, the switchover).

mod addr;
mod connection;
mod hedge;
mod manifest;
mod precopy;
mod read;

pub use precopy::{ChangeFeed, Changes};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::{Geometry, Manifest};
use quinn::{Connection, ConnectionError, Endpoint};

use crate::codec::{frame_name, ReadFail, CODE_ABORTED};
use crate::error::TransportError;
use crate::identity::{Fingerprint, Identity};
use crate::path::PathReports;
use crate::tls::PinnedServerVerifier;
use crate::tuning::Tuning;
use crate::wire::{ErrorCode, Message};

/// First reconnect delay.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest manifest accepted: 16 GiB (a 32 TiB disk at 64 KiB chunks).
pub const MAX_MANIFEST_LEN: u64 = 16 << 30;

pub use addr::{ServerAddr, ServerAddrParseError};

/// What the Welcome says about the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceInfo {
    /// The disk's geometry.
    pub geometry: Geometry,
    /// Identifies the source (see [`ferry_core::Manifest::source_id`]).
    pub source_id: [u8; 32],
    /// The largest the encoded manifest can be.
    pub manifest_len: u64,
    /// A VM writes the source through ferry and it is not frozen: only a
    /// pre-copying destination may copy it.
    pub live: bool,
}

/// The source's answer for one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The chunk's bytes (decompressed), with the hash the source's
    /// manifest gives them. Not yet checked: the caller checks.
    Data {
        /// The manifest's hash.
        hash: [u8; 32],
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The chunk holds only zeros.
    Zero,
}

/// How to reach a source.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The source's address (a host name is looked up at every connection
    /// attempt, reconnects included).
    pub server: ServerAddr,
    /// Our identity (the source must trust its fingerprint).
    pub identity: Identity,
    /// The source's certificate fingerprint, pinned.
    pub server_fingerprint: Fingerprint,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// How long [`Client::connect`] (and each reconnect attempt) may take.
    pub connect_timeout: Duration,
}

/// State of the connection to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Connected (as far as we know).
    Connected,
    /// The connection was lost and has not been re-established yet (or
    /// the source changed, and it never will be).
    Reconnecting,
}

/// Counters of a [`Client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Connection state.
    pub state: ConnState,
    /// Successful reconnects.
    pub reconnects: u64,
    /// UDP payload bytes received, all connections together (quinn's
    /// `udp_rx.bytes`): what really crossed the wire, headers and
    /// retransmissions included.
    pub wire_rx_bytes: u64,
    /// UDP payload bytes sent, all connections together.
    pub wire_tx_bytes: u64,
    /// UDP datagrams received, all connections together.
    pub wire_rx_datagrams: u64,
    /// ACK frames sent, all connections together: about one per
    /// [`crate::tuning::ACK_EVERY_PACKETS`] datagrams received while data
    /// flows, if the source honoured the ACK frequency asked for.
    pub acks_sent: u64,
    /// On-demand reads sent two or three times because the path is lossy
    /// or not yet known to be clean (see [`crate::path::copies`]).
    pub hedged_reads: u64,
    /// The source's last report of its lost packets, per million sent.
    pub source_lost_ppm: u32,
    /// Packets the source had sent on the current connection at its last
    /// report (on-demand reads are hedged until this reaches
    /// [`crate::path::TRUSTED_PACKETS`]).
    pub source_sent_packets: u32,
    /// Bytes the source declared lost and sent again, every connection
    /// together (its reports, at most one report interval old).
    pub source_retransmitted_bytes: u64,
}

/// A handle to a source. Clone it freely.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.server)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The address as given.
    server: ServerAddr,
    /// The address last resolved from it (the one in use).
    addr: Mutex<SocketAddr>,
    ours: Fingerprint,
    expected: Fingerprint,
    connect_timeout: Duration,
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    verifier: Arc<PinnedServerVerifier>,
    info: SourceInfo,
    manifest: tokio::sync::OnceCell<Arc<Manifest>>,
    state: Mutex<State>,
    /// Held by the one task that reconnects.
    reconnect_lock: tokio::sync::Mutex<()>,
    /// The first connection's Welcome stream: the source sends its first
    /// `Path` report on it once it has checked our certificate (see
    /// [`Client::authenticated`]).
    welcome_stream: tokio::sync::Mutex<Option<quinn::RecvStream>>,
    /// Set once [`Client::authenticated`] has seen the first report.
    authenticated: std::sync::atomic::AtomicBool,
    /// The source's latest `Path` report.
    path: Arc<PathReports>,
    /// On-demand reads hedged so far.
    hedged: AtomicU64,
    /// Set by [`Client::close`]: the source is no longer needed, so
    /// [`Client::keep_connected`] stops.
    released: std::sync::atomic::AtomicBool,
}

/// Wire counters summed over connections.
#[derive(Clone, Copy, Default)]
struct WireCounts {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_datagrams: u64,
    acks_sent: u64,
}

impl WireCounts {
    fn add(&mut self, s: &quinn::ConnectionStats) {
        self.rx_bytes += s.udp_rx.bytes;
        self.tx_bytes += s.udp_tx.bytes;
        self.rx_datagrams += s.udp_rx.datagrams;
        self.acks_sent += s.frame_tx.acks;
    }
}

#[derive(Default)]
struct State {
    conn: Option<Connection>,
    /// Bumped on every successful reconnect.
    generation: u64,
    reconnects: u64,
    /// Counts of the connections closed so far.
    closed: WireCounts,
    changed: Option<(String, String)>,
}

/// How a request failed.
enum Fail {
    /// The connection is gone: reconnect and re-issue.
    Lost(ConnectionError),
    /// The source abandoned the response (e.g. shutting down): re-issue.
    Retry(String),
    /// A protocol error: give up.
    Fatal(TransportError),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Client {
    /// What the source's Welcome said: geometry and source id.
    pub fn info(&self) -> &SourceInfo {
        &self.inner.info
    }

    /// Connection state, reconnects and honest wire byte counts.
    pub fn stats(&self) -> ClientStats {
        let (source_lost_ppm, source_sent_packets) = self.inner.path.load();
        let st = self.inner.lock();
        let (mut w, mut state) = (st.closed, ConnState::Reconnecting);
        if let Some(c) = &st.conn {
            w.add(&c.stats());
            if c.close_reason().is_none() && st.changed.is_none() {
                state = ConnState::Connected;
            }
        }
        ClientStats {
            state,
            reconnects: st.reconnects,
            wire_rx_bytes: w.rx_bytes,
            wire_tx_bytes: w.tx_bytes,
            wire_rx_datagrams: w.rx_datagrams,
            acks_sent: w.acks_sent,
            hedged_reads: self.inner.hedged.load(Ordering::Relaxed),
            source_lost_ppm,
            source_sent_packets,
            source_retransmitted_bytes: self.inner.path.lost_bytes(),
        }
    }
}

fn read_fail(op: &'static str, e: ReadFail) -> Fail {
    match e {
        ReadFail::Stream(quinn::ReadError::ConnectionLost(c)) => Fail::Lost(c),
        ReadFail::Stream(quinn::ReadError::Reset(code)) if code == CODE_ABORTED => {
            Fail::Retry(format!("stream reset with code {code}"))
        }
        ReadFail::Stream(e) => Fail::Fatal(TransportError::Stream {
            op,
            reason: e.to_string(),
        }),
        ReadFail::Wire(source) => Fail::Fatal(TransportError::Wire { op, source }),
    }
}

fn write_fail(op: &'static str, e: quinn::WriteError) -> Fail {
    match e {
        quinn::WriteError::ConnectionLost(c) => Fail::Lost(c),
        quinn::WriteError::Stopped(code) if code == CODE_ABORTED => {
            Fail::Retry(format!("stream stopped with code {code}"))
        }
        e => Fail::Fatal(TransportError::Stream {
            op,
            reason: e.to_string(),
        }),
    }
}

fn protocol(op: &'static str, reason: String) -> Fail {
    Fail::Fatal(TransportError::Protocol { op, reason })
}

/// The source's `Error` frame: give up.
fn remote(op: &'static str, code: ErrorCode, message: String) -> Fail {
    Fail::Fatal(TransportError::Remote { op, code, message })
}

fn unexpected(op: &'static str, m: &Message) -> Fail {
    protocol(op, format!("unexpected {} frame", frame_name(m)))
}
