//! `ferry serve`: export a disk read-only over QUIC. Ready at once: the
//! first manifest comes from the image's holes and the hash cache, with no
//! data read; chunk hashes are computed as chunks are sent and saved in the
//! hash cache (docs/decisions/lazy-source-manifest.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_core::geometry::DEFAULT_CHUNK_SIZE;
use ferry_core::SharedManifest;
use ferry_store::SourceImage;
use ferry_transport::{ChunkSource, DiskReads, Fingerprint, Identity, Server, ServerOptions};

use crate::cli::ServeArgs;

/// How often learned hashes are saved to the hash cache (at most this much
/// hashing is lost when the source is stopped), and how often an idle
/// source looks whether its image changed.
const SAVE_EVERY: Duration = Duration::from_secs(10);
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A source image as the transport's chunk source.
struct ImageSource {
    image: SourceImage,
    manifest: SharedManifest,
    /// Told when every hash is known (save them now).
    completed: tokio::sync::Notify,
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

    fn changed(&self) -> Option<String> {
        self.image.check()
    }

    fn completed(&self) {
        self.completed.notify_one();
    }
}

/// The server's options from the command line.
pub(crate) fn server_options(
    a: &ServeArgs,
    identity: Identity,
    trusted: Vec<Fingerprint>,
) -> ServerOptions {
    ServerOptions {
        listen: a.listen,
        identity,
        trusted,
        tuning: a.link.tuning(),
        corrupt_once: a.inject_corrupt_chunk.clone(),
        compress: !a.no_compress,
        disk_reads: DiskReads {
            at_once: a.background_disk_reads,
            read_bytes: a.background_read_kib * 1024,
        },
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

/// Saves the hashes learned since the last save, every [`SAVE_EVERY`] or
/// when the manifest became complete; runs until the server stops.
async fn save_hashes(source: Arc<ImageSource>, cache: PathBuf) {
    let mut saved = source.manifest.version();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAVE_EVERY) => {}
            _ = source.completed.notified() => {}
        }
        let version = source.manifest.version();
        if version == saved {
            continue;
        }
        let s = source.clone();
        let c = cache.clone();
        let r = tokio::task::spawn_blocking(move || {
            let m = s.manifest.snapshot();
            s.image.save_hashes(&m, &c).map(|()| m.unhashed())
        })
        .await;
        match r {
            Ok(Ok(unhashed)) => {
                saved = version;
                tracing::debug!(cache = %cache.display(), unhashed, "chunk hashes saved");
            }
            Ok(Err(e)) => {
                tracing::warn!(cache = %cache.display(), error = %e, "cannot save the chunk hashes; they will be computed again next time");
                // Not again until more are learned.
                saved = version;
            }
            Err(e) => tracing::warn!(error = %e, "saving the chunk hashes failed"),
        }
    }
}

/// Looks every [`CHECK_EVERY`] whether the image changed (the check logs
/// it once), so an idle source notices too.
async fn watch_image(source: Arc<ImageSource>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if source.image.check().is_some() {
            return;
        }
    }
}

pub(crate) fn run(a: ServeArgs) -> Result<()> {
    let trusted = parse_fingerprints(&a.trust_peer)?;
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    let Some(disk) = a.disk.clone() else {
        return crate::serve_nbd::run(a, identity, trusted);
    };
    let image = SourceImage::open(&disk)?;
    image.refuse_if_open_for_writing()?;
    let cache: Option<PathBuf> = match &a.hash_cache {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.clone()),
        None => Some(image.default_cache_path()),
    };
    // The id is kept beside the hash cache (a unit may write nowhere
    // else), or beside the image without a cache.
    let id_path = cache
        .as_ref()
        .map_or_else(|| image.id_path(), |c| c.with_extension("ferry-source"));
    let id = image.source_id(&id_path);
    let manifest = image.first_manifest(DEFAULT_CHUNK_SIZE, cache.as_deref(), id.id);
    tracing::info!(
        disk = %disk.display(),
        size = manifest.geometry().disk_size,
        allocated_bytes = manifest.data_bytes(),
        unhashed_chunks = manifest.unhashed(),
        new_source_id = id.new,
        "source manifest ready (chunks are hashed as they are sent)"
    );
    // ferry reads exactly what it sends
    // (docs/decisions/source-reads-what-it-sends.md); without the advice the
    // disk still works, only with the kernel's readahead guesses.
    if let Err(e) = image.turn_readahead_off() {
        tracing::warn!(error = %e, "cannot turn the kernel's readahead off for the source disk");
    }
    let fingerprint = identity.fingerprint();
    let source = Arc::new(ImageSource {
        image,
        manifest: SharedManifest::new(manifest),
        completed: tokio::sync::Notify::new(),
    });
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(server_options(&a, identity, trusted), source.clone())?;
        println!(
            "ferry serve: exporting {} read-only on {} (fingerprint {fingerprint})",
            disk.display(),
            server.local_addr()
        );
        crate::notify::notify("READY=1\nSTATUS=exporting");
        if let Some(c) = cache {
            tokio::spawn(save_hashes(source.clone(), c));
        }
        tokio::spawn(watch_image(source));
        server.run().await?;
        Ok(())
    })
}
