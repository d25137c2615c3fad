//! The pulled disk as a [`BlockDevice`]: the engine decides, this module
//! does the I/O (backing file, fetches from the source, syncs).

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::engine::{Arrival, FetchKind, Payload, ReadPlan, WritePlan};
use ferry_core::geometry::BLOCK_SIZE;
use ferry_core::Engine;
use ferry_device::BlockDevice;
use ferry_store::{Backing, StateFile};
use ferry_transport::{Client, Fetched, Priority, TransportError};
use tokio::sync::Notify;

/// Everything the frontends, the copier and the control socket share.
pub(crate) struct Shared {
    pub(crate) engine: Mutex<Engine>,
    /// Signalled whenever a chunk's state changes (fill done, fetch failed).
    pub(crate) changed: Notify,
    pub(crate) backing: Arc<Backing>,
    pub(crate) state: Arc<Mutex<StateFile>>,
    /// Serialises sync rounds.
    pub(crate) sync_lock: tokio::sync::Mutex<()>,
    /// Making freshly created files durable, until the first sync round has
    /// waited for it (see `open_or_create`).
    pub(crate) created: Mutex<Option<tokio::task::JoinHandle<io::Result<()>>>>,
    /// The connection to the source, once reached: a fresh pull has it
    /// before it serves; a resumed one serves first and gets it later
    /// (or never, for a copy complete and verified).
    pub(crate) source: tokio::sync::watch::Sender<Option<Client>>,
    /// Whether guest I/O waits for the source's acceptance (a fresh pull;
    /// see [`Shared::admitted`]).
    pub(crate) gated: bool,
    /// How long a guest request waits for absent data before it fails
    /// (`--absent-timeout-secs`; `None`: until the source answers).
    pub(crate) absent_timeout: Option<Duration>,
    /// Background requests currently in flight.
    pub(crate) bg_in_flight: AtomicU64,
    /// Bytes of the background requests currently in flight.
    pub(crate) bg_in_flight_bytes: AtomicU64,
    /// Fetched data that could not be written to the backing file.
    pub(crate) fill_trouble: Mutex<FillTrouble>,
}

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
    fn failed(&mut self, chunk: u64, e: &io::Error, now: Instant) {
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
    fn worked(&mut self, chunk: u64, since: u64) {
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

fn eio(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().expect("engine lock poisoned")
    }

    /// The connection to the source, if it has been reached.
    pub(crate) fn client_now(&self) -> Option<Client> {
        self.source.borrow().clone()
    }

    /// The connection to the source, once it has been reached.
    pub(crate) async fn client(&self) -> Client {
        let mut rx = self.source.subscribe();
        let client = match rx.wait_for(Option::is_some).await {
            Ok(c) => c.clone(),
            // The sender lives as long as `self`.
            Err(_) => None,
        };
        match client {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    /// Whether guest I/O may be answered now (see [`Shared::admitted`]).
    fn admitted_now(&self) -> bool {
        !self.gated
            || self
                .source
                .borrow()
                .as_ref()
                .is_none_or(|c| c.is_authenticated())
    }

    pub(crate) fn fill_trouble(&self) -> std::sync::MutexGuard<'_, FillTrouble> {
        self.fill_trouble
            .lock()
            .expect("fill trouble lock poisoned")
    }

    /// A request that began at failure number `since` and needs the
    /// blocks of `offset..offset + len` fails with the error of a fill it
    /// waited for, unless those blocks are present after all.
    fn fill_error(&self, since: u64, offset: u64, len: u64) -> Option<io::Error> {
        let chunks = self.lock().geometry().chunks_touching(offset, len);
        let e = self.fill_trouble().error_since(since, chunks)?;
        (!self.lock().readable(offset, len)).then_some(e)
    }

    /// Whether a read of `offset..offset + len` can be answered at once
    /// from the backing file: the source has accepted us (see
    /// [`Shared::admitted`]) and every block is present.
    fn readable_now(&self, offset: u64, len: u64) -> bool {
        self.admitted_now() && self.lock().readable(offset, len)
    }

    /// Holds a fresh pull's guest I/O until the source has accepted our
    /// certificate. Its disk is served as soon as the source's Welcome
    /// arrives (0.5-RTT), one round trip before that acceptance; no guest
    /// request is answered before it, so a refused pull has acknowledged
    /// nothing and can remove the files it created. Costs nothing
    /// afterwards, and nothing ever in a resumed pull: its disk holds data
    /// of its own, served without the source.
    async fn admitted(&self) -> io::Result<()> {
        if self.admitted_now() {
            return Ok(());
        }
        let Some(client) = self.client_now() else {
            return Ok(());
        };
        client
            .authenticated()
            .await
            .map_err(|e| eio(format!("the source did not accept us: {e}")))
    }

    /// The latest time a guest request that started now may wait for
    /// absent data (see `--absent-timeout-secs`).
    fn absent_deadline(&self) -> Option<tokio::time::Instant> {
        self.absent_timeout.map(|t| tokio::time::Instant::now() + t)
    }

    /// Waits for `notified` (a chunk's state changed), or fails the guest
    /// request for `what` once `deadline` has passed.
    async fn wait_absent(
        &self,
        notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        deadline: Option<tokio::time::Instant>,
        (what, offset, len): (&str, u64, u64),
    ) -> io::Result<()> {
        let Some(deadline) = deadline else {
            notified.await;
            return Ok(());
        };
        if tokio::time::timeout_at(deadline, notified).await.is_ok() {
            return Ok(());
        }
        let state = match self.client_now() {
            None => "not reached yet".to_string(),
            Some(c) => format!("{:?}", c.stats().state).to_lowercase(),
        };
        let msg = format!(
            "{what} of {len} bytes at {offset}: absent data not fetched within {:?} (--absent-timeout-secs); the source is {state}",
            self.absent_timeout.unwrap_or_default()
        );
        tracing::warn!("{msg}");
        Err(eio(msg))
    }

    /// Starts fetching `range` from the source in its own task: the fetch
    /// completes even if the guest request that asked for it goes away.
    pub(crate) fn spawn_fetch(self: &Arc<Self>, range: Range<u64>, kind: FetchKind) {
        let me = self.clone();
        tokio::spawn(async move { me.fetch(range, kind).await });
    }

    pub(crate) async fn fetch(self: Arc<Self>, range: Range<u64>, kind: FetchKind) {
        let prio = match kind {
            FetchKind::OnDemand => Priority::OnDemand,
            FetchKind::Background => Priority::Background,
        };
        let count = (range.end - range.start) as u32;
        let client = self.client().await;
        let t0 = std::time::Instant::now();
        match client.read_chunks(range.start, count, prio).await {
            Ok(chunks) => {
                let fetched = t0.elapsed();
                for (chunk, data) in range.clone().zip(chunks) {
                    self.arrived(chunk, data).await;
                }
                if kind == FetchKind::OnDemand {
                    tracing::debug!(
                        chunks = ?range,
                        fetch_ms = fetched.as_secs_f64() * 1e3,
                        fill_ms = (t0.elapsed() - fetched).as_secs_f64() * 1e3,
                        "on-demand fetch"
                    );
                }
            }
            Err(e) => {
                let mut engine = self.lock();
                engine.fetch_failed(range.clone());
                if matches!(e, TransportError::SourceChanged { .. }) {
                    engine.fail(format!(
                        "{e}; the source must not change after switchover; the destination's writes are kept"
                    ));
                } else {
                    tracing::warn!(chunks = ?range, error = %e, "fetch failed; will retry");
                }
            }
        }
        self.changed.notify_waiters();
    }

    async fn arrived(&self, chunk: u64, fetched: Fetched) {
        let payload = match &fetched {
            Fetched::Data { hash, bytes } => Payload::Data { bytes, hash: *hash },
            Fetched::Zero => Payload::Zero,
        };
        let arrival = self.lock().fetch_arrived(chunk, payload);
        match arrival {
            Arrival::Corrupt { chunk } => {
                tracing::warn!(
                    chunk,
                    "fetched chunk failed its hash check; dropped, will fetch again"
                );
            }
            Arrival::Duplicate { chunk } => {
                tracing::debug!(chunk, "second answer for a chunk already filled; dropped");
            }
            Arrival::Fill(plan) => {
                let geo = self.lock().geometry();
                let backing = self.backing.clone();
                let base = geo.chunk_bytes(chunk).start;
                let runs = plan.runs;
                // A zero chunk's hole punch works on a full filesystem:
                // only data written ends an episode of failed fills.
                let writes_data = matches!(fetched, Fetched::Data { .. }) && !runs.is_empty();
                let since = self.fill_trouble().seq();
                let res = tokio::task::spawn_blocking(move || -> io::Result<()> {
                    for r in runs {
                        let lo = geo.block_bytes(r.start).start;
                        let hi = geo.block_bytes(r.end - 1).end;
                        match &fetched {
                            Fetched::Data { bytes, .. } => backing
                                .write_at(&bytes[(lo - base) as usize..(hi - base) as usize], lo)?,
                            Fetched::Zero => backing.punch_hole(lo, hi - lo)?,
                        }
                    }
                    Ok(())
                })
                .await
                .unwrap_or_else(|e| Err(eio(format!("fill task failed: {e}"))));
                // Recorded before the engine lets waiting requests see the
                // chunk absent again.
                match &res {
                    Ok(()) if writes_data => self.fill_trouble().worked(chunk, since),
                    Ok(()) => {}
                    Err(e) => self.fill_trouble().failed(chunk, e, Instant::now()),
                }
                let mut engine = self.lock();
                match res {
                    Ok(()) => engine.fill_done(chunk),
                    Err(_) => engine.fill_failed(chunk),
                }
            }
        }
    }

    /// One sync round: backing file first, then the present bits
    /// (invariants 1 and 2).
    pub(crate) async fn sync(&self) -> io::Result<()> {
        let _round = self.sync_lock.lock().await;
        // Nothing is durable before the files that hold it are.
        let created = self.created.lock().expect("created lock").take();
        if let Some(task) = created {
            if let Err(e) = task.await.unwrap_or_else(|e| Err(eio(e.to_string()))) {
                // A failed fsync cannot be retried into success: stop.
                let msg = format!("cannot make the new disk and state files durable: {e}");
                tracing::error!("{msg}");
                self.lock().fail(msg.clone());
                return Err(eio(msg));
            }
        }
        let batch = self.lock().begin_sync();
        if batch.is_empty() {
            // Guest writes that were already synced, or none: still make
            // sure completed writes are durable.
            let b = self.backing.clone();
            return tokio::task::spawn_blocking(move || b.sync())
                .await
                .unwrap_or_else(|e| Err(eio(e.to_string())));
        }
        let backing = self.backing.clone();
        let state = self.state.clone();
        let t0 = std::time::Instant::now();
        let (batch, res) = tokio::task::spawn_blocking(move || {
            let r = backing.sync().and_then(|()| {
                state
                    .lock()
                    .expect("state lock")
                    .persist(&batch)
                    .map_err(|e| eio(format!("{e:#}")))
            });
            (batch, r)
        })
        .await
        .map_err(|e| eio(e.to_string()))?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "sync round");
        let mut engine = self.lock();
        match res {
            Ok(()) => {
                engine.sync_done(batch);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "sync failed");
                engine.sync_failed(batch);
                Err(e)
            }
        }
    }

    /// Marks whole blocks of `offset..offset+len` as written by `op`
    /// (punching a hole for trim/zeroes), after the engine allows it.
    async fn write_blocks<F>(self: &Arc<Self>, offset: u64, len: u64, op: F) -> io::Result<()>
    where
        F: FnOnce(&Backing) -> io::Result<()> + Send + 'static,
    {
        let mut op = Some(op);
        let deadline = self.absent_deadline();
        let since = self.fill_trouble().seq();
        loop {
            if let Some(e) = self.fill_error(since, offset, len) {
                return Err(e);
            }
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let plan = self.lock().plan_write(offset, len);
            match plan {
                WritePlan::Ready(blocks) => {
                    let backing = self.backing.clone();
                    let state = self.state.clone();
                    let op = op.take().expect("op used once");
                    let written = blocks.clone();
                    // Data first, then its written bit (both reach the page
                    // cache before the guest is told): a restart after a
                    // crash of this process keeps the write (see
                    // ferry_store::state).
                    let res = tokio::task::spawn_blocking(move || {
                        op(&backing)?;
                        state
                            .lock()
                            .expect("state lock")
                            .mark_written(written)
                            .map_err(|e| eio(format!("{e:#}")))
                    })
                    .await
                    .unwrap_or_else(|e| Err(eio(e.to_string())));
                    // On error (e.g. a full filesystem) the blocks this
                    // write made present hold no known data: they are
                    // absent again and fetched anew; the others keep what
                    // the file holds, and the guest is told.
                    match &res {
                        Ok(()) => self.lock().write_done(blocks),
                        Err(_) => self.lock().write_failed(blocks),
                    }
                    self.changed.notify_waiters();
                    return res;
                }
                WritePlan::Wait { start } => {
                    for r in start {
                        self.spawn_fetch(r, FetchKind::OnDemand);
                    }
                    self.wait_absent(notified, deadline, ("write", offset, len))
                        .await?;
                }
                WritePlan::Failed(e) => return Err(eio(e)),
            }
        }
    }
}

/// The pulled disk.
#[derive(Clone)]
pub(crate) struct PullDevice(pub(crate) Arc<Shared>);

impl BlockDevice for PullDevice {
    fn size(&self) -> u64 {
        self.0.backing.size()
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let s = &self.0;
        // Present blocks are never written by fills, so once every block
        // is present the read can run outside the engine lock. Anything
        // else (fetches, waits) goes through the async path.
        if s.readable_now(offset, buf.len() as u64) {
            Some(s.backing.read_at(buf, offset))
        } else {
            None
        }
    }

    fn copy_now(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        let s = &self.0;
        // As `read_now`: present blocks are never written by fills. A guest
        // write racing this read may change the bytes under the copy, which
        // the block layer allows for overlapping requests in flight.
        if s.readable_now(offset, len as u64) {
            s.backing.copy_to(offset, len, out, out_offset)
        } else {
            None
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let s = &self.0;
        let deadline = s.absent_deadline();
        let since = s.fill_trouble().seq();
        loop {
            // Data this read waited for could not be written (e.g. a full
            // filesystem): fail now with that error rather than fetch it
            // again and again.
            if let Some(e) = s.fill_error(since, offset, u64::from(len)) {
                return Err(e);
            }
            let notified = s.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let plan = s.lock().plan_read(offset, u64::from(len));
            match plan {
                ReadPlan::Ready => {
                    // Fetches go out at once (the source answers them only
                    // once it has accepted us); only the answer waits.
                    s.admitted().await?;
                    let backing = s.backing.clone();
                    return tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        backing.read_at(&mut buf, offset).map(|()| buf)
                    })
                    .await
                    .unwrap_or_else(|e| Err(eio(e.to_string())));
                }
                ReadPlan::Wait { start } => {
                    for r in start {
                        s.spawn_fetch(r, FetchKind::OnDemand);
                    }
                    s.wait_absent(notified, deadline, ("read", offset, u64::from(len)))
                        .await?;
                }
                ReadPlan::Failed(e) => return Err(eio(e)),
            }
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.0.admitted().await?;
        let len = data.len() as u64;
        self.0
            .write_blocks(offset, len, move |b| b.write_at(&data, offset))
            .await?;
        if fua {
            self.0.sync().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.0.admitted().await?;
        self.0.sync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.admitted().await?;
        // Only whole blocks are discarded; partial ones are left alone
        // (discard is advisory).
        let bs = u64::from(BLOCK_SIZE);
        let start = offset.div_ceil(bs) * bs;
        let end = ((offset + len) / bs * bs).max(start);
        if end > start {
            self.0
                .write_blocks(start, end - start, move |b| {
                    b.punch_hole(start, end - start)
                })
                .await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.0.admitted().await?;
        let bs = u64::from(BLOCK_SIZE);
        let end_all = offset + len;
        let start = offset.div_ceil(bs) * bs;
        let end = (end_all / bs * bs).max(start);
        if start >= end_all || end <= start {
            // Inside one block: a plain write of zeros.
            return self.write(offset, vec![0; len as usize], fua).await;
        }
        if offset < start {
            self.write(offset, vec![0; (start - offset) as usize], false)
                .await?;
        }
        self.0
            .write_blocks(start, end - start, move |b| {
                b.punch_hole(start, end - start)
            })
            .await?;
        if end < end_all {
            self.write(end, vec![0; (end_all - end) as usize], false)
                .await?;
        }
        if fua {
            self.0.sync().await?;
        }
        Ok(())
    }
}

/// Counts bytes for the rate estimate.
#[derive(Default)]
pub(crate) struct RateMeter {
    samples: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
    pub(crate) last_rate: AtomicU64,
}

impl RateMeter {
    /// Adds a sample of a monotone byte counter; returns bytes per second
    /// over the last ~5 s.
    pub(crate) fn sample(&self, now: std::time::Instant, bytes: u64) -> u64 {
        let mut s = self.samples.lock().expect("rate lock");
        s.push_back((now, bytes));
        while s.len() > 2 && now.duration_since(s[0].0).as_secs_f64() > 5.0 {
            s.pop_front();
        }
        let (t0, b0) = s[0];
        let dt = now.duration_since(t0).as_secs_f64();
        let r = if dt > 0.2 {
            (bytes.saturating_sub(b0) as f64 / dt) as u64
        } else {
            0
        };
        self.last_rate.store(r, Ordering::Relaxed);
        r
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
