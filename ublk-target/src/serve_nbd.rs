//! `ferry serve --nbd-source URI --qmp SOCKET`: export a VM's disk read
//! through its QEMU's (or qemu-storage-daemon's) NBD export instead of a
//! file. The VM must not write it any more (post-copy: it is paused at the
//! source): before the disk is mapped, a dirty bitmap is added to the
//! export's node over QMP, and once it counts a write (looked at after
//! every read and every second) the source refuses to send anything more
//! (`SourceChanged`), as a file source does when its image changes. The
//! first manifest comes from `base:allocation` (holes zero, the rest
//! unhashed); the source id is new at every start, since what happened to
//! the disk between two runs is not known.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_core::geometry::DEFAULT_CHUNK_SIZE;
use ferry_core::{ChunkKind, Geometry, Manifest, SharedManifest};
use ferry_live::{export_node, LiveSource, Qmp, SourceConfig, WriteWatch};
use ferry_nbd_client::NbdUri;
use ferry_transport::{ChunkSource, Fingerprint, Identity, Server};

use crate::cli::ServeArgs;
use crate::serve::server_options;

/// How often an idle source looks whether the disk was written.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The disk behind an NBD export as the transport's chunk source.
struct NbdSource {
    live: LiveSource,
    watch: tokio::sync::Mutex<WriteWatch>,
    manifest: SharedManifest,
    rt: tokio::runtime::Handle,
    /// Why the source may no longer be served; once set, it stays.
    changed: Mutex<Option<String>>,
}

impl NbdSource {
    fn changed_now(&self) -> Option<String> {
        self.changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Looks at the bitmap's count: any write (or a bitmap that cannot be
    /// read: a write could no longer be seen) marks the source changed.
    async fn check(&self) {
        if self.changed_now().is_some() {
            return;
        }
        let (counted, node, bitmap) = {
            let mut w = self.watch.lock().await;
            (
                w.dirty_bytes().await,
                w.node().to_string(),
                w.bitmap().to_string(),
            )
        };
        let export = &self.live.uri().export;
        let why = match counted {
            Ok(0) => return,
            Ok(n) => format!(
                "the disk behind NBD export {export:?} was written after ferry serve started \
                 ({n} bytes dirty in bitmap {bitmap:?} of node {node:?})"
            ),
            Err(e) => format!(
                "cannot tell whether the disk behind NBD export {export:?} was written: {e}"
            ),
        };
        let mut g = self
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.is_none() {
            tracing::error!(reason = %why, "the source disk changed: nothing more is sent");
            *g = Some(why);
        }
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
        // The bitmap first: every write after it is seen, and the map and
        // reads come after it.
        let watch = WriteWatch::start(qmp, &node, &bitmap).await?;
        let cfg = SourceConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            ..SourceConfig::default()
        };
        let live = LiveSource::connect(&uri, cfg).await?;
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
            "source manifest ready from the NBD export's allocation (a dirty bitmap watches for writes)"
        );
        let fingerprint = identity.fingerprint();
        let source = Arc::new(NbdSource {
            live,
            watch: tokio::sync::Mutex::new(watch),
            manifest: SharedManifest::new(manifest),
            rt: tokio::runtime::Handle::current(),
            changed: Mutex::new(None),
        });
        // Written before the map was taken, after the bitmap was added.
        source.check().await;
        let server = Server::bind(server_options(&a, identity, trusted), source.clone())?;
        println!(
            "ferry serve: exporting {uri_text} (node {node}) read-only on {} (fingerprint {fingerprint})",
            server.local_addr()
        );
        crate::notify::notify("READY=1\nSTATUS=exporting");
        tokio::spawn(watch_disk(source));
        server.run().await?;
        Ok(())
    })
}
