//! The connection: connect and take the Welcome, learn that the source
//! accepted our certificate, read its `Path` reports, reconnect with
//! backoff when the connection is lost (noticing a changed source), and
//! run every request again on the new connection.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_core::Geometry;
use quinn::{Connection, ConnectionError, VarInt};

use super::{
    addr::ServerAddr, hex, protocol, read_fail, remote, unexpected, Client, ClientOptions, Fail,
    Inner, SourceInfo, State, BACKOFF_MAX, BACKOFF_START, MAX_MANIFEST_LEN,
};
use crate::codec::{self, frame_name, ReadFail, SMALL_FRAME};
use crate::error::TransportError;
use crate::net;
use crate::path::PathReports;
use crate::tls;
use crate::wire::{Message, PROTOCOL_VERSION};

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
        // Resolved here to choose the socket's family, and again at each
        // connection attempt.
        let resolve_err = |source| TransportError::Resolve {
            name: opts.server.to_string(),
            source,
        };
        let first = opts
            .server
            .resolve()
            .await
            .map_err(resolve_err)?
            .into_iter()
            .next()
            .ok_or_else(|| resolve_err(std::io::Error::other("the name has no address")))?;
        let bind: SocketAddr = if first.is_ipv6() {
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
            server: opts.server.clone(),
            addr: Mutex::new(first),
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
                live: false,
            },
            manifest: tokio::sync::OnceCell::new(),
            state: Mutex::new(State::default()),
            reconnect_lock: tokio::sync::Mutex::new(()),
            welcome_stream: tokio::sync::Mutex::new(None),
            authenticated: AtomicBool::new(false),
            path: Arc::new(PathReports::default()),
            hedged: AtomicU64::new(0),
            released: AtomicBool::new(false),
        };
        let (conn, info, stream) = inner.establish().await?;
        *inner.welcome_stream.get_mut() = Some(stream);
        tracing::info!(
            addr = %inner.addr(),
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
                lost_bytes,
            })) => {
                self.inner.path.store(lost_ppm, sent_packets, lost_bytes);
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
                    tracing::warn!(addr = %inner.addr(), "lost the connection to the source: {reason}; reconnecting");
                }
            }
            inner.reconnect(generation).await?;
        }
    }
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source's address in use (the last one its name resolved to).
    pub(super) fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks the source's name up again (an IP address stays as it is)
    /// and keeps the first address of the endpoint's family.
    async fn resolve(&self) -> Result<SocketAddr, TransportError> {
        if let ServerAddr::Ip(a) = &self.server {
            return Ok(*a);
        }
        let err = |source| TransportError::Resolve {
            name: self.server.to_string(),
            source,
        };
        let v6 = self.addr().is_ipv6();
        let found = self.server.resolve().await.map_err(err)?;
        let addr = found
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == v6)
            .ok_or_else(|| {
                let family = if v6 { "IPv6" } else { "IPv4" };
                err(std::io::Error::other(format!(
                    "no {family} address any more (the connection's socket is {family})"
                )))
            })?;
        let mut cur = self.addr.lock().unwrap_or_else(|e| e.into_inner());
        if *cur != addr {
            tracing::info!(name = %self.server, from = %*cur, to = %addr, "the source's name resolves to another address");
            *cur = addr;
        }
        Ok(addr)
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
                addr: self.addr(),
                presented,
                expected: self.expected,
            };
        }
        if tls::is_cert_refusal(&e) {
            return TransportError::CertificateRefused {
                addr: self.addr(),
                ours: self.ours,
            };
        }
        if matches!(e, ConnectionError::TimedOut) {
            return TransportError::Unreachable {
                addr: self.addr(),
                after: self.connect_timeout,
            };
        }
        TransportError::Connection {
            addr: self.addr(),
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
                        addr: self.addr(),
                        after: self.connect_timeout,
                    })
                }
            }
        }
    }

    async fn establish_inner(
        &self,
    ) -> Result<(Connection, SourceInfo, quinn::RecvStream), TransportError> {
        let addr = self.resolve().await?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, tls::SERVER_NAME)
            .map_err(|source| TransportError::Connect { addr, source })?;
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
                    self.path.new_connection();
                    tokio::spawn(read_path_reports(welcome, self.path.clone()));
                    let mut st = self.lock();
                    let (before, after) = (self.info.source_id, info.source_id);
                    if before != after {
                        conn.close(VarInt::from_u32(0), b"source changed");
                        let s = conn.stats();
                        st.closed.add(&s);
                        st.changed = Some((hex(&before), hex(&after)));
                        let e = self.source_changed(&st).expect("just set");
                        tracing::error!(addr = %self.addr(), "{e}");
                        return Err(e);
                    }
                    st.conn = Some(conn);
                    st.generation += 1;
                    st.reconnects += 1;
                    tracing::info!(addr = %self.addr(), reconnects = st.reconnects, "reconnected to the source");
                    return Ok(());
                }
                // Said once per outage; the retries are for debugging.
                Err(e) if failures == 0 => {
                    failures += 1;
                    tracing::warn!(addr = %self.addr(), error = %e, backoff_max_secs = BACKOFF_MAX.as_secs_f64(), "reconnect failed; retrying with backoff");
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(addr = %self.addr(), failures, error = %e, retry_in_ms = delay.as_millis() as u64, "reconnect failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// Runs `attempt` on the current connection until it succeeds or
    /// fails for good, reconnecting (with backoff) when the connection is
    /// lost and re-issuing when the source abandoned the request.
    pub(super) async fn with_retry<T, F, Fut>(
        &self,
        op: &'static str,
        attempt: F,
    ) -> Result<T, TransportError>
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
                    tracing::debug!(addr = %self.addr(), op, "connection lost during the request: {e}");
                    self.reconnect(generation).await?;
                }
                Err(Fail::Retry(reason)) => {
                    tracing::debug!(addr = %self.addr(), op, %reason, retry_in_ms = delay.as_millis() as u64, "request abandoned by the source; re-issuing");
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

/// Reads the source's `Path` reports on a Welcome stream until it ends,
/// keeping the latest in `path`.
async fn read_path_reports(mut recv: quinn::RecvStream, path: Arc<PathReports>) {
    loop {
        match codec::read_frame(&mut recv, SMALL_FRAME).await {
            Ok(Some(Message::Path {
                lost_ppm,
                sent_packets,
                lost_bytes,
            })) => path.store(lost_ppm, sent_packets, lost_bytes),
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
            live,
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
                    live,
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
