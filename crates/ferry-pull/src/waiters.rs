//! Guest requests waiting for chunks, woken per chunk: a change of one
//! chunk (a fill done or failed, a fetch failed, a write done) wakes only
//! the requests that wait for it, and a fill hands them the data it wrote,
//! so a read of absent data is answered from the fetched buffer instead of
//! being read back from the backing file.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use ferry_core::engine::Payload;

/// What a fill wrote into the backing file: runs of blocks (absolute block
/// numbers) of `chunk`, copied from `data` (or zeroed, for a zero chunk).
#[derive(Debug)]
pub(crate) struct Filled {
    /// The chunk.
    pub(crate) chunk: u64,
    /// The blocks written.
    pub(crate) runs: Vec<Range<u64>>,
    /// What the source sent.
    pub(crate) data: Arc<Payload>,
}

/// One waiting request.
#[derive(Debug, Default)]
struct Waiter {
    /// Signalled on a change of one of its chunks; keeps a permit, so a
    /// change between registering and waiting is not missed.
    notify: Notify,
    /// Fills of its chunks since it registered.
    filled: Mutex<Vec<Arc<Filled>>>,
}

/// The waiting requests, by chunk.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    by_chunk: Mutex<HashMap<u64, Vec<Arc<Waiter>>>>,
}

impl Waiters {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Arc<Waiter>>>> {
        self.by_chunk.lock().expect("waiters lock poisoned")
    }

    /// Registers a request waiting for changes of `chunks`; it stays
    /// registered until the returned guard is dropped.
    pub(crate) fn register(&self, chunks: Range<u64>) -> Registration<'_> {
        let waiter = Arc::new(Waiter::default());
        let mut map = self.map();
        for c in chunks.clone() {
            map.entry(c).or_default().push(waiter.clone());
        }
        Registration {
            waiters: self,
            chunks,
            waiter,
        }
    }

    /// Wakes the requests waiting for any of `chunks`.
    pub(crate) fn wake(&self, chunks: Range<u64>) {
        let map = self.map();
        if map.is_empty() {
            return;
        }
        for c in chunks {
            for w in map.get(&c).into_iter().flatten() {
                w.notify.notify_one();
            }
        }
    }

    /// Hands the requests waiting for `filled`'s chunk what the fill
    /// wrote (the engine's wake-up for the chunk then wakes them).
    pub(crate) fn attach_filled(&self, filled: Filled) {
        let map = self.map();
        let Some(list) = map.get(&filled.chunk) else {
            return;
        };
        let filled = Arc::new(filled);
        for w in list {
            w.filled
                .lock()
                .expect("filled lock poisoned")
                .push(filled.clone());
        }
    }

    /// Wakes every waiting request (the migration stopped, the manifest
    /// arrived, chunks were made absent again).
    pub(crate) fn wake_all(&self) {
        for list in self.map().values() {
            for w in list {
                w.notify.notify_one();
            }
        }
    }
}

/// A request's registration (see [`Waiters::register`]).
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    waiters: &'a Waiters,
    chunks: Range<u64>,
    waiter: Arc<Waiter>,
}

impl Registration<'_> {
    /// Waits for a change of one of the registered chunks (at once if one
    /// happened since the last wait).
    pub(crate) async fn changed(&self) {
        self.waiter.notify.notified().await;
    }

    /// Copies bytes `offset..offset + buf.len()` of the disk into `buf` from
    /// the fills handed to this request, if they wrote every block of it
    /// (`block_bytes` gives a block's byte range); false (and `buf`
    /// unspecified) otherwise.
    pub(crate) fn copy_filled(
        &self,
        offset: u64,
        buf: &mut [u8],
        chunk_start: impl Fn(u64) -> u64,
        blocks: Range<u64>,
    ) -> bool {
        let filled = self.waiter.filled.lock().expect("filled lock poisoned");
        if filled.is_empty() {
            return false;
        }
        let end = offset + buf.len() as u64;
        for b in blocks {
            let Some(f) = filled
                .iter()
                .find(|f| f.runs.iter().any(|r| r.contains(&b)))
            else {
                return false;
            };
            // The part of block `b` inside the request.
            let (lo, hi) = block_span(b, offset, end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match &*f.data {
                Payload::Zero => dst.fill(0),
                Payload::Data { bytes, .. } => {
                    let base = chunk_start(f.chunk);
                    let src = bytes.get((lo - base) as usize..(hi - base) as usize);
                    match src {
                        Some(src) => dst.copy_from_slice(src),
                        None => return false,
                    }
                }
            }
        }
        true
    }
}

/// The bytes of block `b` (4 KiB blocks) inside `offset..end`.
fn block_span(b: u64, offset: u64, end: u64) -> (u64, u64) {
    let bs = u64::from(ferry_core::geometry::BLOCK_SIZE);
    ((b * bs).max(offset), ((b + 1) * bs).min(end))
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map();
        for c in self.chunks.clone() {
            if let Some(list) = map.get_mut(&c) {
                list.retain(|w| !Arc::ptr_eq(w, &self.waiter));
                if list.is_empty() {
                    map.remove(&c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn woken(r: &Registration<'_>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), r.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_change_of_one_chunk_wakes_only_the_requests_waiting_for_it() {
        let w = Waiters::default();
        let on_x = w.register(3..4);
        let on_y = w.register(7..9);
        w.wake(3..4);
        assert!(woken(&on_x).await);
        assert!(
            !woken(&on_y).await,
            "a change of chunk 3 woke a waiter on 7..9"
        );
        w.attach_filled(Filled {
            chunk: 8,
            runs: vec![],
            data: Arc::new(Payload::Zero),
        });
        assert!(!woken(&on_y).await, "attaching a fill wakes nobody");
        w.wake(8..9);
        assert!(woken(&on_y).await);
        assert!(!woken(&on_x).await, "a fill of chunk 8 woke a waiter on 3");
        // A change before the wait is kept, not lost.
        w.wake(7..8);
        assert!(woken(&on_y).await);
        // Every waiter's entries go when it does.
        drop(on_x);
        drop(on_y);
        assert!(w.map().is_empty());
    }

    #[test]
    fn a_read_is_answered_from_fills_only_if_they_wrote_every_block_of_it() {
        let w = Waiters::default();
        let r = w.register(0..2);
        // Chunks of 4 blocks: chunk 1 is blocks 4..8, bytes 16384..32768.
        let start = |c: u64| c * 16384;
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        w.attach_filled(Filled {
            chunk: 1,
            // Block 5 was the guest's: not filled.
            runs: vec![4..5, 6..8],
            data: Arc::new(Payload::Data {
                hash: [0; 32],
                bytes: data.clone(),
            }),
        });
        let mut buf = vec![0u8; 5000];
        // Blocks 6 and 7, from byte 100 of block 6.
        let at = 6 * 4096 + 100;
        assert!(r.copy_filled(at, &mut buf, start, 6..8));
        let lo = (at - 16384) as usize;
        assert_eq!(buf, data[lo..lo + 5000]);
        // Block 5 was not filled; block 2 (chunk 0) neither.
        assert!(!r.copy_filled(5 * 4096, &mut buf[..4096], start, 5..6));
        assert!(!r.copy_filled(2 * 4096, &mut buf[..4096], start, 2..3));
    }
}
