//! Local fills (`ferry pull --index`): chunks whose source hash a content
//! index knows are read from the local file that holds them, hashed,
//! compared, and handed to the engine like fetched data (the same fill,
//! the same sync: [`Shell::arrived`]), instead of crossing the WAN.
//!
//! [`run_local_fill`] asks the source for its complete manifest early (the
//! source hashes what it has not read yet, from its disk: faster than the
//! WAN), matches every data chunk's hash against the indexes in one pass
//! each, names the matches to the engine, then fills them in the
//! background while on-demand reads and the copier go on; a guest read of
//! a matched chunk is filled from it too (the engine hands it out through
//! [`ferry_core::Engine::poll_fill_local`]). A local copy that no longer
//! matches (the indexed file changed) is fetched from the source instead:
//! an index only says where a chunk was. See docs/decisions/dedup-index.md.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::engine::Payload;
use ferry_core::{ChunkKind, Manifest, Phase};
use ferry_index::Index;

use crate::copier::CopierSettings;
use crate::disk::{BlockMap, Disk};
use crate::fetcher::Fetcher;
use crate::shell::Shell;

/// Chunks the background local filler reads at once.
const LOCAL_BATCH: usize = 16;

/// Where each matched chunk's content is at this host.
#[derive(Debug)]
pub(crate) struct LocalMatches {
    /// The source's complete manifest: the hash each match was found by.
    manifest: Arc<Manifest>,
    /// The indexed files, open read-only (those of every index in turn);
    /// `None` where one could not be opened.
    files: Vec<Option<Arc<File>>>,
    /// Chunk -> (file, byte offset).
    at: HashMap<u64, (u32, u64)>,
}

impl LocalMatches {
    /// Matches every data chunk of `manifest` against `indexes`, the first
    /// index that has a chunk winning.
    fn find(manifest: Arc<Manifest>, indexes: &[Index]) -> Result<Self, ferry_index::IndexError> {
        let mut wanted: Vec<([u8; 32], u64)> = manifest
            .chunks()
            .iter()
            .enumerate()
            .filter_map(|(c, k)| match k {
                ChunkKind::Data(h) => Some((*h, c as u64)),
                _ => None,
            })
            .collect();
        wanted.sort_unstable();
        let mut files = Vec::new();
        let mut at = HashMap::new();
        for index in indexes {
            let base = files.len() as u32;
            for f in index.files() {
                match ferry_index::identity_of(&f.path) {
                    Ok(now) if now == f.identity => {}
                    Ok(_) => tracing::warn!(
                        path = %f.path.display(),
                        index = %index.path().display(),
                        "indexed file changed since it was indexed; its chunks are checked as they are read and fetched where they differ (run ferry index update)"
                    ),
                    Err(e) => tracing::warn!(
                        path = %f.path.display(),
                        error = %e,
                        "indexed file cannot be read; its chunks are fetched"
                    ),
                }
                files.push(File::open(&f.path).ok().map(Arc::new));
            }
            for (chunk, loc) in index.matches(&wanted)? {
                if files[(base + loc.file) as usize].is_some() {
                    at.entry(chunk).or_insert((base + loc.file, loc.offset));
                }
            }
            wanted.retain(|(_, c)| !at.contains_key(c));
        }
        Ok(LocalMatches {
            manifest,
            files,
            at,
        })
    }
}

/// Fills the local matches of the pull run by `shared` from `indexes` (see
/// the module documentation); returns when every match was tried, the
/// copy ended, or the matches could not be had (then everything is
/// fetched from the source, as without an index).
pub async fn run_local_fill<F: Fetcher, D: Disk, M: BlockMap>(
    shared: Arc<Shell<F, D, M>>,
    indexes: Vec<Index>,
    settings: Arc<CopierSettings>,
) {
    if indexes.is_empty() {
        return;
    }
    let client = shared.client().await;
    let t0 = Instant::now();
    let complete = match client.complete_manifest().await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot get the source's complete manifest; no local fills, everything is fetched");
            return;
        }
    };
    // The engine's first manifest: the complete one must follow it.
    let first = loop {
        let notified = shared.changed.notified();
        {
            let e = shared.lock();
            if let Phase::Failed(_) = e.phase() {
                return;
            }
            if let Some(m) = e.manifest() {
                break m.clone();
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    };
    if let Err(why) = complete.follows(&first) {
        tracing::warn!(%why, "the source's complete manifest does not follow its first; no local fills");
        return;
    }
    let manifest_ms = t0.elapsed().as_millis() as u64;
    let found =
        D::offload(move || LocalMatches::find(complete, &indexes).map_err(std::io::Error::other))
            .await;
    let matches = match found {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot match the source's chunks against the index; no local fills");
            return;
        }
    };
    let mut chunks: Vec<u64> = matches.at.keys().copied().collect();
    chunks.sort_unstable();
    if shared.local.set(Arc::new(matches)).is_err() {
        return;
    }
    let taken = shared.lock().handle_local_matches(&chunks);
    tracing::info!(
        matched_chunks = chunks.len(),
        to_fill = taken,
        manifest_ms,
        match_ms = t0.elapsed().as_millis() as u64 - manifest_ms,
        "local copies found in the index; filling them"
    );
    shared.changed.notify_waiters();
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (batch, pending, unsynced, stop) = {
            let mut e = shared.lock();
            let stop = !matches!(e.phase(), Phase::Copying);
            let unsynced = e.unsynced_bytes();
            let batch = if stop || unsynced >= settings.sync_bytes {
                Vec::new()
            } else {
                e.poll_local_background(LOCAL_BATCH)
            };
            (batch, e.local_pending(), unsynced, stop)
        };
        if stop {
            return;
        }
        if batch.is_empty() {
            if !pending {
                tracing::info!(
                    filled_local_bytes = shared.lock().counters().filled_local,
                    "local fills done"
                );
                return;
            }
            // A sync batch waiting (unsynced bytes) holds fills back.
            let _ = unsynced;
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            continue;
        }
        let fills: Vec<_> = batch
            .into_iter()
            .map(|c| {
                tokio::spawn(tracing::Instrument::in_current_span(
                    shared.clone().fill_local(c),
                ))
            })
            .collect();
        for f in fills {
            let _ = f.await;
        }
        shared.changed.notify_waiters();
    }
}

impl<F: Fetcher, D: Disk, M: BlockMap> Shell<F, D, M> {
    /// Fills `chunk` (claimed for a local fill by the engine) from its
    /// local copy: read, hashed, compared with the source's hash, then
    /// handed in as fetched data; or, if it does not match or cannot be
    /// read, given back to be fetched from the source.
    pub(crate) async fn fill_local(self: Arc<Self>, chunk: u64) {
        let geo = self.geometry();
        // Taken before the read: a change reported meanwhile drops the fill.
        let issued = self.lock().change_seq();
        let found = self.local.get().and_then(|m| {
            let &(file, offset) = m.at.get(&chunk)?;
            let f = m.files[file as usize].clone()?;
            match m.manifest.chunk(chunk) {
                ChunkKind::Data(h) => Some((f, offset, h)),
                _ => None,
            }
        });
        let read = match found {
            Some((f, offset, hash)) => {
                let len = geo.chunk_len(chunk) as usize;
                D::offload(move || {
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok((buf, hash))
                })
                .await
                .ok()
            }
            None => None,
        };
        match read {
            Some((bytes, hash)) if *blake3::hash(&bytes).as_bytes() == hash => {
                self.arrived(chunk, Payload::Data { hash, bytes }, issued)
                    .await;
            }
            _ => {
                tracing::debug!(
                    chunk,
                    "local copy no longer matches the source's hash; fetching it"
                );
                let mut e = self.lock();
                e.handle_local_failed(chunk);
                self.wake(e);
            }
        }
        self.changed.notify_waiters();
    }
}
