//! `ferry serve --nbd-source URI --qmp SOCKET`: export a VM's disk read
//! through its QEMU's (or qemu-storage-daemon's) NBD export instead of a
//! file. The first manifest comes from `base:allocation` (holes zero, the
//! rest unhashed); the source id is new at every start, since what
//! happened to the disk between two runs is not known.
//!
//! - A paused VM (post-copy only): before the disk is mapped, a dirty
//!   bitmap is added to the export's node over QMP, and once it counts a
//!   write (looked at after every read and every second) the source
//!   refuses to send anything more (`SourceChanged`), as a file source does
//!   when its image changes.
//! - A running VM (`--live`): a [`ChangeTracker`] records the VM's writes
//!   in dirty-bitmap generations; a round every [`ROUND_EVERY`] forgets
//!   the hashes of the chunks written and records them in the change log
//!   the transport sends to pre-copying destinations. While the VM runs no
//!   hash is learned: every chunk sent carries the hash of the very bytes
//!   read, and a chunk written after its read is named by a later round.
//!   The switchover's freeze refuses a VM that QMP reports running, takes
//!   the final round (its chunks are the last list) and keeps the
//!   generation recording since as the write watch of a paused VM
//!   (docs/decisions/live-source-through-qemu-precopy.md).

use std::io::Read;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_core::changes::{runs, ChangeLog};
use ferry_core::geometry::DEFAULT_CHUNK_SIZE;
use ferry_core::{ChunkKind, Geometry, Manifest, SharedManifest};
use ferry_live::{
    export_node, vm_running, ChangeTracker, ChunkSet, LiveError, LiveSource, Qmp, QmpError,
    SourceConfig, TrackerConfig, WriteWatch,
};
use ferry_nbd_client::NbdUri;
use ferry_transport::{ChunkSource, Fingerprint, Identity, LiveChanges, Server};

use crate::cli::ServeArgs;
use crate::serve::server_options;

/// How often an idle source looks whether the disk was written.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a live source takes a pre-copy round (a QMP transaction, a
/// bitmap read over NBD): the transport publishes what the rounds
/// recorded once a second too (`ferry_transport::server::ROUND`).
const ROUND_EVERY: Duration = Duration::from_secs(1);

/// The disk behind an NBD export as the transport's chunk source.
struct NbdSource {
    live: LiveSource,
    /// What must stay unwritten: from the start for a paused VM's disk,
    /// from the final round for a live one (`None` until then).
    watch: tokio::sync::Mutex<Option<WriteWatch>>,
    manifest: SharedManifest,
    rt: tokio::runtime::Handle,
    /// Why the source may no longer be served; once set, it stays.
    changed: Mutex<Option<String>>,
    /// The pre-copy state of a running VM's disk (`--live`).
    precopy: Option<Precopy>,
}

/// What a live source keeps: the tracker (until the final round), the
/// change log it feeds, and whether it is frozen.
struct Precopy {
    tracker: tokio::sync::Mutex<Option<ChangeTracker>>,
    log: Mutex<ChangeLog>,
    frozen: AtomicBool,
}

impl NbdSource {
    fn changed_now(&self) -> Option<String> {
        self.changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_changed(&self, why: String) {
        let mut g = self
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.is_none() {
            tracing::error!(reason = %why, "the source disk changed: nothing more is sent");
            *g = Some(why);
        }
    }

    fn log(&self) -> Option<std::sync::MutexGuard<'_, ChangeLog>> {
        self.precopy.as_ref().map(|p| {
            p.log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
    }

    /// A round found `dirty` written: their hashes are forgotten first
    /// (a destination that refetches them is answered from the disk, never
    /// from a stale hash or hole), then they go to the change log.
    fn record(&self, dirty: &ChunkSet) -> u64 {
        let chunks: Vec<u64> = dirty.iter().collect();
        let written: Vec<Range<u64>> = runs(&chunks);
        for r in &written {
            self.manifest.begin_write(r.clone());
            self.manifest.end_write(r.clone());
        }
        if let Some(mut log) = self.log() {
            for r in written {
                log.record(r);
            }
        }
        chunks.len() as u64
    }

    /// One pre-copy round; `false` once rounds are over (frozen, or the
    /// source can no longer tell what the VM wrote).
    async fn round(&self) -> bool {
        let Some(pc) = &self.precopy else {
            return false;
        };
        let mut g = pc.tracker.lock().await;
        let Some(t) = g.as_mut() else {
            return false;
        };
        match t.next_round().await {
            Ok(r) => {
                let generation = r.generation();
                let chunks = self.record(r.dirty());
                if let Err(e) = t.complete(r).await {
                    // Recorded already: nothing lost, but the tracker
                    // cannot go on.
                    self.set_changed(format!(
                        "cannot end pre-copy round {generation} on the VM's QEMU: {e}"
                    ));
                    return false;
                }
                tracing::debug!(generation, chunks, "pre-copy round");
                true
            }
            // Merged back, or the generation never switched (QEMU refused
            // the transaction, which is atomic): the writes are still in
            // the recording bitmap. A connection lost or timed out is not
            // retried: whether the switch happened is unknown.
            Err(
                e @ (LiveError::RoundFailed { .. }
                | LiveError::Qmp {
                    source: QmpError::Command { .. },
                    ..
                }),
            ) => {
                tracing::warn!("pre-copy round failed, its writes kept for the next: {e}");
                true
            }
            Err(e) => {
                self.set_changed(format!("cannot tell what the VM wrote any more: {e}"));
                false
            }
        }
    }

    /// The switchover's freeze of a live source: see the module
    /// documentation.
    async fn freeze_live(&self) -> Result<(), String> {
        let Some(pc) = &self.precopy else {
            return Ok(());
        };
        let t0 = Instant::now();
        let mut g = pc.tracker.lock().await;
        let Some(t) = g.as_mut() else {
            return Ok(()); // frozen already
        };
        match vm_running(t.qmp()).await {
            Ok(Some(true)) => {
                return Err(
                    "the source VM is running (QMP query-status): pause it, then switch over"
                        .into(),
                )
            }
            Ok(Some(false) | None) => {}
            Err(e) => return Err(format!("cannot tell whether the source VM runs: {e}")),
        }
        let round = match t.final_round().await {
            Ok(r) => r,
            Err(
                e @ (LiveError::RoundFailed { .. }
                | LiveError::Qmp {
                    source: QmpError::Command { .. },
                    ..
                }),
            ) => return Err(format!("the final round failed (pre-copy goes on): {e}")),
            Err(e) => {
                let why = format!("cannot tell what the VM wrote any more: {e}");
                self.set_changed(why.clone());
                return Err(why);
            }
        };
        let chunks = self.record(round.dirty());
        let tracker = g.take().expect("the tracker is there");
        let watch = match tracker.into_watch(round).await {
            Ok(w) => w,
            Err(e) => {
                let why = format!("cannot watch the VM's disk after the final round: {e}");
                self.set_changed(why.clone());
                return Err(why);
            }
        };
        *self.watch.lock().await = Some(watch);
        pc.frozen.store(true, Ordering::SeqCst);
        // Hashes are learned from now on; reads begun before this moment
        // learn none (the manifest's write count moves).
        self.manifest.end_write(0..0);
        tracing::info!(
            final_chunks = chunks,
            freeze_ms = t0.elapsed().as_secs_f64() * 1e3,
            "the VM's disk is frozen: final round taken, any later write stops the source"
        );
        self.check().await;
        match self.changed_now() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Looks at the bitmap's count: any write (or a bitmap that cannot be
    /// read: a write could no longer be seen) marks the source changed.
    async fn check(&self) {
        if self.changed_now().is_some() {
            return;
        }
        let (counted, node, bitmap) = {
            let mut g = self.watch.lock().await;
            // A running VM's disk: its writes go to the rounds.
            let Some(w) = g.as_mut() else {
                return;
            };
            (
                w.dirty_bytes().await,
                w.node().to_string(),
                w.bitmap().to_string(),
            )
        };
        let export = &self.live.uri().export;
        let why = match counted {
            Ok(0) => return,
            Ok(n) if self.precopy.is_some() => format!(
                "the disk behind NBD export {export:?} was written after the switchover's \
                 final round ({n} bytes dirty in bitmap {bitmap:?} of node {node:?}): \
                 the VM must stay paused from the switchover on"
            ),
            Ok(n) => format!(
                "the disk behind NBD export {export:?} was written after ferry serve started \
                 ({n} bytes dirty in bitmap {bitmap:?} of node {node:?})"
            ),
            Err(e) => format!(
                "cannot tell whether the disk behind NBD export {export:?} was written: {e}"
            ),
        };
        self.set_changed(why);
    }

    /// Reads chunks `first..first+count` into `buf` and then looks at the
    /// bitmap, so the caller's [`ChunkSource::changed`] tells whether the
    /// data may be sent. Runs on a blocking thread.
    fn read_range(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let geo = self.manifest.geometry();
        let end_chunk = first.saturating_add(count).min(geo.chunks());
        if first >= end_chunk {
            buf.clear();
            return Ok(());
        }
        let start = geo.chunk_bytes(first).start;
        let end = geo.chunk_bytes(end_chunk - 1).end;
        buf.clear();
        buf.resize((end - start) as usize, 0);
        self.rt
            .block_on(self.live.read(start, buf))
            .map_err(std::io::Error::other)?;
        self.rt.block_on(self.check());
        Ok(())
    }
}

impl ChunkSource for NbdSource {
    fn manifest(&self) -> &SharedManifest {
        &self.manifest
    }

    fn read_chunk(&self, index: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.read_range(index, 1, buf)
    }

    fn read_chunks(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.read_range(first, count, buf)
    }

    fn changed(&self) -> Option<String> {
        self.changed_now()
    }

    fn changes(&self) -> Option<&dyn LiveChanges> {
        self.precopy.as_ref().map(|_| self as &dyn LiveChanges)
    }
}

impl LiveChanges for NbdSource {
    fn end_round(&self, force: bool) -> u64 {
        self.log().map_or(0, |mut l| l.end_round(force))
    }

    fn since(&self, applied: u64) -> (u64, Option<Vec<Range<u64>>>) {
        match self.log() {
            Some(l) => (l.generation(), l.since(applied)),
            None => (0, None),
        }
    }

    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.freeze_live())
    }

    fn frozen(&self) -> bool {
        self.precopy
            .as_ref()
            .is_none_or(|p| p.frozen.load(Ordering::SeqCst))
    }
}

/// Takes a pre-copy round every [`ROUND_EVERY`] until the final one.
async fn take_rounds(source: Arc<NbdSource>) {
    loop {
        tokio::time::sleep(ROUND_EVERY).await;
        if source.changed_now().is_some() || !source.round().await {
            return;
        }
    }
}

/// Looks every [`CHECK_EVERY`] whether the disk was written, so an idle
/// source notices too.
async fn watch_disk(source: Arc<NbdSource>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        source.check().await;
        if source.changed_now().is_some() {
            return;
        }
    }
}

fn random_id() -> Result<[u8; 32]> {
    let mut id = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut id))
        .context("cannot read /dev/urandom for the source id")?;
    Ok(id)
}

/// Runs `ferry serve` over `a.nbd_source`.
pub(crate) fn run(a: ServeArgs, identity: Identity, trusted: Vec<Fingerprint>) -> Result<()> {
    let (Some(uri_text), Some(qmp_path)) = (a.nbd_source.clone(), a.qmp.clone()) else {
        anyhow::bail!("ferry serve needs --disk, or --nbd-source with --qmp");
    };
    let uri = NbdUri::parse(&uri_text).context("--nbd-source")?;
    let id = random_id()?;
    let bitmap: String = format!(
        "ferry-serve-{}",
        id[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut qmp = Qmp::connect(&qmp_path)
            .await
            .with_context(|| format!("--qmp {}", qmp_path.display()))?;
        let node = match &a.nbd_node {
            Some(n) => n.clone(),
            None => export_node(&mut qmp, &uri.export)
                .await
                .context("finding the node behind --nbd-source (or give --nbd-node)")?,
        };
        let cfg = SourceConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            ..SourceConfig::default()
        };
        // The bitmap (a paused VM's watch, or a live VM's first
        // generation) first: every write after it is seen, and the map
        // and reads come after it.
        let (watch, live, tracker) = if a.live {
            let live = LiveSource::connect(&uri, cfg).await?;
            let mut tc = TrackerConfig::new(&node);
            tc.prefix = bitmap.clone();
            tc.max_rounds = u32::MAX;
            let tracker = ChangeTracker::start(qmp, &live, tc).await?;
            (None, live, Some(tracker))
        } else {
            let watch = WriteWatch::start(qmp, &node, &bitmap).await?;
            let live = LiveSource::connect(&uri, cfg).await?;
            (Some(watch), live, None)
        };
        let allocated = live.allocation().await?;
        let geo = Geometry::new(live.size(), DEFAULT_CHUNK_SIZE);
        let kinds = (0..geo.chunks())
            .map(|c| {
                if allocated.contains(c) {
                    ChunkKind::Unhashed
                } else {
                    ChunkKind::Zero
                }
            })
            .collect();
        let manifest = Manifest::with_source_id(geo, kinds, id);
        tracing::info!(
            disk = %uri_text,
            node = %node,
            bitmap = %bitmap,
            size = geo.disk_size,
            allocated_bytes = manifest.data_bytes(),
            unhashed_chunks = manifest.unhashed(),
            live = a.live,
            "source manifest ready from the NBD export's allocation (a dirty bitmap watches for writes)"
        );
        let fingerprint = identity.fingerprint();
        let manifest = SharedManifest::new(manifest);
        if a.live {
            // While the VM runs no hash is learned or trusted: a write
            // ferry hears of only at the next round may land any time.
            // Held open until the freeze.
            manifest.begin_write(0..0);
        }
        let source = Arc::new(NbdSource {
            live,
            watch: tokio::sync::Mutex::new(watch),
            manifest,
            rt: tokio::runtime::Handle::current(),
            changed: Mutex::new(None),
            precopy: tracker.map(|t| Precopy {
                tracker: tokio::sync::Mutex::new(Some(t)),
                log: Mutex::new(ChangeLog::new()),
                frozen: AtomicBool::new(false),
            }),
        });
        // Written before the map was taken, after the bitmap was added.
        source.check().await;
        let server = Server::bind(server_options(&a, identity, trusted), source.clone())?;
        println!(
            "ferry serve: exporting {uri_text} (node {node}{}) read-only on {} (fingerprint {fingerprint})",
            if a.live { ", live: pre-copy rounds" } else { "" },
            server.local_addr()
        );
        crate::notify::notify("READY=1\nSTATUS=exporting");
        if a.live {
            tokio::spawn(take_rounds(source.clone()));
        }
        tokio::spawn(watch_disk(source));
        server.run().await?;
        Ok(())
    })
}
