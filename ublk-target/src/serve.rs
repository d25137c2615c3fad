//! `ferry serve`: export a disk read-only over QUIC. Ready at once: the
//! first manifest comes from the image's holes and the hash cache, with no
//! data read; chunk hashes are computed as chunks are sent and saved in the
//! hash cache (docs/decisions/lazy-source-manifest.md). With `--present`,
//! the image is also served read-write to the running source VM, whose
//! writes are recorded for pre-copying destinations (`crate::present`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_core::geometry::DEFAULT_CHUNK_SIZE;
use ferry_core::SharedManifest;
use ferry_store::SourceImage;
use ferry_transport::{ChunkSource, DiskReads, Fingerprint, Identity, Server, ServerOptions};

use crate::cli::ServeArgs;
use crate::present::Presented;

/// How often learned hashes are saved to the hash cache (at most this much
/// hashing is lost when the source is stopped), and how often an idle
/// source looks whether its image changed.
const SAVE_EVERY: Duration = Duration::from_secs(10);
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A source image as the transport's chunk source.
struct ImageSource {
    image: Arc<SourceImage>,
    manifest: Arc<SharedManifest>,
    /// The image as the source VM's disk (`--present`).
    presented: Option<Arc<Presented>>,
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

    fn changes(&self) -> Option<&dyn ferry_transport::LiveChanges> {
        self.presented
            .as_deref()
            .map(|p| p as &dyn ferry_transport::LiveChanges)
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

/// Opens a source image: the image, its first manifest, and where its
/// hashes are cached.
fn open_image(
    disk: &Path,
    a: &ServeArgs,
    presenting: bool,
) -> Result<(SourceImage, ferry_core::Manifest, Option<PathBuf>)> {
    let image = if presenting {
        SourceImage::open_for_presenting(disk)?
    } else {
        SourceImage::open(disk)?
    };
    image.refuse_if_open_for_writing()?;
    let cache: Option<PathBuf> = match &a.hash_cache {
        // The VM writes a presented image: hashes saved would go stale.
        _ if presenting => None,
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.clone()),
        None => Some(image.default_cache_path()),
    };
    // The id is kept beside the hash cache (a unit may write nowhere
    // else), or beside the image without a cache.
    let id_path = match (&a.hash_cache, &cache) {
        (Some(c), _) if c.as_os_str() != "none" => c.with_extension("ferry-source"),
        (_, Some(c)) => c.with_extension("ferry-source"),
        _ => image.id_path(),
    };
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
    Ok((image, manifest, cache))
}

/// `ferry serve --disk NAME=PATH --disk NAME=PATH …`: several disks on
/// one port, each served to the destinations that name it
/// (docs/decisions/many-disks-one-budget.md). Not with --present or
/// --hash-cache (each disk's hashes are cached beside it).
fn run_disks(a: ServeArgs, identity: Identity, trusted: Vec<Fingerprint>) -> Result<()> {
    if a.present.is_some() || a.hash_cache.is_some() {
        anyhow::bail!("several --disk: not with --present or --hash-cache (yet)");
    }
    let named = crate::cli::named_disks(&a.disks)?;
    let mut sources = Vec::new();
    for (name, path) in &named {
        let (image, manifest, cache) =
            open_image(path, &a, false).with_context(|| format!("disk {name}"))?;
        let source = Arc::new(ImageSource {
            image: Arc::new(image),
            manifest: Arc::new(SharedManifest::new(manifest)),
            presented: None,
            completed: tokio::sync::Notify::new(),
        });
        sources.push((name.clone(), path.clone(), source, cache));
    }
    let fingerprint = identity.fingerprint();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind_disks(
            server_options(&a, identity, trusted),
            sources
                .iter()
                .map(|(n, _, s, _)| (Some(n.clone()), s.clone() as Arc<dyn ChunkSource>))
                .collect(),
        )?;
        for (name, path, source, cache) in sources {
            println!(
                "ferry serve: exporting {} read-only as disk {name} on {} (fingerprint {fingerprint})",
                path.display(),
                server.local_addr()
            );
            if let Some(c) = cache {
                tokio::spawn(save_hashes(source.clone(), c));
            }
            tokio::spawn(watch_image(source));
        }
        crate::notify::notify("READY=1\nSTATUS=exporting");
        server.run().await?;
        Ok(())
    })
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

pub(crate) fn run(mut a: ServeArgs) -> Result<()> {
    let trusted = parse_fingerprints(&a.trust_peer)?;
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    if a.disks.len() > 1 {
        return run_disks(a, identity, trusted);
    }
    a.disk = a.disks.first().cloned();
    let Some(disk) = a.disk.clone() else {
        return crate::serve_nbd::run(a, identity, trusted);
    };
    let present_path = match a.present.as_deref() {
        Some(spec) => Some(PathBuf::from(spec.strip_prefix("unix:").with_context(
            || format!("--present {spec:?}: expected unix:PATH (the source VM's NBD socket)"),
        )?)),
        None => None,
    };
    let (image, manifest, cache) = open_image(&disk, &a, present_path.is_some())?;
    let fingerprint = identity.fingerprint();
    let image = Arc::new(image);
    let manifest = Arc::new(SharedManifest::new(manifest));
    let presented = present_path
        .as_ref()
        .map(|_| Arc::new(Presented::new(image.clone(), manifest.clone())));
    let source = Arc::new(ImageSource {
        image,
        manifest,
        presented: presented.clone(),
        completed: tokio::sync::Notify::new(),
    });
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(server_options(&a, identity, trusted), source.clone())?;
        println!(
            "ferry serve: exporting {} {} on {} (fingerprint {fingerprint})",
            disk.display(),
            if presented.is_some() {
                "(its VM writes it through --present)"
            } else {
                "read-only"
            },
            server.local_addr()
        );
        if let (Some(p), Some(path)) = (presented, present_path) {
            let at = crate::present::start(p, &path)?;
            println!(
                "ferry serve: presenting {} read-write to the source VM on {at}",
                disk.display(),
            );
        }
        crate::notify::notify("READY=1\nSTATUS=exporting");
        if let Some(c) = cache {
            tokio::spawn(save_hashes(source.clone(), c));
        }
        tokio::spawn(watch_image(source));
        server.run().await?;
        Ok(())
    })
}
