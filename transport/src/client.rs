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

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use ferry_core::{Geometry, Manifest};
use quinn::{Connection, ConnectionError, Endpoint, VarInt};

use crate::codec::{self, frame_name, ReadFail, CODE_ABORTED, SMALL_FRAME};
use crate::error::TransportError;
use crate::identity::{Fingerprint, Identity};
use crate::net;
use crate::path::{self, PathReports};
use crate::tls::{self, PinnedServerVerifier};
use crate::tuning::Tuning;
use crate::wire::{self, Message, Priority, MAX_MANIFEST_PART, MAX_READ_BYTES, PROTOCOL_VERSION};

/// First reconnect delay.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest manifest accepted: 16 GiB (a 32 TiB disk at 64 KiB chunks).
pub const MAX_MANIFEST_LEN: u64 = 16 << 30;

/// What the Welcome says about the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceInfo {
    /// The disk's geometry.
    pub geometry: Geometry,
    /// The manifest's hash, identifying the source's content.
    pub source_id: [u8; 32],
    /// Length of the encoded manifest.
    pub manifest_len: u64,
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
    /// The source's address.
    pub server: SocketAddr,
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
}

/// A handle to a source. Clone it freely.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.addr)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    addr: SocketAddr,
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
    /// Connects (within `connect_timeout`, else
    /// [`TransportError::Unreachable`] naming the address) and takes the
    /// source's Welcome: geometry and source id, authenticated by the
    /// source's pinned certificate.
    ///
    /// The Welcome is 0.5-RTT data: it arrives with the source's handshake
    /// flight, before the source has checked *our* certificate, so this
    /// returns after one round trip even if the source will refuse us.
    /// [`Client::authenticated`] tells that (one round trip later); any
    /// request fails with [`TransportError::CertificateRefused`] too.
    pub async fn connect(opts: ClientOptions) -> Result<Client, TransportError> {
        let (config, verifier) = tls::quinn_client_config_with_verifier(
            &opts.identity,
            opts.server_fingerprint,
            &opts.tuning,
        )?;
        let bind: SocketAddr = if opts.server.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = net::udp_socket(bind, opts.tuning.socket_buffer)?;
        let endpoint = net::endpoint(
            sock,
            None,
            opts.tuning.max_udp_payload,
            opts.tuning.recv_moderation,
        )?;
        let mut inner = Inner {
            addr: opts.server,
            ours: opts.identity.fingerprint(),
            expected: opts.server_fingerprint,
            connect_timeout: opts.connect_timeout,
            endpoint,
            config,
            verifier,
            // Replaced below by the source's.
            info: SourceInfo {
                geometry: Geometry::new(0, 4096),
                source_id: [0; 32],
                manifest_len: 0,
            },
            manifest: tokio::sync::OnceCell::new(),
            state: Mutex::new(State::default()),
            reconnect_lock: tokio::sync::Mutex::new(()),
            welcome_stream: tokio::sync::Mutex::new(None),
            authenticated: std::sync::atomic::AtomicBool::new(false),
            path: Arc::new(PathReports::default()),
            hedged: AtomicU64::new(0),
            released: std::sync::atomic::AtomicBool::new(false),
        };
        let (conn, info, stream) = inner.establish().await?;
        *inner.welcome_stream.get_mut() = Some(stream);
        tracing::info!(
            addr = %inner.addr,
            source_id = %hex(&info.source_id),
            size = info.geometry.disk_size,
            "connected to the source"
        );
        inner.info = info;
        inner
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .conn = Some(conn);
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    /// Resolves once the source has accepted our certificate (it sends its
    /// first `Path` report on the Welcome stream when its handshake
    /// completes; a task then keeps reading the reports), or fails with
    /// [`TransportError::CertificateRefused`] (or the connection error)
    /// if it did not. About one round trip after [`Client::connect`]
    /// returns. Only the first connection is watched this way; requests
    /// on any connection fail with the same error if refused.
    pub async fn authenticated(&self) -> Result<(), TransportError> {
        if self.is_authenticated() {
            return Ok(());
        }
        let mut slot = self.inner.welcome_stream.lock().await;
        if self.is_authenticated() {
            return Ok(());
        }
        let Some(mut recv) = slot.take() else {
            return Err(TransportError::Stream {
                op: "authentication",
                reason: "the source's acceptance was already found missing".into(),
            });
        };
        match codec::read_frame(&mut recv, SMALL_FRAME).await {
            Ok(Some(Message::Path {
                lost_ppm,
                sent_packets,
            })) => {
                self.inner.path.store(lost_ppm, sent_packets);
                self.inner.authenticated.store(true, Ordering::Release);
                tokio::spawn(read_path_reports(recv, self.inner.path.clone()));
                Ok(())
            }
            Ok(Some(m)) => Err(TransportError::Protocol {
                op: "authentication",
                reason: format!("unexpected {} frame after the Welcome", frame_name(&m)),
            }),
            Ok(None) => Err(TransportError::Protocol {
                op: "authentication",
                reason: "the source closed its Welcome stream without accepting us".into(),
            }),
            Err(ReadFail::Stream(quinn::ReadError::ConnectionLost(e))) => {
                Err(self.inner.classify("authentication", e))
            }
            Err(ReadFail::Stream(e)) => Err(TransportError::Stream {
                op: "authentication",
                reason: e.to_string(),
            }),
            Err(ReadFail::Wire(source)) => Err(TransportError::Wire {
                op: "authentication",
                source,
            }),
        }
    }

    /// Whether [`Client::authenticated`] has seen the source accept us.
    pub fn is_authenticated(&self) -> bool {
        self.inner.authenticated.load(Ordering::Acquire)
    }

    /// What the source's Welcome said: geometry and source id.
    pub fn info(&self) -> &SourceInfo {
        &self.inner.info
    }

    /// The source's manifest: fetched on the first call (on its own
    /// stream, re-issued across reconnects like a read), then cached. Its
    /// hash must be the source id of the Welcome.
    pub async fn manifest(&self) -> Result<Arc<Manifest>, TransportError> {
        let inner = &self.inner;
        inner
            .manifest
            .get_or_try_init(|| async {
                let m = inner
                    .with_retry("manifest", |conn| {
                        let info = inner.info;
                        async move { get_manifest(&conn, info).await }
                    })
                    .await?;
                Ok::<_, TransportError>(Arc::new(m))
            })
            .await
            .cloned()
    }

    /// The manifest, if it has been fetched.
    pub fn manifest_if_fetched(&self) -> Option<Arc<Manifest>> {
        self.inner.manifest.get().cloned()
    }

    /// Fetches chunks `first..first + count`, in order: data (not yet
    /// checked against its hash: the caller checks) or a zero marker.
    /// Requests larger than [`MAX_READ_BYTES`] are split. On a lost
    /// connection it reconnects with exponential backoff (100 ms doubling
    /// to 5 s, forever) and re-issues the request: callers wait instead of
    /// failing. Returns `Err` only for protocol errors: the source changed
    /// ([`TransportError::SourceChanged`]), the source's `Error` frames
    /// ([`TransportError::Remote`], e.g. an out-of-range chunk), or
    /// malformed responses.
    pub async fn read_chunks(
        &self,
        first: u64,
        count: u32,
        priority: Priority,
    ) -> Result<Vec<Fetched>, TransportError> {
        let chunk_size = u64::from(self.inner.info.geometry.chunk_size);
        let per = (MAX_READ_BYTES / chunk_size).clamp(1, u64::from(u32::MAX)) as u32;
        let mut out = Vec::with_capacity(count as usize);
        let mut done = 0u32;
        while done < count {
            let n = per.min(count - done);
            let start = first
                .checked_add(u64::from(done))
                .ok_or(TransportError::Protocol {
                    op: "read",
                    reason: "chunk index overflows".into(),
                })?;
            let g = self.inner.info.geometry;
            let once = |priority| {
                self.inner.with_retry("read", move |conn| async move {
                    request(&conn, g, start, n, priority).await
                })
            };
            let (lost_ppm, sent_packets) = self.inner.path.load();
            let copies = match priority {
                Priority::OnDemand => {
                    path::copies(lost_ppm, sent_packets, u64::from(n) * chunk_size)
                }
                _ => 1,
            };
            let got = if copies > 1 {
                // The copies go on separate streams, HEDGE_SPACING apart
                // (so they leave in separate datagrams), the later ones
                // just below the first in priority (so a lossless first
                // answer is not slowed by them); the first complete answer
                // wins and dropping the others stops their streams.
                self.inner.hedged.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let mut racing: Vec<Racer<'_, Vec<Fetched>>> = vec![Box::pin(once(priority))];
                for k in 1..copies {
                    let once = &once;
                    racing.push(Box::pin(async move {
                        tokio::time::sleep(HEDGE_SPACING * k).await;
                        once(Priority::Hedge).await
                    }));
                }
                let got = first_ok(racing).await;
                tracing::debug!(
                    start,
                    copies,
                    won = got.as_ref().map(|(i, _)| *i).ok(),
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "hedged read"
                );
                got.map(|(_, v)| v)
            } else {
                once(priority).await
            };
            out.extend(got?);
            done += n;
        }
        Ok(out)
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
        }
    }

    /// Closes the connection to the source (requests in flight fail over
    /// to a reconnect if the handle is used again) and ends
    /// [`Client::keep_connected`].
    pub fn close(&self) {
        self.inner.released.store(true, Ordering::Release);
        if let Some(c) = &self.inner.lock().conn {
            c.close(VarInt::from_u32(0), b"destination closed");
        }
    }

    /// Watches the connection and replaces it as soon as it is lost, even
    /// when no request is waiting on it, so the loss shows in
    /// [`Client::stats`] within the idle timeout (see
    /// [`crate::tuning::Tuning::idle_timeout`]) and is logged once, and a
    /// connection is ready when the next request comes. Returns `Ok` after
    /// [`Client::close`]; an error if the source refused us or changed (no
    /// reconnect can fix either).
    pub async fn keep_connected(&self) -> Result<(), TransportError> {
        let inner = &self.inner;
        loop {
            let (generation, conn) = {
                let st = inner.lock();
                if inner.released.load(Ordering::Acquire) {
                    return Ok(());
                }
                if let Some(e) = inner.source_changed(&st) {
                    return Err(e);
                }
                (st.generation, st.conn.clone())
            };
            if let Some(conn) = conn {
                let reason = conn.closed().await;
                if inner.released.load(Ordering::Acquire) {
                    return Ok(());
                }
                if tls::is_cert_refusal(&reason) {
                    return Err(inner.classify("connection", reason));
                }
                if !matches!(reason, ConnectionError::LocallyClosed) {
                    tracing::warn!(addr = %inner.addr, "lost the connection to the source: {reason}; reconnecting");
                }
            }
            inner.reconnect(generation).await?;
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn source_changed(&self, st: &State) -> Option<TransportError> {
        st.changed
            .as_ref()
            .map(|(before, after)| TransportError::SourceChanged {
                before: before.clone(),
                after: after.clone(),
            })
    }

    /// Maps a connection failure to the clearest error: certificate
    /// problems either way, a timeout as unreachable.
    fn classify(&self, op: &'static str, e: ConnectionError) -> TransportError {
        if let Some(presented) = self.verifier.take_refused() {
            return TransportError::ServerNotTrusted {
                addr: self.addr,
                presented,
                expected: self.expected,
            };
        }
        if tls::is_cert_refusal(&e) {
            return TransportError::CertificateRefused {
                addr: self.addr,
                ours: self.ours,
            };
        }
        if matches!(e, ConnectionError::TimedOut) {
            return TransportError::Unreachable {
                addr: self.addr,
                after: self.connect_timeout,
            };
        }
        TransportError::Connection {
            addr: self.addr,
            op,
            source: e,
        }
    }

    /// Connects and takes the Welcome, within the connect timeout. A
    /// handshake that times out sooner (QUIC's idle timeout, which is
    /// sized to notice a dead peer quickly) is tried again until then.
    async fn establish(
        &self,
    ) -> Result<(Connection, SourceInfo, quinn::RecvStream), TransportError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.establish_inner()).await {
                Ok(Err(TransportError::Unreachable { .. }))
                    if tokio::time::Instant::now() + BACKOFF_START < deadline =>
                {
                    tokio::time::sleep(BACKOFF_START).await;
                }
                Ok(r) => return r,
                Err(_) => {
                    return Err(TransportError::Unreachable {
                        addr: self.addr,
                        after: self.connect_timeout,
                    })
                }
            }
        }
    }

    async fn establish_inner(
        &self,
    ) -> Result<(Connection, SourceInfo, quinn::RecvStream), TransportError> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), self.addr, tls::SERVER_NAME)
            .map_err(|source| TransportError::Connect {
                addr: self.addr,
                source,
            })?;
        let conn = connecting
            .await
            .map_err(|e| self.classify("handshake", e))?;
        match welcome(&conn).await {
            Ok((m, stream)) => Ok((conn, m, stream)),
            Err(f) => {
                // Count the bytes of the failed connection too.
                let s = conn.stats();
                let mut st = self.lock();
                st.closed.add(&s);
                drop(st);
                conn.close(VarInt::from_u32(0), b"welcome failed");
                Err(match f {
                    Fail::Lost(e) => self.classify("welcome", e),
                    Fail::Retry(reason) => TransportError::Stream {
                        op: "welcome",
                        reason,
                    },
                    Fail::Fatal(e) => e,
                })
            }
        }
    }

    /// Replaces the connection of generation `seen`; returns at once if
    /// another task already did. Only one reconnect runs at a time.
    async fn reconnect(&self, seen: u64) -> Result<(), TransportError> {
        let _guard = self.reconnect_lock.lock().await;
        {
            let mut st = self.lock();
            if let Some(e) = self.source_changed(&st) {
                return Err(e);
            }
            if st.generation != seen {
                return Ok(());
            }
            if let Some(old) = st.conn.take() {
                let s = old.stats();
                st.closed.add(&s);
                old.close(VarInt::from_u32(0), b"reconnecting");
            }
        }
        let mut delay = BACKOFF_START;
        let mut failures = 0u64;
        loop {
            match self.establish().await {
                // Requests on the new connection prove the source accepted
                // us (a refusal fails them), so its Welcome stream is not
                // waited for; it is read for the source's `Path` reports.
                Ok((conn, info, welcome)) => {
                    // Until the new connection's first report, it has sent
                    // nothing to judge by.
                    self.path.store(0, 0);
                    tokio::spawn(read_path_reports(welcome, self.path.clone()));
                    let mut st = self.lock();
                    let (before, after) = (self.info.source_id, info.source_id);
                    if before != after {
                        conn.close(VarInt::from_u32(0), b"source changed");
                        let s = conn.stats();
                        st.closed.add(&s);
                        st.changed = Some((hex(&before), hex(&after)));
                        let e = self.source_changed(&st).expect("just set");
                        tracing::error!(addr = %self.addr, "{e}");
                        return Err(e);
                    }
                    st.conn = Some(conn);
                    st.generation += 1;
                    st.reconnects += 1;
                    tracing::info!(addr = %self.addr, reconnects = st.reconnects, "reconnected to the source");
                    return Ok(());
                }
                // Said once per outage; the retries are for debugging.
                Err(e) if failures == 0 => {
                    failures += 1;
                    tracing::warn!(addr = %self.addr, "reconnect failed: {e}; retrying with backoff up to {BACKOFF_MAX:?}");
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(addr = %self.addr, failures, "reconnect failed: {e}; retrying in {delay:?}");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs `attempt` on the current connection until it succeeds or
    /// fails for good, reconnecting (with backoff) when the connection is
    /// lost and re-issuing when the source abandoned the request.
    async fn with_retry<T, F, Fut>(&self, op: &'static str, attempt: F) -> Result<T, TransportError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, Fail>>,
    {
        let mut delay = BACKOFF_START;
        loop {
            let (generation, conn) = {
                let st = self.lock();
                if let Some(e) = self.source_changed(&st) {
                    return Err(e);
                }
                (st.generation, st.conn.clone())
            };
            let Some(conn) = conn else {
                self.reconnect(generation).await?;
                continue;
            };
            match attempt(conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Lost(e)) if tls::is_cert_refusal(&e) => {
                    // Refused by the source: no reconnect will fix that.
                    return Err(self.classify(op, e));
                }
                Err(Fail::Lost(e)) => {
                    tracing::debug!(addr = %self.addr, op, "connection lost during the request: {e}");
                    self.reconnect(generation).await?;
                }
                Err(Fail::Retry(reason)) => {
                    tracing::debug!(addr = %self.addr, op, "request abandoned by the source ({reason}); re-issuing in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                    if conn.close_reason().is_some() {
                        self.reconnect(generation).await?;
                    }
                }
            }
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
fn remote(op: &'static str, code: wire::ErrorCode, message: String) -> Fail {
    Fail::Fatal(TransportError::Remote { op, code, message })
}

fn unexpected(op: &'static str, m: &Message) -> Fail {
    protocol(op, format!("unexpected {} frame", frame_name(m)))
}

/// Reads the source's `Path` reports on a Welcome stream until it ends,
/// keeping the latest in `path`.
async fn read_path_reports(mut recv: quinn::RecvStream, path: Arc<PathReports>) {
    loop {
        match codec::read_frame(&mut recv, SMALL_FRAME).await {
            Ok(Some(Message::Path {
                lost_ppm,
                sent_packets,
            })) => path.store(lost_ppm, sent_packets),
            Ok(Some(m)) => {
                tracing::debug!("unexpected {} frame on the Welcome stream", frame_name(&m));
                return;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Takes the Welcome the source pushes on the first unidirectional stream
/// (sent with its handshake flight): the geometry and the source id. The
/// stream stays open until the source has accepted our certificate.
async fn welcome(conn: &Connection) -> Result<(SourceInfo, quinn::RecvStream), Fail> {
    const OP: &str = "welcome";
    let mut recv = conn.accept_uni().await.map_err(Fail::Lost)?;
    match codec::read_frame(&mut recv, SMALL_FRAME)
        .await
        .map_err(|e| read_fail(OP, e))?
    {
        Some(Message::Welcome {
            version,
            manifest_len,
            disk_size,
            chunk_size,
            source_id,
        }) => {
            if version != PROTOCOL_VERSION {
                return Err(protocol(
                    OP,
                    format!("source answered with version {version}"),
                ));
            }
            if manifest_len > MAX_MANIFEST_LEN {
                return Err(protocol(
                    OP,
                    format!("manifest of {manifest_len} bytes is too large"),
                ));
            }
            if chunk_size < ferry_core::geometry::BLOCK_SIZE
                || !chunk_size.is_multiple_of(ferry_core::geometry::BLOCK_SIZE)
                || chunk_size > 64 << 20
            {
                return Err(protocol(OP, format!("bad chunk size {chunk_size}")));
            }
            Ok((
                SourceInfo {
                    geometry: Geometry::new(disk_size, chunk_size),
                    source_id,
                    manifest_len,
                },
                recv,
            ))
        }
        Some(Message::Error { code, message }) => Err(remote(OP, code, message)),
        Some(m) => Err(unexpected(OP, &m)),
        None => Err(protocol(
            OP,
            "source closed the stream without a Welcome".into(),
        )),
    }
}

/// Fetches the manifest on a new stream and checks it against the Welcome.
async fn get_manifest(conn: &Connection, info: SourceInfo) -> Result<Manifest, Fail> {
    const OP: &str = "manifest";
    let (mut send, mut recv) = conn.open_bi().await.map_err(Fail::Lost)?;
    codec::write_msg(&mut send, &Message::GetManifest)
        .await
        .map_err(|e| write_fail(OP, e))?;
    let _ = send.finish();
    let manifest_len = info.manifest_len;
    let mut bytes = Vec::with_capacity(manifest_len.min(64 << 20) as usize);
    loop {
        match codec::read_frame(&mut recv, MAX_MANIFEST_PART + 1)
            .await
            .map_err(|e| read_fail(OP, e))?
        {
            Some(Message::ManifestBytes(part)) => {
                if (bytes.len() + part.len()) as u64 > manifest_len {
                    return Err(protocol(OP, "more manifest bytes than announced".into()));
                }
                bytes.extend_from_slice(&part);
            }
            Some(Message::Error { code, message }) => return Err(remote(OP, code, message)),
            Some(m) => return Err(unexpected(OP, &m)),
            None => break,
        }
    }
    if bytes.len() as u64 != manifest_len {
        return Err(protocol(
            OP,
            format!(
                "manifest ended after {} of {manifest_len} bytes",
                bytes.len()
            ),
        ));
    }
    let m = Manifest::decode(&bytes).map_err(|e| Fail::Fatal(e.into()))?;
    if m.source_id() != info.source_id || m.geometry() != info.geometry {
        return Err(protocol(
            OP,
            "the manifest does not match the source id of the Welcome".into(),
        ));
    }
    Ok(m)
}

/// One Read on a new stream.
/// Time between two copies of a hedged request: enough for quinn to send
/// the first in a datagram of its own, so one lost datagram does not lose
/// every copy (a lost request is found only by quinn's probe timeout,
/// about 1.5 RTT later).
const HEDGE_SPACING: Duration = Duration::from_millis(1);

/// One of the racing copies of a hedged request.
type Racer<'a, T> = Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send + 'a>>;

/// The first `Ok` of `racing` (polled together) with its index, or the last
/// error when every one fails. The others are dropped on return.
async fn first_ok<T>(mut racing: Vec<Racer<'_, T>>) -> Result<(usize, T), TransportError> {
    let mut index: Vec<usize> = (0..racing.len()).collect();
    std::future::poll_fn(move |cx| {
        let mut i = 0;
        while i < racing.len() {
            match racing[i].as_mut().poll(cx) {
                Poll::Ready(Ok(v)) => return Poll::Ready(Ok((index[i], v))),
                Poll::Ready(Err(e)) => {
                    drop(racing.remove(i));
                    index.remove(i);
                    if racing.is_empty() {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Pending => i += 1,
            }
        }
        Poll::Pending
    })
    .await
}

async fn request(
    conn: &Connection,
    g: Geometry,
    first: u64,
    count: u32,
    priority: Priority,
) -> Result<Vec<Fetched>, Fail> {
    const OP: &str = "read";
    let (mut send, mut recv) = conn.open_bi().await.map_err(Fail::Lost)?;
    let _ = send.set_priority(priority.stream_priority());
    let req = Message::Read {
        first_chunk: first,
        count,
        priority,
    };
    codec::write_msg(&mut send, &req)
        .await
        .map_err(|e| write_fail(OP, e))?;
    let _ = send.finish();
    let max = (g.chunk_size as usize + 128).min(wire::MAX_FRAME_LEN);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..u64::from(count) {
        let want = first + i;
        match codec::read_frame(&mut recv, max)
            .await
            .map_err(|e| read_fail(OP, e))?
        {
            Some(Message::Zero { index }) => {
                if index != want {
                    return Err(protocol(OP, format!("got chunk {index}, expected {want}")));
                }
                out.push(Fetched::Zero);
            }
            Some(m @ (Message::Chunk { .. } | Message::ZChunk { .. })) => {
                let raw_len = (want < g.chunks()).then(|| g.chunk_len(want));
                let codec::OpenedChunk { index, hash, data } =
                    codec::open_chunk(m, raw_len).map_err(|reason| protocol(OP, reason))?;
                if index != want {
                    return Err(protocol(OP, format!("got chunk {index}, expected {want}")));
                }
                if want >= g.chunks() || data.len() != g.chunk_len(want) as usize {
                    return Err(protocol(
                        OP,
                        format!(
                            "chunk {want} has {} bytes, expected {}",
                            data.len(),
                            g.chunk_len(want)
                        ),
                    ));
                }
                out.push(Fetched::Data { hash, bytes: data });
            }
            Some(Message::Error { code, message }) => return Err(remote(OP, code, message)),
            Some(m) => return Err(unexpected(OP, &m)),
            None => {
                return Err(protocol(
                    OP,
                    format!("response ended after {i} of {count} chunks"),
                ))
            }
        }
    }
    match codec::read_frame(&mut recv, SMALL_FRAME).await {
        Ok(None) => {}
        // All data is here; a connection lost just now does not matter.
        Err(ReadFail::Stream(quinn::ReadError::ConnectionLost(_))) => {}
        Ok(Some(Message::Error { code, message })) => return Err(remote(OP, code, message)),
        Ok(Some(m)) => return Err(unexpected(OP, &m)),
        Err(e) => return Err(read_fail(OP, e)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(what: &str) -> TransportError {
        TransportError::Protocol {
            op: "read",
            reason: what.into(),
        }
    }

    fn after(ms: u64, r: Result<u32, TransportError>) -> Racer<'static, u32> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            r
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_wins_and_failures_wait_for_the_others() {
        // The quickest Ok wins, whatever its place.
        let got = first_ok(vec![after(30, Ok(1)), after(10, Ok(2)), after(20, Ok(3))]).await;
        assert_eq!(got.unwrap(), (1, 2));
        // A quick failure does not end the race.
        let got = first_ok(vec![after(1, Err(fail("a"))), after(5, Ok(7))]).await;
        assert_eq!(got.unwrap(), (1, 7));
        // All fail: the last error.
        let got = first_ok(vec![
            after(2, Err(fail("late one"))),
            after(1, Err(fail("early one"))),
        ])
        .await;
        assert!(got.unwrap_err().to_string().contains("late one"));
    }
}
