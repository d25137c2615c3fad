//! Fetched data that could not be written to the backing file: the
//! requests waiting for it fail at once, the background copier backs off.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::time::{Duration, Instant};

/// First wait of the background copier after fetched data could not be
/// written to the backing file (e.g. its filesystem is full).
const FILL_BACKOFF_START: Duration = Duration::from_millis(100);

/// Longest such wait: doubled after each failed retry up to this.
pub(crate) const FILL_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Fetched data that could not be written to the backing file (a full
/// filesystem, an I/O error): guest requests waiting for it fail with the
/// error at once instead of fetching again and again, and the background
/// copier backs off; logged once per episode, not per attempt.
#[derive(Default)]
pub(crate) struct FillTrouble {
    /// Failed fills so far: a sequence number.
    seq: u64,
    /// Chunks whose last fill failed, with that failure's number.
    failed: HashMap<u64, u64>,
    /// Since the first failure until a fill works again.
    episode: Option<Episode>,
}

/// A run of failed fills.
struct Episode {
    started: Instant,
    /// The number of its first failure.
    first: u64,
    failures: u64,
    /// The last failure: `raw_os_error`, kind and message.
    errno: Option<i32>,
    kind: io::ErrorKind,
    message: String,
    /// The background copier's next try, and the wait after that one.
    retry_at: Instant,
    delay: Duration,
}

impl FillTrouble {
    /// The number of the latest failure (0: none yet).
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Records that filling `chunk` failed with `e`; logs the first
    /// failure of an episode.
    pub(crate) fn failed(&mut self, chunk: u64, e: &io::Error, now: Instant) {
        self.seq += 1;
        self.failed.insert(chunk, self.seq);
        match &mut self.episode {
            None => {
                tracing::error!(
                    chunk,
                    error = %e,
                    "cannot write fetched data to the backing file; requests that need \
                     absent data fail with this error and the background copy retries \
                     with backoff (up to {} s) until it works again",
                    FILL_BACKOFF_MAX.as_secs()
                );
                self.episode = Some(Episode {
                    started: now,
                    first: self.seq,
                    failures: 1,
                    errno: e.raw_os_error(),
                    kind: e.kind(),
                    message: e.to_string(),
                    retry_at: now + FILL_BACKOFF_START,
                    delay: FILL_BACKOFF_START,
                });
            }
            Some(ep) => {
                ep.failures += 1;
                ep.errno = e.raw_os_error();
                ep.kind = e.kind();
                ep.message = e.to_string();
                // A retry that failed (not one more of a burst in flight
                // together): wait twice as long before the next.
                if now >= ep.retry_at {
                    ep.delay = (ep.delay * 2).min(FILL_BACKOFF_MAX);
                    ep.retry_at = now + ep.delay;
                }
                tracing::debug!(chunk, error = %e, failures = ep.failures, "fill failed again");
            }
        }
    }

    /// Fetched data of `chunk` was written by a fill that began when the
    /// failure number was `since`: the episode, if any, is over, unless it
    /// began after that fill did (a write already under way when the
    /// filesystem filled says nothing about space now).
    pub(crate) fn worked(&mut self, chunk: u64, since: u64) {
        self.failed.remove(&chunk);
        if self.episode.as_ref().is_some_and(|ep| ep.first > since) {
            return;
        }
        if let Some(ep) = self.episode.take() {
            tracing::info!(
                failures = ep.failures,
                seconds = ep.started.elapsed().as_secs(),
                "writing fetched data to the backing file works again"
            );
            self.failed.clear();
        }
    }

    /// The error for a request that began when the failure number was
    /// `since` and needs `chunks`: one of them failed to fill since.
    pub(crate) fn error_since(&self, since: u64, chunks: Range<u64>) -> Option<io::Error> {
        let ep = self.episode.as_ref()?;
        if self.seq == since
            || !chunks
                .into_iter()
                .any(|c| self.failed.get(&c).is_some_and(|n| *n > since))
        {
            return None;
        }
        Some(match ep.errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(ep.kind, ep.message.clone()),
        })
    }

    /// When the background copier may try again: `None` when all is well.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.episode.as_ref().map(|ep| ep.retry_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(28)
    }

    #[test]
    fn failed_fills_fail_the_requests_that_waited_for_them_and_back_off() {
        let mut t = FillTrouble::default();
        let t0 = Instant::now();
        let since = t.seq();
        assert!(t.retry_at().is_none());
        t.failed(5, &enospc(), t0);
        // A request that began before the failure and needs chunk 5 fails
        // with its error; one that needs other chunks, or began after it,
        // does not.
        let e = t.error_since(since, 4..6).expect("an error");
        assert_eq!(e.raw_os_error(), Some(28));
        assert!(t.error_since(since, 6..9).is_none());
        assert!(t.error_since(t.seq(), 4..6).is_none());
        // Failures of a burst in flight together do not lengthen the wait;
        // each failed retry doubles it, up to the cap.
        assert_eq!(t.retry_at(), Some(t0 + FILL_BACKOFF_START));
        t.failed(6, &enospc(), t0 + Duration::from_millis(10));
        assert_eq!(t.retry_at(), Some(t0 + FILL_BACKOFF_START));
        let mut waits = Vec::new();
        for c in 0..12 {
            let now = t.retry_at().expect("in an episode");
            t.failed(c, &enospc(), now);
            waits.push(t.retry_at().expect("in an episode") - now);
        }
        assert_eq!(waits[0], FILL_BACKOFF_START * 2);
        assert_eq!(waits[1], FILL_BACKOFF_START * 4);
        assert_eq!(*waits.last().expect("waits"), FILL_BACKOFF_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        // A fill that began before the episode and completed after it
        // does not end it; one that began during it does.
        t.worked(3, since);
        assert!(t.retry_at().is_some());
        let since = t.seq();
        t.worked(3, since);
        assert!(t.retry_at().is_none());
        assert!(t.error_since(since - 1, 0..20).is_none());
    }
}
