//! Pre-copy from a live source: a generation of the source's changes
//! applied to the destination — the chunks written there made absent in
//! the engine and in the state file, durably, then the generation recorded
//! (docs/decisions/precopy-switchover.md).

use std::io;
use std::ops::Range;

use ferry_store::Precopy;

use crate::disk::{BlockMap, Disk};
use crate::fetcher::Fetcher;
use crate::shell::Shell;

impl<F: Fetcher, D: Disk, M: BlockMap> Shell<F, D, M> {
    /// Applies one generation of a live source's changes: `chunks` (or,
    /// with `everything`, every chunk) become absent, in the engine and
    /// durably in the state file, and then `record` is recorded. Runs
    /// between sync rounds, so no round persists a bit it clears. Returns
    /// how many chunks held data here and must be fetched again. When it
    /// returns `Ok`, the generation may be acknowledged.
    pub async fn apply_changes(
        &self,
        chunks: &[Range<u64>],
        everything: bool,
        record: Precopy,
    ) -> io::Result<u64> {
        let _round = self.sync_lock.lock().await;
        let all = [0..self.geo_chunks()];
        let chunks = if everything { &all[..] } else { chunks };
        let switched = record.switched;
        let cleared = self.lock().handle_changed(chunks);
        let n = cleared.len() as u64;
        let state = self.state.clone();
        D::offload(move || {
            let mut s = state.lock().expect("state lock");
            s.clear_present(&cleared)?;
            s.record_precopy(record)
        })
        .await?;
        if switched {
            // The copier may verify a complete copy from now on.
            self.awaiting_switchover
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        self.changed.notify_waiters();
        Ok(n)
    }
}
