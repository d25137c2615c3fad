//! Opening (resume) or creating (fresh) the destination disk and its state,
//! keeping the guest writes a previous run acknowledged, and the engine
//! that starts from them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_core::{Engine, Geometry};
use ferry_store::{Destination, StateFile};

use crate::error::PullError;

/// Default state path: beside the disk.
pub fn default_state_path(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".ferry-state");
    PathBuf::from(s)
}

/// Opens (resume) or creates (fresh) the backing file and its state, locked
/// and bound to each other, refusing every combination whose contents would
/// be unknown ([`ferry_store::destination`]). Never modifies an existing
/// file it refuses.
///
/// New files are made durable before they get their final names; their
/// directory entries are not: [`creation_sync`] does that on a blocking
/// thread, and the first sync round waits for it, so nothing is recorded as
/// durable before the files themselves are.
pub fn open_or_create(
    disk: &Path,
    state_path: &Path,
    geo: Geometry,
    id: [u8; 32],
) -> Result<Destination, PullError> {
    Ok(ferry_store::open_or_create(disk, state_path, geo, id)?)
}

/// Makes freshly created files' directory entries durable on a blocking
/// thread; see [`open_or_create`].
///
/// `inject_failure_ms` is a test hook: the fsyncs then fail that many ms
/// after they begin (`--inject-creation-sync-failure-ms`), so a test can
/// tell whether the first sync round waited for them.
pub fn creation_sync(
    disk: &Path,
    state_path: &Path,
    inject_failure_ms: Option<u64>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let paths = [disk.to_owned(), state_path.to_owned()];
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        if let Some(ms) = inject_failure_ms {
            std::thread::sleep(Duration::from_millis(ms));
            tracing::warn!("test hook: failing the new files' fsyncs");
            return Err(std::io::Error::other(
                "test hook: the new files' fsyncs failed",
            ));
        }
        for p in &paths {
            ferry_store::sync_parent_dir(p)?;
        }
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "new disk and state files durable"
        );
        Ok(())
    })
}

/// Keeps the guest writes a crash of ours on this boot left in the page
/// cache (see [`Destination::keep_recovered_writes`]), and says so.
pub fn keep_recovered_writes(dest: &mut Destination) -> Result<(), PullError> {
    let kept = dest.keep_recovered_writes()?;
    if kept != ferry_store::RecoveredWrites::default() {
        tracing::info!(
            blocks = kept.blocks,
            chunks = kept.chunks,
            "kept guest writes acknowledged before the previous run stopped"
        );
    }
    Ok(())
}

/// The engine of a pull resuming from `state` (or starting afresh). A copy
/// complete and `verified` has every block: it needs no manifest (which
/// would mark the zero chunks present) nor source.
pub fn engine(state: &StateFile, geo: Geometry, verified: bool) -> Engine {
    let present = if verified {
        bitvec::bitvec![1; geo.blocks() as usize]
    } else {
        state.present_bits(geo.blocks())
    };
    Engine::new(geo, present, state.guest_bits(geo.chunks()))
}
