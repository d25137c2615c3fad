//! `ferry serve`: export a disk read-only over QUIC.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_core::geometry::DEFAULT_CHUNK_SIZE;
use ferry_core::SharedManifest;
use ferry_store::SourceImage;
use ferry_transport::{ChunkSource, DiskReads, Fingerprint, Identity, Server, ServerOptions};

use crate::cli::ServeArgs;

/// A source image as the transport's chunk source.
struct ImageSource {
    image: SourceImage,
    manifest: SharedManifest,
}

impl ChunkSource for ImageSource {
    fn manifest(&self) -> &SharedManifest {
        &self.manifest
    }

    fn read_chunk(&self, index: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.image.read_chunk(self.manifest.geometry(), index, buf)
    }

    fn read_chunks(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.image
            .read_chunks(self.manifest.geometry(), first, count, buf)
    }
}

/// Parses `--trust-peer` values.
pub(crate) fn parse_fingerprints(values: &[String]) -> Result<Vec<Fingerprint>> {
    values
        .iter()
        .map(|v| {
            v.parse::<Fingerprint>()
                .with_context(|| format!("--trust-peer {v:?} is not a certificate fingerprint"))
        })
        .collect()
}

pub(crate) fn run(a: ServeArgs) -> Result<()> {
    let trusted = parse_fingerprints(&a.trust_peer)?;
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    let image = SourceImage::open(&a.disk)?;
    let cache: Option<PathBuf> = match &a.hash_cache {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.clone()),
        None => Some(image.default_cache_path()),
    };
    let last = AtomicU64::new(0);
    let manifest = image
        .manifest(DEFAULT_CHUNK_SIZE, cache.as_deref(), &|done, total| {
            let pct = done * 100 / total.max(1);
            if pct >= last.load(Ordering::Relaxed) + 10 {
                last.store(pct, Ordering::Relaxed);
                tracing::info!("hashing source: {pct}% of {total} bytes");
            }
        })
        .context("cannot build the source manifest")?;
    tracing::info!(
        disk = %a.disk.display(),
        size = manifest.geometry().disk_size,
        data_bytes = manifest.data_bytes(),
        "source manifest ready"
    );
    // From here on ferry reads exactly what it sends
    // (docs/decisions/source-reads-what-it-sends.md); without the advice the
    // disk still works, only with the kernel's readahead guesses.
    if let Err(e) = image.turn_readahead_off() {
        tracing::warn!(error = %e, "cannot turn the kernel's readahead off for the source disk");
    }
    let tuning = a.link.tuning();
    let fingerprint = identity.fingerprint();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(
            ServerOptions {
                listen: a.listen,
                identity,
                trusted,
                tuning,
                corrupt_once: a.inject_corrupt_chunk.clone(),
                compress: !a.no_compress,
                disk_reads: DiskReads {
                    at_once: a.background_disk_reads,
                    read_bytes: a.background_read_kib * 1024,
                },
            },
            Arc::new(ImageSource {
                image,
                manifest: SharedManifest::new(manifest),
            }),
        )?;
        println!(
            "ferry serve: exporting {} read-only on {} (fingerprint {fingerprint})",
            a.disk.display(),
            server.local_addr()
        );
        crate::notify::notify("READY=1\nSTATUS=exporting");
        server.run().await?;
        Ok(())
    })
}
