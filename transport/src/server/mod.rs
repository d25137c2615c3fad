//! The source side: serves the manifest and chunks of a [`ChunkSource`] to
//! authenticated destinations over QUIC.
//!
//! One task per connection, one task per stream. Chunk reads are blocking
//! (a file or block device) and run in `spawn_blocking`, at most
//! [`MAX_CONCURRENT_READS`] at a time across the server; a response reads
//! the next chunk while it sends the current one. The background copy's
//! data chunks are read up to [`BACKGROUND_READ_BYTES`] at a time, at most
//! [`BACKGROUND_DISK_READS`] of those at once, so an on-demand read reaches
//! the disk behind little of it. Responses to on-demand
//! reads get a high stream priority, background ones a low one. A malformed
//! request gets an `Error` frame and its stream is stopped; the connection
//! and the server stay up.
//!
//! By job: `accept` (connections: handshake, Welcome, `Path` reports),
//! `dispatch` (one request per stream, to its handler), `read` (read
//! scheduling: a Read cut into pieces, read and encoded off the runtime),
//! `precopy` (change rounds of a live source, the switchover).

mod accept;
mod dispatch;
mod precopy;
mod read;

pub use precopy::ROUND;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ferry_core::{Manifest, SharedManifest};
use quinn::Endpoint;
use tokio::sync::Semaphore;

use crate::background::LowPriorityPool;
use crate::error::TransportError;
use crate::identity::{Fingerprint, Identity};
use crate::tuning::Tuning;
use crate::wire::MAX_READ_BYTES;
use crate::{net, tls};

/// Chunk reads running at once (blocking threads), server-wide, for each
/// priority: on-demand reads have their own pool, so background reads
/// waiting to be sent can never hold up a guest's read.
pub const MAX_CONCURRENT_READS: usize = 8;
/// The most a background read asks of the disk at once, by default: up to
/// this many bytes of consecutive data chunks of one request, in one read.
/// With the kernel's readahead off
/// (`ferry_store::SourceImage::turn_readahead_off`) the disk still sees
/// large sequential requests. [`DiskReads::read_bytes`] sets another size.
pub const BACKGROUND_READ_BYTES: u64 = 1 << 20;
/// Background reads at the disk at once, server-wide, by default: one
/// ([`DiskReads::at_once`] sets another bound). An on-demand
/// read queues behind at most one of them (1 MiB: about 7 ms on a disk
/// reading 141 MB/s, this machine's uncached rate). One read at a time of
/// 1 MiB still reads faster than the link carries (the copy's speed was
/// the same with 2, the on-demand reads' p99 at the source half),
/// and compression still runs on all [`MAX_CONCURRENT_READS`] background
/// threads (docs/decisions/source-reads-what-it-sends.md).
pub const BACKGROUND_DISK_READS: usize = 1;

/// What the server serves: a manifest and the chunks it describes.
pub trait ChunkSource: Send + Sync + 'static {
    /// The source's manifest as it learns hashes: geometry and id are
    /// fixed for the source's lifetime; the server fills in the kind of
    /// every unhashed chunk it reads to send
    /// ([`SharedManifest::learn`]).
    fn manifest(&self) -> &SharedManifest;
    /// Blocking read of chunk `index` (full chunk length, last one may be
    /// short) into buf.
    fn read_chunk(&self, index: u64, buf: &mut Vec<u8>) -> std::io::Result<()>;
    /// Blocking read of the `count` consecutive chunks from `first` into
    /// buf, one after the other. A source on a disk overrides it with one
    /// read of the whole range; this default reads chunk by chunk.
    fn read_chunks(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        let mut one = Vec::new();
        for c in first..first.saturating_add(count) {
            self.read_chunk(c, &mut one)?;
            buf.extend_from_slice(&one);
        }
        Ok(())
    }
    /// Why the source may no longer be served (its disk was changed behind
    /// its back), or `None` while it may. Asked after every read (the data
    /// read is sent only if the answer is still `None`), before every
    /// request and with every `Path` report; once `Some`, it stays so.
    fn changed(&self) -> Option<String> {
        None
    }
    /// Every chunk's hash is known now (a complete manifest was made):
    /// a source that keeps hashes may save them.
    fn completed(&self) {}
    /// The change log of a live source (one a VM writes through ferry),
    /// or `None` for a source nobody writes.
    fn changes(&self) -> Option<&dyn LiveChanges> {
        None
    }
}

/// What a live source tells pre-copying destinations
/// (docs/decisions/precopy-switchover.md).
pub trait LiveChanges: Send + Sync {
    /// Ends a round: publishes what was written since the last one as a
    /// new generation (also with nothing written when `force`). Returns
    /// the generation published now.
    fn end_round(&self, force: bool) -> u64;
    /// The generation published now, and the runs of chunks written after
    /// generation `applied` (`None`: the source cannot tell).
    fn since(&self, applied: u64) -> (u64, Option<Vec<std::ops::Range<u64>>>);
    /// Freezes the disk the VM writes: resolves once writes in progress
    /// have ended; later ones are held (not failed) from then on, or seen
    /// and refused (a source whose VM ferry cannot hold). `Err`: the disk
    /// cannot be frozen now (e.g. its VM still runs); the pre-copy goes on
    /// and the reason goes to the destination.
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;
    /// Whether [`LiveChanges::freeze`] has frozen it: nothing writes the
    /// disk any more.
    fn frozen(&self) -> bool;
}

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The source's identity (its certificate is what clients pin).
    pub identity: Identity,
    /// Fingerprints of the destinations allowed to connect.
    pub trusted: Vec<Fingerprint>,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// Test hook: chunks whose FIRST transmission gets one byte flipped.
    pub corrupt_once: Vec<u64>,
    /// Compress chunks with zstd when that saves at least 3% of their bytes.
    pub compress: bool,
    /// How the background copy reads the source's disk.
    pub disk_reads: DiskReads,
}

/// How the background copy reads the source's disk: how many reads at once
/// and how large each is. The defaults suit a disk whose reads queue behind
/// each other (docs/decisions/one-background-disk-read.md); a source on fast flash with deep queues may want more at once.
/// On-demand reads are never bounded by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskReads {
    /// Background reads at the disk at once, server-wide (1 to
    /// [`MAX_CONCURRENT_READS`]).
    pub at_once: usize,
    /// Bytes a background read asks for at most (at least one chunk; at
    /// most [`MAX_READ_BYTES`]); rounded down to whole chunks.
    pub read_bytes: u64,
}

impl Default for DiskReads {
    fn default() -> Self {
        DiskReads {
            at_once: BACKGROUND_DISK_READS,
            read_bytes: BACKGROUND_READ_BYTES,
        }
    }
}

/// A bound source server; [`Server::run`] serves it.
pub struct Server {
    endpoint: Endpoint,
    local: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    source: Arc<dyn ChunkSource>,
    /// The largest the encoded manifest can be (the Welcome says it).
    manifest_max_len: u64,
    /// Held while a complete manifest is made, so two requests for it do
    /// not read the disk twice.
    completing: tokio::sync::Mutex<()>,
    reads: Arc<Semaphore>,
    urgent_reads: Arc<Semaphore>,
    /// Where background chunks are read and encoded: threads of lower CPU
    /// priority (see `crate::background`). On-demand chunks use tokio's
    /// blocking pool, at normal priority.
    background: LowPriorityPool,
    /// Chunks a background read covers at most ([`DiskReads::read_bytes`]).
    chunks_per_read: u64,
    /// Bounds the background reads at the disk ([`DiskReads::at_once`]):
    /// a background task takes one of these after its `reads` permit and
    /// drops it once its read is done, before it compresses.
    background_disk: Arc<Semaphore>,
    corrupt_once: Mutex<HashSet<u64>>,
    compress: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the UDP socket and sets up TLS. Must be called inside a tokio
    /// runtime. Fails with [`TransportError::Bind`] naming the address when
    /// the port is in use.
    pub fn bind(
        opts: ServerOptions,
        source: Arc<dyn ChunkSource>,
    ) -> Result<Server, TransportError> {
        if opts.trusted.is_empty() {
            tracing::warn!("no trusted destination fingerprints: every client will be refused");
        }
        let chunk_size = u64::from(source.manifest().geometry().chunk_size).max(1);
        let d = opts.disk_reads;
        if d.at_once == 0 || d.at_once > MAX_CONCURRENT_READS {
            return Err(TransportError::Options {
                reason: format!(
                    "background disk reads at once must be 1 to {MAX_CONCURRENT_READS}, not {}",
                    d.at_once
                ),
            });
        }
        if d.read_bytes < chunk_size || d.read_bytes > MAX_READ_BYTES {
            return Err(TransportError::Options {
                reason: format!(
                    "a background read must be {chunk_size} to {MAX_READ_BYTES} bytes (one chunk to the largest request), not {}",
                    d.read_bytes
                ),
            });
        }
        let config = tls::quinn_server_config(&opts.identity, &opts.trusted, &opts.tuning)?;
        let sock = net::udp_socket(opts.listen, opts.tuning.socket_buffer)?;
        let endpoint = net::endpoint(
            sock,
            Some(config),
            opts.tuning.max_udp_payload,
            opts.tuning.recv_moderation,
        )?;
        let local = endpoint
            .local_addr()
            .map_err(|source| TransportError::Endpoint { source })?;
        let first = source.manifest().snapshot();
        // A live source's VM may write any chunk: every one may become data.
        let allocated = if source.changes().is_some() {
            first.chunks().len()
        } else {
            first.chunks().iter().filter(|c| c.is_allocated()).count()
        };
        let manifest_max_len = Manifest::max_encoded_len(first.geometry(), allocated as u64);
        tracing::info!(
            %local,
            fingerprint = %opts.identity.fingerprint(),
            chunks = source.manifest().geometry().chunks(),
            "source listening"
        );
        Ok(Server {
            endpoint,
            local,
            shared: Arc::new(Shared {
                source,
                manifest_max_len,
                completing: tokio::sync::Mutex::new(()),
                reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
                urgent_reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
                background: LowPriorityPool::new("ferry-bg-read", MAX_CONCURRENT_READS)
                    .map_err(|source| TransportError::Threads { source })?,
                chunks_per_read: d.read_bytes / chunk_size,
                background_disk: Arc::new(Semaphore::new(d.at_once)),
                corrupt_once: Mutex::new(opts.corrupt_once.into_iter().collect()),
                compress: opts.compress,
            }),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}
