//! [`LiveSource`]: a pool of read-only NBD connections to the export of a
//! disk a VM keeps writing, with its per-chunk allocation map, reads split
//! at the server's block size, and [`dirty_chunks`] for a bitmap's
//! `qemu:dirty-bitmap` context.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_nbd_client::{
    dirty_bitmap_context, Extent, NbdClient, NbdClientError, NbdUri, BASE_ALLOCATION, STATE_DIRTY,
    STATE_ZERO,
};

use crate::chunks::ChunkSet;
use crate::error::LiveError;
use crate::DEFAULT_CHUNK_SIZE;

/// Most connections in a pool.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// How a [`LiveSource`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Connections in the pool, for concurrent reads (1 to 16).
    pub connections: usize,
    /// The chunk size of the maps and of [`LiveSource::read_chunk`]: a
    /// multiple of the export's minimum block size (and, for change
    /// tracking, of the bitmap granularity), at most 64 MiB.
    pub chunk_size: u32,
    /// Limit on connecting and on one read.
    pub op_timeout: Duration,
    /// Limit on one whole-disk map walk (allocation or dirty bitmap).
    pub map_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            connections: 4,
            chunk_size: DEFAULT_CHUNK_SIZE,
            op_timeout: Duration::from_secs(60),
            map_timeout: Duration::from_secs(600),
        }
    }
}

/// `fut` within `limit`, an NBD error or a timeout named by `during`.
pub(crate) async fn bounded<T>(
    limit: Duration,
    during: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, NbdClientError>>,
) -> Result<T, LiveError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(LiveError::Nbd {
            during: during(),
            source,
        }),
        Err(_) => Err(LiveError::Timeout {
            during: during(),
            after: limit,
        }),
    }
}

/// The chunks that `extents` with `pred(flags)` touch (any overlap).
fn chunks_where(
    extents: &[Extent],
    size: u64,
    chunk_size: u32,
    pred: impl Fn(u32) -> bool,
) -> ChunkSet {
    let cs = u64::from(chunk_size);
    let mut set = ChunkSet::new(size.div_ceil(cs));
    for e in extents.iter().filter(|e| pred(e.flags) && e.length > 0) {
        set.insert_range(e.offset / cs, e.end().div_ceil(cs));
    }
    set
}

/// A disk read live through an NBD export (QEMU's, with the VM running):
/// a pool of connections, each negotiated with `base:allocation`. Reads
/// may be issued concurrently (`&self`); they go round the pool, and a
/// connection found dead is replaced once per read.
pub struct LiveSource {
    uri: NbdUri,
    cfg: SourceConfig,
    slots: Vec<Mutex<Arc<NbdClient>>>,
    next: AtomicUsize,
    size: u64,
    max_read: u32,
    min_block: u32,
}

impl std::fmt::Debug for LiveSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSource")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl LiveSource {
    /// Connects `cfg.connections` times to the export at `uri`.
    pub async fn connect(uri: &NbdUri, cfg: SourceConfig) -> Result<LiveSource, LiveError> {
        if cfg.connections == 0 || cfg.connections > MAX_CONNECTIONS {
            return Err(LiveError::Config {
                what: "connection count",
                value: cfg.connections as u64,
                reason: format!("must be 1 to {MAX_CONNECTIONS}"),
            });
        }
        if cfg.chunk_size == 0 || cfg.chunk_size > MAX_CHUNK_SIZE {
            return Err(LiveError::Config {
                what: "chunk size",
                value: u64::from(cfg.chunk_size),
                reason: format!("must be 1 to {MAX_CHUNK_SIZE} bytes"),
            });
        }
        let first = Self::open(uri, &cfg).await?;
        let info = first.info().clone();
        let min_block = info.min_block();
        if !cfg.chunk_size.is_multiple_of(min_block) {
            return Err(LiveError::Config {
                what: "chunk size",
                value: u64::from(cfg.chunk_size),
                reason: format!(
                    "not a multiple of export {:?}'s minimum block size {min_block}",
                    uri.export
                ),
            });
        }
        let max_read = first.max_read();
        let mut slots = vec![Mutex::new(Arc::new(first))];
        for _ in 1..cfg.connections {
            let c = Self::open(uri, &cfg).await?;
            if c.size() != info.size {
                return Err(LiveError::State(format!(
                    "export {:?} changed size between two connections ({} then {})",
                    uri.export,
                    info.size,
                    c.size()
                )));
            }
            slots.push(Mutex::new(Arc::new(c)));
        }
        Ok(LiveSource {
            uri: uri.clone(),
            cfg,
            slots,
            next: AtomicUsize::new(0),
            size: info.size,
            max_read,
            min_block,
        })
    }

    async fn open(uri: &NbdUri, cfg: &SourceConfig) -> Result<NbdClient, LiveError> {
        let ctx = [BASE_ALLOCATION.to_string()];
        match tokio::time::timeout(cfg.op_timeout, NbdClient::connect(uri, &ctx)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(NbdClientError::MetaContextNotOffered { export, .. })) => {
                Err(LiveError::NoAllocationContext { export })
            }
            Ok(Err(source)) => Err(LiveError::Nbd {
                during: format!("connecting to export {:?}", uri.export),
                source,
            }),
            Err(_) => Err(LiveError::Timeout {
                during: format!("connecting to export {:?}", uri.export),
                after: cfg.op_timeout,
            }),
        }
    }

    /// The export read.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size of the maps.
    pub fn chunk_size(&self) -> u32 {
        self.cfg.chunk_size
    }

    /// The number of chunks (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.cfg.chunk_size))
    }

    /// The byte range of chunk `index` (clipped at the disk's end).
    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        let cs = u64::from(self.cfg.chunk_size);
        let start = (index * cs).min(self.size);
        start..(start + cs).min(self.size)
    }

    /// Largest single NBD read (the server's maximum block size or the
    /// client's limit); [`read`](Self::read) splits longer ones.
    pub fn max_read(&self) -> u32 {
        self.max_read
    }

    /// The limits in force.
    pub fn config(&self) -> &SourceConfig {
        &self.cfg
    }

    /// Which chunks hold data, from `base:allocation` without reading any:
    /// a chunk is left out (zero) only when `NBD_STATE_ZERO` covers all of
    /// it. A hole without `NBD_STATE_ZERO` counts as data: the NBD spec
    /// says a hole need not read as zeros (a backing file may show through).
    pub async fn allocation(&self) -> Result<ChunkSet, LiveError> {
        let client = self.client(0);
        let size = self.size;
        let extents = bounded(
            self.cfg.map_timeout,
            || format!("mapping base:allocation of export {:?}", self.uri.export),
            client.extents(BASE_ALLOCATION, 0, size),
        )
        .await?;
        Ok(chunks_where(&extents, size, self.cfg.chunk_size, |f| {
            f & STATE_ZERO == 0
        }))
    }

    fn client(&self, slot: usize) -> Arc<NbdClient> {
        self.slots[slot]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the connection in `slot` if it is still `dead`.
    async fn replace(&self, slot: usize, dead: &Arc<NbdClient>) -> Result<(), LiveError> {
        let fresh = Arc::new(Self::open(&self.uri, &self.cfg).await?);
        let mut g = self.slots[slot]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Arc::ptr_eq(&g, dead) {
            *g = fresh;
        }
        Ok(())
    }

    async fn read_piece(&self, offset: u64, len: u32) -> Result<Vec<u8>, LiveError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let during = || {
            format!(
                "reading {len} bytes at {offset} of export {:?}",
                self.uri.export
            )
        };
        for attempt in 0..2 {
            let client = self.client(slot);
            match bounded(self.cfg.op_timeout, during, client.read(offset, len)).await {
                Err(LiveError::Nbd {
                    source: NbdClientError::ConnectionLost { .. },
                    ..
                }) if attempt == 0 => self.replace(slot, &client).await?,
                r => return r,
            }
        }
        Err(LiveError::State(during() + ": connection lost twice"))
    }

    /// Fills `buf` from `offset`: pieces of at most
    /// [`max_read`](Self::max_read) bytes, in flight together on the
    /// pool's connections. `offset` and the end must respect the export's
    /// minimum block size (or the end be the disk's end).
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), LiveError> {
        let len = buf.len() as u64;
        let bad = |reason: String| LiveError::BadRead {
            offset,
            len,
            reason,
        };
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| bad(format!("past the disk's end ({} bytes)", self.size)))?;
        let min = u64::from(self.min_block);
        if !offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != self.size) {
            return Err(bad(format!("not aligned to the export's block size {min}")));
        }
        let piece = u64::from(self.max_read);
        let mut rest: &mut [u8] = buf;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while !rest.is_empty() {
            let n = (end - pos).min(piece) as usize;
            let (head, tail) = rest.split_at_mut(n);
            pieces.push((pos, head));
            rest = tail;
            pos += n as u64;
        }
        // Every piece's read is started at once; each is bounded by the
        // op timeout, so the join is bounded too.
        let mut futs: Vec<_> = pieces
            .into_iter()
            .map(|(pos, dst)| async move {
                let data = self.read_piece(pos, dst.len() as u32).await?;
                if data.len() != dst.len() {
                    return Err(LiveError::BadRead {
                        offset: pos,
                        len: dst.len() as u64,
                        reason: format!("the server returned {} bytes", data.len()),
                    });
                }
                dst.copy_from_slice(&data);
                Ok::<(), LiveError>(())
            })
            .map(Box::pin)
            .collect();
        join_all_ok(&mut futs).await
    }

    /// Reads chunk `index` into `buf` (at least one chunk long); returns
    /// its length (the last chunk may be short).
    pub async fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<usize, LiveError> {
        let r = self.chunk_range(index);
        let n = (r.end - r.start) as usize;
        if n == 0 || buf.len() < n {
            return Err(LiveError::BadRead {
                offset: r.start,
                len: n as u64,
                reason: format!(
                    "chunk {index} of {} into a buffer of {} bytes",
                    self.chunk_count(),
                    buf.len()
                ),
            });
        }
        self.read(r.start, &mut buf[..n]).await?;
        Ok(n)
    }

    /// Disconnects every connection (each waits a few seconds at most).
    pub async fn close(self) {
        for slot in self.slots {
            let c = slot
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Ok(c) = Arc::try_unwrap(c) {
                let _ = c.disconnect().await;
            }
        }
    }
}

/// Polls every future to completion; the first error wins (the rest are
/// still driven to the end, each being bounded).
async fn join_all_ok<F>(futs: &mut [std::pin::Pin<Box<F>>]) -> Result<(), LiveError>
where
    F: Future<Output = Result<(), LiveError>>,
{
    let mut done = vec![false; futs.len()];
    let mut first_err = None;
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
            if *d {
                continue;
            }
            match f.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => {
                    *d = true;
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                std::task::Poll::Pending => pending = true,
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    first_err.map_or(Ok(()), Err)
}

/// The chunks (of `chunk_size` bytes) that dirty bitmap `bitmap` marks,
/// read from the `qemu:dirty-bitmap:BITMAP` context of the export at
/// `uri` over a connection of its own, within `timeout`.
pub async fn dirty_chunks(
    uri: &NbdUri,
    bitmap: &str,
    chunk_size: u32,
    timeout: Duration,
) -> Result<ChunkSet, LiveError> {
    if chunk_size == 0 {
        return Err(LiveError::Config {
            what: "chunk size",
            value: 0,
            reason: "must not be zero".into(),
        });
    }
    let ctx = dirty_bitmap_context(bitmap);
    let during = || format!("reading dirty bitmap {bitmap:?} of export {:?}", uri.export);
    let client =
        match tokio::time::timeout(timeout, NbdClient::connect(uri, std::slice::from_ref(&ctx)))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(NbdClientError::MetaContextNotOffered { export, .. })) => {
                return Err(LiveError::BitmapNotExported {
                    export,
                    bitmap: bitmap.into(),
                })
            }
            Ok(Err(source)) => {
                return Err(LiveError::Nbd {
                    during: during(),
                    source,
                })
            }
            Err(_) => {
                return Err(LiveError::Timeout {
                    during: during(),
                    after: timeout,
                })
            }
        };
    let size = client.size();
    let extents = if size == 0 {
        Vec::new()
    } else {
        bounded(timeout, during, client.extents(&ctx, 0, size)).await?
    };
    let _ = client.disconnect().await;
    Ok(chunks_where(&extents, size, chunk_size, |f| {
        f & STATE_DIRTY != 0
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_touched_by_extents() {
        let ext = [
            Extent {
                offset: 0,
                length: 4096,
                flags: 0,
            },
            Extent {
                offset: 4096,
                length: 200_000,
                flags: STATE_ZERO,
            },
            Extent {
                offset: 204_096,
                length: 1,
                flags: 0,
            },
        ];
        let s = chunks_where(&ext, 204_097, 65536, |f| f & STATE_ZERO == 0);
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3]);
    }
}
