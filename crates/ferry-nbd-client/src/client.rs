//! The connection: a writer task that sends request headers whole (a
//! cancelled caller cannot tear one), a reader task that matches replies to
//! requests in flight by handle and checks them with [`ReplyState`], and
//! the read-only request API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::NbdClientError;
use crate::handshake::{negotiate, ExportInfo};
use crate::wire::*;

/// Default TCP port of NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest BLOCK_STATUS request (the length field is 32 bits); longer
/// ranges are walked in pieces by [`NbdClient::extents`].
const MAX_STATUS_PIECE: u64 = 1 << 32;
/// How long [`NbdClient::disconnect`] waits for the server to close.
const DISCONNECT_WAIT: Duration = Duration::from_secs(5);

/// Where an NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP `host:port`.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

/// An NBD URI (`nbd://host[:port]/export`,
/// `nbd+unix:///export?socket=PATH`), as qemu and libnbd write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name (may be empty: the default export).
    pub export: String,
}

fn percent_decode(uri: &str, s: &str) -> Result<String, NbdClientError> {
    let bad = |reason: &str| NbdClientError::InvalidUri {
        uri: uri.into(),
        reason: reason.into(),
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8 once %-decoded"))
}

impl NbdUri {
    /// Parses `uri`.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdClientError> {
        let bad = |reason: &str| NbdClientError::InvalidUri {
            uri: uri.into(),
            reason: reason.into(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(uri, path)?;
        match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err(bad("nbd:// takes no query"));
                }
                if authority.is_empty() {
                    return Err(bad("no host"));
                }
                let hostport = if authority.starts_with('[') {
                    // [v6] or [v6]:port
                    if authority.ends_with(']') {
                        format!("{authority}:{DEFAULT_PORT}")
                    } else {
                        authority.to_string()
                    }
                } else if authority.contains(':') {
                    authority.to_string()
                } else {
                    format!("{authority}:{DEFAULT_PORT}")
                };
                Ok(NbdUri {
                    addr: NbdAddr::Tcp(hostport),
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let socket = query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .ok_or_else(|| bad("no socket=PATH"))?;
                let socket = percent_decode(uri, socket)?;
                if socket.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(NbdUri {
                    addr: NbdAddr::Unix(PathBuf::from(socket)),
                    export,
                })
            }
            "nbds" | "nbds+unix" => Err(bad("TLS (nbds) is not supported")),
            _ => Err(bad("unknown scheme (nbd or nbd+unix)")),
        }
    }
}

/// How a request ended, as the reader task saw it.
enum Outcome {
    Server(ServerError),
    Protocol(WireError),
    Lost(String),
}

struct Pending {
    state: ReplyState,
    done: oneshot::Sender<Result<Reply, Outcome>>,
}

#[derive(Default)]
struct Inflight {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is unusable: why.
    dead: Option<String>,
}

#[derive(Default)]
struct Shared {
    inflight: Mutex<Inflight>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inflight> {
        // A poisoned lock only means a panic elsewhere while holding it;
        // the map itself stays consistent.
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the connection dead and fails every request in flight.
    fn fail_all(&self, reason: &str) {
        let pending = {
            let mut g = self.lock();
            g.dead.get_or_insert_with(|| reason.to_string());
            std::mem::take(&mut g.pending)
        };
        for (_, p) in pending {
            let _ = p.done.send(Err(Outcome::Lost(reason.to_string())));
        }
    }
}

/// A read-only NBD client connection. Requests may be issued
/// concurrently (`&self`); each carries its own handle. There is no write
/// call, and the wire encoder knows no write command.
///
/// Every call may wait on the server indefinitely: wrap calls in
/// `tokio::time::timeout` where a bound is needed.
pub struct NbdClient {
    info: ExportInfo,
    shared: Arc<Shared>,
    tx: Option<mpsc::UnboundedSender<[u8; REQUEST_LEN]>>,
    next_handle: AtomicU64,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connects to `uri`'s server and negotiates its export with the meta
    /// `contexts` (each must be offered, else
    /// [`NbdClientError::MetaContextNotOffered`]).
    pub async fn connect(uri: &NbdUri, contexts: &[String]) -> Result<NbdClient, NbdClientError> {
        match &uri.addr {
            NbdAddr::Tcp(hp) => {
                let s = tokio::net::TcpStream::connect(hp.as_str())
                    .await
                    .map_err(|source| NbdClientError::Connect {
                        addr: hp.clone(),
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                Self::handshake(s, &uri.export, contexts).await
            }
            NbdAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(|source| {
                    NbdClientError::Connect {
                        addr: p.display().to_string(),
                        source,
                    }
                })?;
                Self::handshake(s, &uri.export, contexts).await
            }
        }
    }

    /// Negotiates `export` over a stream already connected (TCP, unix, an
    /// in-memory pipe) and starts the connection's tasks.
    pub async fn handshake<S>(
        mut stream: S,
        export: &str,
        contexts: &[String],
    ) -> Result<NbdClient, NbdClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = negotiate(&mut stream, export, contexts).await?;
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(wr, rx, shared.clone()));
        let reader = tokio::spawn(read_loop(rd, shared.clone()));
        Ok(NbdClient {
            info,
            shared,
            tx: Some(tx),
            next_handle: AtomicU64::new(1),
            reader,
            writer: Some(writer),
        })
    }

    /// What the negotiation learnt: size, flags, block sizes, contexts.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Largest READ this connection sends: [`MAX_READ_LEN`], or the
    /// server's maximum block size if smaller.
    pub fn max_read(&self) -> u32 {
        let server = self.info.block_size.map_or(MAX_READ_LEN, |b| b.maximum);
        let m = server.clamp(self.info.min_block(), MAX_READ_LEN);
        m - m % self.info.min_block()
    }

    fn check_range(&self, op: Command, offset: u64, len: u64) -> Result<(), NbdClientError> {
        let invalid = |reason: String| NbdClientError::InvalidRequest {
            op,
            offset,
            len,
            reason,
        };
        if len == 0 {
            return Err(invalid("zero length".into()));
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.info.size)
            .ok_or_else(|| invalid(format!("past the export's end ({} bytes)", self.info.size)))?;
        let min = u64::from(self.info.min_block());
        if !offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != self.info.size) {
            return Err(invalid(format!(
                "not aligned to the export's minimum block size {min}"
            )));
        }
        Ok(())
    }

    async fn request(&self, op: Command, shape: RequestShape) -> Result<Reply, NbdClientError> {
        let (offset, len) = match &shape {
            RequestShape::Read { offset, len } | RequestShape::BlockStatus { offset, len, .. } => {
                (*offset, *len)
            }
        };
        let len64 = u64::from(len);
        let state = ReplyState::new(shape).map_err(|e| NbdClientError::InvalidRequest {
            op,
            offset,
            len: len64,
            reason: e.to_string(),
        })?;
        let lost = |reason: String| NbdClientError::ConnectionLost {
            op,
            offset,
            len: len64,
            reason,
        };
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        {
            let mut g = self.shared.lock();
            if let Some(why) = &g.dead {
                return Err(lost(why.clone()));
            }
            g.pending.insert(handle, Pending { state, done });
        }
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(encode_request(op, handle, offset, len)).is_ok());
        if !sent {
            self.shared.lock().pending.remove(&handle);
            return Err(lost("the connection's writer has stopped".into()));
        }
        match rx.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(Outcome::Server(error))) => Err(NbdClientError::Server {
                op,
                offset,
                len: len64,
                error,
            }),
            Ok(Err(Outcome::Protocol(source))) => Err(NbdClientError::Protocol {
                op,
                offset,
                len: len64,
                source,
            }),
            Ok(Err(Outcome::Lost(reason))) => Err(lost(reason)),
            Err(_) => Err(lost("the connection's reader has stopped".into())),
        }
    }

    /// Reads `len` bytes at `offset` (holes come back as zeros). `len` is
    /// at most [`max_read`](Self::max_read); offset and length respect
    /// the export's minimum block size.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        self.check_range(Command::Read, offset, u64::from(len))?;
        if len > self.max_read() {
            return Err(NbdClientError::InvalidRequest {
                op: Command::Read,
                offset,
                len: u64::from(len),
                reason: format!("longer than the largest read, {}", self.max_read()),
            });
        }
        match self
            .request(Command::Read, RequestShape::Read { offset, len })
            .await?
        {
            Reply::Read(data) => Ok(data),
            Reply::BlockStatus(_) => Err(NbdClientError::ConnectionLost {
                op: Command::Read,
                offset,
                len: u64::from(len),
                reason: "internal: block status reply to a read".into(),
            }),
        }
    }

    /// One BLOCK_STATUS request: the extents of every negotiated context
    /// from `offset`, each clipped to `len` bytes (a server may describe
    /// less than asked).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ContextExtents>, NbdClientError> {
        self.check_range(Command::BlockStatus, offset, u64::from(len))?;
        if self.info.contexts.is_empty() {
            return Err(NbdClientError::InvalidRequest {
                op: Command::BlockStatus,
                offset,
                len: u64::from(len),
                reason: "no meta context was negotiated".into(),
            });
        }
        let contexts = self.info.contexts.iter().map(|c| c.id).collect();
        match self
            .request(
                Command::BlockStatus,
                RequestShape::BlockStatus {
                    offset,
                    len,
                    contexts,
                },
            )
            .await?
        {
            Reply::BlockStatus(answers) => Ok(answers),
            Reply::Read(_) => Err(NbdClientError::ConnectionLost {
                op: Command::BlockStatus,
                offset,
                len: u64::from(len),
                reason: "internal: read reply to block status".into(),
            }),
        }
    }

    /// The extents of meta context `context` over `offset..offset+len`,
    /// complete and in order, neighbours with equal flags merged: walks
    /// the range with as many BLOCK_STATUS requests as needed (each at
    /// most 4 GiB, the 32-bit length limit; the server may answer less).
    pub async fn extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdClientError> {
        let id = self
            .info
            .contexts
            .iter()
            .find(|c| c.name == context)
            .map(|c| c.id)
            .ok_or_else(|| NbdClientError::ContextNotNegotiated(context.into()))?;
        self.check_range(Command::BlockStatus, offset, len)?;
        let end = offset + len;
        let min = u64::from(self.info.min_block());
        let piece_max = MAX_STATUS_PIECE - min;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let piece = (end - pos).min(piece_max) as u32;
            let answers = self.block_status(pos, piece).await?;
            let mine = answers
                .into_iter()
                .find(|a| a.context_id == id)
                .filter(|a| !a.extents.is_empty())
                .ok_or_else(|| NbdClientError::Protocol {
                    op: Command::BlockStatus,
                    offset: pos,
                    len: u64::from(piece),
                    source: WireError::BadTermination(
                        "reply has no extents for a negotiated context",
                    ),
                })?;
            for e in mine.extents {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.end() == e.offset => {
                        last.length += e.length;
                    }
                    _ => out.push(e),
                }
                pos = e.end();
            }
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC`, closes the writing side and waits (a few
    /// seconds at most) for the server to close. Requests still in flight
    /// fail with [`NbdClientError::ConnectionLost`].
    pub async fn disconnect(mut self) -> Result<(), NbdClientError> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(encode_request(Command::Disc, 0, 0, 0));
        }
        if let Some(w) = self.writer.take() {
            let _ = tokio::time::timeout(DISCONNECT_WAIT, w).await;
        }
        let _ = tokio::time::timeout(DISCONNECT_WAIT, &mut self.reader).await;
        self.shared.fail_all("the client disconnected");
        Ok(())
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<[u8; REQUEST_LEN]>,
    shared: Arc<Shared>,
) {
    while let Some(req) = rx.recv().await {
        if let Err(e) = wr.write_all(&req).await {
            shared.fail_all(&format!("sending a request: {e}"));
            return;
        }
        if rx.is_empty() {
            if let Err(e) = wr.flush().await {
                shared.fail_all(&format!("sending a request: {e}"));
                return;
            }
        }
    }
    // The client is gone or disconnecting: end the write side.
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>) {
    let reason = match read_replies(&mut rd, &shared).await {
        Ok(()) => "the server closed the connection".to_string(),
        Err(r) => r,
    };
    shared.fail_all(&reason);
}

/// Reads replies until the stream ends (Ok) or breaks (Err: why).
async fn read_replies<R: AsyncRead + Unpin>(rd: &mut R, shared: &Shared) -> Result<(), String> {
    let mut head = [0u8; CHUNK_HEADER_LEN];
    loop {
        match rd.read_exact(&mut head[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("reading a reply: {e}")),
        }
        let magic = be_u32(&head[..4]);
        let n = ReplyHeader::len_for_magic(magic).map_err(|e| e.to_string())?;
        rd.read_exact(&mut head[4..n])
            .await
            .map_err(|e| format!("reading a reply header: {e}"))?;
        let (header, _) = ReplyHeader::decode(&head[..n]).map_err(|e| e.to_string())?;
        let handle = header.handle();
        let Some(mut p) = shared.lock().pending.remove(&handle) else {
            return Err(WireError::UnknownHandle(handle).to_string());
        };
        let fail = |p: Pending, e: WireError| {
            let reason = format!("protocol violation in the reply to handle {handle}: {e}");
            let _ = p.done.send(Err(Outcome::Protocol(e)));
            reason
        };
        let len = match p.state.payload_len(&header) {
            Ok(l) => l,
            Err(e) => return Err(fail(p, e)),
        };
        // Bounded by payload_len: at most MAX_READ_LEN + 8, or 8 MiB of
        // extents, or an error message.
        let mut payload = vec![0u8; len];
        if let Err(e) = rd.read_exact(&mut payload).await {
            let reason = format!("reading a reply payload: {e}");
            let _ = p.done.send(Err(Outcome::Lost(reason.clone())));
            return Err(reason);
        }
        match p.state.apply(&header, &payload) {
            Err(e) => return Err(fail(p, e)),
            Ok(Step::More) => {
                shared.lock().pending.insert(handle, p);
            }
            Ok(Step::Done) => {
                let Pending { state, done } = p;
                match state.finish() {
                    Ok(Ok(reply)) => {
                        let _ = done.send(Ok(reply));
                    }
                    Ok(Err(server)) => {
                        let _ = done.send(Err(Outcome::Server(server)));
                    }
                    Err(e) => {
                        let reason =
                            format!("protocol violation in the reply to handle {handle}: {e}");
                        let _ = done.send(Err(Outcome::Protocol(e)));
                        return Err(reason);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd+unix:///disk0?socket=/run/q/nbd.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/q/nbd.sock".into()));
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd://host.example/my%20disk").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("host.example:10809".into()));
        assert_eq!(u.export, "my disk");
        let u = NbdUri::parse("nbd://10.0.0.1:1234").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("10.0.0.1:1234".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:10809".into()));
        let u = NbdUri::parse("nbd://[::1]:99/x").unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:99".into()));
        for bad in [
            "disk.img",
            "nbd:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbds://h/x",
            "http://h/x",
            "nbd://h/%zz",
        ] {
            let e = NbdUri::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
