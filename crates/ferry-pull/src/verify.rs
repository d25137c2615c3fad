//! The end-to-end verification of a complete copy: the source's complete
//! manifest fetched (the source hashes what it had not read yet), the whole
//! disk read and hashed, every chunk the guest never wrote checked against
//! the source's hash; differing chunks fetched again.

use std::sync::Arc;

use ferry_core::{Failure, Manifest};

use crate::disk::{BlockMap, Disk};
use crate::fetcher::{FetchError, Fetcher};
use crate::shell::Shell;
use crate::status::Report;

/// Outcome of the end-to-end verification.
#[derive(Debug, Default, Clone)]
pub struct Verification {
    /// "pending", "running", "ok" or "failed".
    pub state: String,
    /// Chunks compared with the source's hashes.
    pub chunks_checked: u64,
    /// Chunks that differed.
    pub mismatches: Vec<u64>,
    /// BLAKE3 of the whole disk, hex.
    pub disk_blake3: Option<String>,
    /// `disk_blake3` as bytes (zero until known).
    pub disk_blake3_bytes: [u8; 32],
    /// Chunks that earlier rounds found differing from the source and
    /// fetched again (so `ok` after them means repaired, not clean).
    pub refetched: u64,
}

/// Once every block is present: sync, then read the whole disk, hash it,
/// and check every chunk the guest never wrote against the source's hash.
/// With `may_refetch`, chunks that differ (and that the guest did not write
/// meanwhile) are made absent again, in the engine and the state file, so
/// the copier fetches them anew: returns true then, and the copy goes on.
pub(crate) async fn verify<F: Fetcher, D: Disk, M: BlockMap>(
    shared: &Arc<Shell<F, D, M>>,
    report: &Arc<Report>,
    may_refetch: bool,
) -> bool {
    let refetched_before = report.verify.lock().expect("verify lock").refetched;
    if let Err(e) = shared.sync().await {
        tracing::error!(error = %e, "sync before verification failed");
    }
    report.verify.lock().expect("verify lock").state = "running".into();
    tracing::info!("every block is present; asking the source for its complete manifest");
    let manifest = match complete_manifest(shared).await {
        Ok(m) => m,
        Err(why) => {
            tracing::error!("verification FAILED: {why}");
            *report.verify.lock().expect("verify lock") = Verification {
                state: format!("failed: {why}"),
                refetched: refetched_before,
                ..Default::default()
            };
            return false;
        }
    };
    tracing::info!("verifying the whole disk against the source's complete manifest");
    let s = shared.clone();
    let result = D::offload(move || -> std::io::Result<Verification> {
        let geo = manifest.geometry();
        let mut disk = blake3::Hasher::new();
        let mut v = Verification::default();
        let mut buf = Vec::new();
        for c in 0..geo.chunks() {
            let r = geo.chunk_bytes(c);
            buf.resize((r.end - r.start) as usize, 0);
            s.backing.read_at(&mut buf, r.start)?;
            disk.update(&buf);
            // The engine's rule: every chunk the guest did not write, data
            // against its hash, zero chunks against zeros.
            if !s.lock().verifiable(c) {
                continue;
            }
            v.chunks_checked += 1;
            let same = match manifest.chunk(c) {
                ferry_core::ChunkKind::Data(h) => *blake3::hash(&buf).as_bytes() == h,
                ferry_core::ChunkKind::Zero => buf.iter().all(|b| *b == 0),
                // `complete_manifest` lets none through.
                ferry_core::ChunkKind::Unhashed => false,
            };
            // The guest may have written it meanwhile.
            if !same && s.lock().verifiable(c) {
                v.mismatches.push(c);
            }
        }
        let digest = disk.finalize();
        v.disk_blake3 = Some(digest.to_hex().to_string());
        v.disk_blake3_bytes = *digest.as_bytes();
        v.state = if v.mismatches.is_empty() {
            "ok"
        } else {
            "failed"
        }
        .into();
        Ok(v)
    })
    .await;
    let mut v = match result {
        Ok(v) => v,
        Err(e) => Verification {
            state: format!("failed: {e}"),
            ..Default::default()
        },
    };
    v.refetched = refetched_before;
    if may_refetch && !v.mismatches.is_empty() {
        let cleared = shared
            .engine
            .lock()
            .expect("engine lock")
            .refetch(&v.mismatches);
        if !cleared.is_empty() {
            let state = shared.state.clone();
            let n = cleared.len() as u64;
            let blocks = cleared.clone();
            let res =
                D::offload(move || state.lock().expect("state lock").clear_present(&blocks)).await;
            if let Err(e) = res {
                tracing::error!(error = %e, "cannot record the chunks to fetch again; a restart verifies them again")
            }
            tracing::warn!(
                mismatched_chunks = v.mismatches.len(),
                chunks = %chunk_list(&v.mismatches),
                "verification found chunks differing from the source's hashes; fetching them again"
            );
            v.refetched += n;
            v.state = "refetching".into();
            *report.verify.lock().expect("verify lock") = v;
            shared.changed.notify_waiters();
            return true;
        }
    }
    if v.state == "ok" {
        let c = shared.engine_counters();
        tracing::info!(
            chunks = v.chunks_checked,
            refetched = v.refetched,
            fetched_bytes = c.fetched_on_demand + c.fetched_background,
            filled_local_bytes = c.filled_local,
            local_stale_chunks = c.local_stale,
            disk_blake3 = v.disk_blake3.as_deref().unwrap_or(""),
            "copy complete and verified: every chunk the guest did not write equals the source; the source may be stopped"
        );
        // Recorded durably: a restart serves the disk without the source.
        let record = ferry_store::Verified {
            disk_blake3: v.disk_blake3_bytes,
            chunks_checked: v.chunks_checked,
        };
        let state = shared.state.clone();
        let recorded =
            D::offload(move || state.lock().expect("state lock").record_verified(record)).await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record the verification; a restart will need the source")
        }
        // Nothing more is needed from the source: let it go.
        if let Some(c) = shared.client_now() {
            c.close();
        }
    } else {
        tracing::error!(
            state = %v.state,
            mismatched_chunks = v.mismatches.len(),
            chunks = %chunk_list(&v.mismatches),
            refetched = v.refetched,
            "verification FAILED"
        );
    }
    *report.verify.lock().expect("verify lock") = v;
    false
}

/// The source's complete manifest (every hash known), checked to follow
/// the manifest the copy began with ([`Manifest::follows`]) and handed to
/// the engine. A source whose complete manifest contradicts its first one
/// (a hole that became data, a hash that changed) changed: the migration
/// fails with [`Failure::SourceChanged`]. `Err` says why there is none.
async fn complete_manifest<F: Fetcher, D: Disk, M: BlockMap>(
    shared: &Arc<Shell<F, D, M>>,
) -> Result<Arc<Manifest>, String> {
    let first = shared
        .lock()
        .manifest()
        .cloned()
        .ok_or_else(|| "no manifest".to_string())?;
    let client = shared.client().await;
    let m = match client.complete_manifest().await {
        Ok(m) => m,
        Err(e @ FetchError::SourceChanged(_)) => {
            let why = e.to_string();
            shared.fail(Failure::SourceChanged(why.clone()));
            return Err(why);
        }
        Err(e) => return Err(format!("cannot fetch the source's complete manifest: {e}")),
    };
    if !m.is_complete() {
        return Err(format!(
            "the source's complete manifest still lists {} chunks without a hash",
            m.unhashed()
        ));
    }
    if let Err(why) = m.follows(&first) {
        let why = format!("the source's complete manifest contradicts its first one: {why}");
        shared.fail(Failure::SourceChanged(why.clone()));
        return Err(why);
    }
    shared.lock().handle_complete_manifest(m.clone());
    Ok(m)
}

/// Chunk numbers for a log line: `3, 17, 20`, the first 16 of them and
/// how many more.
fn chunk_list(chunks: &[u64]) -> String {
    const SHOWN: usize = 16;
    let mut out = chunks
        .iter()
        .take(SHOWN)
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if chunks.len() > SHOWN {
        out.push_str(&format!(" and {} more", chunks.len() - SHOWN));
    }
    out
}
