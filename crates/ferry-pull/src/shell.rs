//! The I/O shell: the pulled disk as a [`BlockDevice`]. The engine
//! decides, this module does the I/O (backing file, fetches from the
//! source through a [`Fetcher`], syncs).

use std::cell::Cell;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::engine::{
    Arrival, Failure, FetchKind, FetchRequest, Payload, ReadPlan, Wake, WritePlan,
};
use ferry_core::geometry::BLOCK_SIZE;
use ferry_core::{Engine, Geometry};
use ferry_device::BlockDevice;
use ferry_store::{Backing, StateFile};

use crate::disk::{BlockMap, Disk};
use tokio::sync::Notify;

use crate::fetcher::{FetchError, Fetcher};
use crate::fill_trouble::FillTrouble;
use crate::telemetry::Telemetry;
use crate::waiters::{Filled, Registration, Waiters};

/// How the shell treats guest requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShellOptions {
    /// Whether guest I/O waits for the source's acceptance (a fresh pull;
    /// see [`Shell::admitted`]).
    pub gated: bool,
    /// How long a guest request waits for absent data before it fails
    /// (`--absent-timeout-secs`; `None`: until the source answers).
    pub absent_timeout: Option<Duration>,
    /// A pre-copy not switched over yet: the copier does not verify a
    /// complete copy before the switchover (the source's manifest is not
    /// final, and a live source may not be able to complete it); set
    /// until changes recorded as switched are applied
    /// ([`Shell::apply_changes`]).
    pub awaiting_switchover: bool,
}

/// Everything the frontends, the copier and the control socket share.
pub struct Shell<F: Fetcher, D: Disk = Backing, M: BlockMap = StateFile> {
    pub(crate) engine: Mutex<Engine>,
    /// The disk's geometry (the engine's; it never changes).
    geo: Geometry,
    /// Signalled whenever a chunk's state changes (fill done, fetch
    /// failed), a sync round ends or a background fetch: the copier's
    /// wake-up.
    pub(crate) changed: Notify,
    /// Guest requests waiting for chunks, woken per chunk.
    waiters: Waiters,
    /// Reads of the backing file made to answer guest reads that waited
    /// for absent data (see [`Shell::backing_reads`]).
    backing_reads: AtomicU64,
    pub(crate) backing: Arc<D>,
    pub(crate) state: Arc<Mutex<M>>,
    /// Serialises sync rounds.
    pub(crate) sync_lock: tokio::sync::Mutex<()>,
    /// Making freshly created files durable, until the first sync round has
    /// waited for it (see `open_or_create`).
    pub(crate) created: Mutex<Option<tokio::task::JoinHandle<io::Result<()>>>>,
    /// The connection to the source, once reached: a fresh pull has it
    /// before it serves; a resumed one serves first and gets it later
    /// (or never, for a copy complete and verified).
    pub(crate) source: tokio::sync::watch::Sender<Option<F>>,
    /// Whether guest I/O waits for the source's acceptance (a fresh pull;
    /// see [`Shell::admitted`]).
    pub(crate) gated: bool,
    /// See [`ShellOptions::awaiting_switchover`].
    pub(crate) awaiting_switchover: std::sync::atomic::AtomicBool,
    /// How long a guest request waits for absent data before it fails
    /// (`--absent-timeout-secs`; `None`: until the source answers).
    pub(crate) absent_timeout: Option<Duration>,
    /// Background requests currently in flight.
    pub(crate) bg_in_flight: AtomicU64,
    /// Bytes of the background requests currently in flight.
    pub(crate) bg_in_flight_bytes: AtomicU64,
    /// Fetched data that could not be written to the backing file.
    pub(crate) fill_trouble: Mutex<FillTrouble>,
    /// On-demand fetch times, guest stalls and writes (`--metrics`).
    telemetry: Telemetry,
    /// Where chunks have local copies (`--index`), once matched.
    pub(crate) local: std::sync::OnceLock<Arc<crate::local::LocalMatches>>,
}

fn eio(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl<F: Fetcher, D: Disk, M: BlockMap> Shell<F, D, M> {
    /// A shell over `engine`, the `backing` file and its `state`, with
    /// `source` if it has been reached already. `created`: the task making
    /// freshly created files' directory entries durable (see
    /// [`crate::open::creation_sync`]); the first sync round waits for it.
    pub fn new(
        engine: Engine,
        backing: D,
        state: M,
        created: Option<tokio::task::JoinHandle<io::Result<()>>>,
        source: Option<F>,
        options: ShellOptions,
    ) -> Arc<Self> {
        Arc::new(Shell {
            geo: engine.geometry(),
            engine: Mutex::new(engine),
            changed: Notify::new(),
            waiters: Waiters::default(),
            backing_reads: AtomicU64::new(0),
            backing: Arc::new(backing),
            state: Arc::new(Mutex::new(state)),
            sync_lock: tokio::sync::Mutex::new(()),
            created: Mutex::new(created),
            source: tokio::sync::watch::Sender::new(source),
            gated: options.gated,
            awaiting_switchover: std::sync::atomic::AtomicBool::new(options.awaiting_switchover),
            absent_timeout: options.absent_timeout,
            bg_in_flight: AtomicU64::new(0),
            bg_in_flight_bytes: AtomicU64::new(0),
            fill_trouble: Mutex::default(),
            telemetry: Telemetry::default(),
            local: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().expect("engine lock poisoned")
    }

    /// The source has been reached (a resumed pull reaches it after it
    /// began serving): fetches may go out.
    pub fn set_source(&self, source: F) {
        self.source.send_replace(Some(source));
        self.changed.notify_waiters();
    }

    /// Stops the migration with `reason` (e.g. the source changed); guest
    /// requests that need absent data fail from now on.
    pub fn fail(&self, reason: Failure) {
        let mut engine = self.lock();
        engine.fail(reason);
        self.wake(engine);
        self.changed.notify_waiters();
    }

    /// The source's manifest arrived (or could not be had: `Err` with
    /// why): zero chunks become present, the background copy can start.
    pub(crate) fn set_manifest(&self, manifest: Result<Arc<ferry_core::Manifest>, Failure>) {
        let mut engine = self.lock();
        match manifest {
            Ok(m) => engine.handle_manifest(m),
            Err(e) => engine.fail(e),
        }
        self.wake(engine);
        self.changed.notify_waiters();
    }

    /// Releases the engine lock, then wakes the guest requests the engine
    /// names ([`Engine::poll_wake`]).
    pub(crate) fn wake(&self, mut engine: std::sync::MutexGuard<'_, Engine>) {
        let mut wakes = Vec::new();
        while let Some(w) = engine.poll_wake() {
            wakes.push(w);
        }
        drop(engine);
        for w in wakes {
            match w {
                Wake::All => self.waiters.wake_all(),
                Wake::Chunks(chunks) => self.waiters.wake(chunks),
            }
        }
    }

    /// The fetches the engine asks for ([`Engine::poll_fetch`]), each in
    /// its own task.
    fn start_fetches(self: &Arc<Self>, engine: &mut Engine) {
        while let Some(FetchRequest { chunks, kind }) = engine.poll_fetch() {
            self.spawn_fetch(chunks, kind);
        }
        while let Some(chunk) = engine.poll_fill_local() {
            tokio::spawn(tracing::Instrument::in_current_span(
                self.clone().fill_local(chunk),
            ));
        }
    }

    /// How many times a guest read that waited for absent data was
    /// answered by reading the backing file (0 while every such read is
    /// answered from the data fetched for it).
    pub fn backing_reads(&self) -> u64 {
        self.backing_reads.load(Ordering::Relaxed)
    }

    /// The migration's phase.
    pub fn engine_phase(&self) -> ferry_core::Phase {
        self.lock().phase()
    }

    /// The chunks to verify against the source, with what its manifest
    /// says of them (see [`Engine::verifiable_chunks`]).
    pub fn verifiable_chunks(&self) -> Vec<(u64, ferry_core::ChunkKind)> {
        self.lock().verifiable_chunks().collect()
    }

    /// The engine's counters.
    pub fn engine_counters(&self) -> ferry_core::engine::Counters {
        self.lock().counters().clone()
    }

    /// On-demand fetch times, guest stalls and writes so far.
    pub fn telemetry(&self) -> crate::TelemetrySnapshot {
        self.telemetry.snapshot()
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.backing.size()
    }

    /// The disk's geometry.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The disk's blocks.
    pub(crate) fn geo_blocks(&self) -> u64 {
        self.geo.blocks()
    }

    pub(crate) fn geo_chunks(&self) -> u64 {
        self.geo.chunks()
    }

    /// The connection to the source, if it has been reached.
    pub fn client_now(&self) -> Option<F> {
        self.source.borrow().clone()
    }

    /// The connection to the source, once it has been reached.
    pub(crate) async fn client(&self) -> F {
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

    /// Whether guest I/O may be answered now (see [`Shell::admitted`]).
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
        let chunks = self.geo.chunks_touching(offset, len);
        let e = self.fill_trouble().error_since(since, chunks)?;
        (!self.lock().readable(offset, len)).then_some(e)
    }

    /// Whether a read of `offset..offset + len` can be answered at once
    /// from the backing file: the source has accepted us (see
    /// [`Shell::admitted`]) and every block is present.
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

    /// Waits for a change of a chunk `waiting` is registered for, or
    /// fails the guest request for `what` once `deadline` has passed.
    async fn wait_absent(
        &self,
        waiting: &Registration<'_>,
        deadline: Option<tokio::time::Instant>,
        (what, offset, len): (&str, u64, u64),
    ) -> io::Result<()> {
        let notified = waiting.changed();
        let Some(deadline) = deadline else {
            notified.await;
            return Ok(());
        };
        if tokio::time::timeout_at(deadline, notified).await.is_ok() {
            return Ok(());
        }
        let state = match self.client_now() {
            None => "not reached yet".to_string(),
            Some(c) => match c.stats().state {
                crate::ConnState::Connected => "connected",
                crate::ConnState::Reconnecting => "reconnecting",
            }
            .to_string(),
        };
        let msg = format!(
            "{what} of {len} bytes at {offset}: absent data not fetched within {} s (--absent-timeout-secs); the source is {state}",
            self.absent_timeout.unwrap_or_default().as_secs_f64()
        );
        tracing::warn!("{msg}");
        Err(eio(msg))
    }

    /// Starts fetching `range` from the source in its own task: the fetch
    /// completes even if the guest request that asked for it goes away.
    pub(crate) fn spawn_fetch(self: &Arc<Self>, range: Range<u64>, kind: FetchKind) {
        let me = self.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            me.fetch(range, kind).await
        }));
    }

    pub(crate) async fn fetch(self: Arc<Self>, range: Range<u64>, kind: FetchKind) {
        let count = (range.end - range.start) as u32;
        // Before the request leaves: an answer to it for a chunk a live
        // source reports written after this may hold the old bytes.
        let issued = self.lock().change_seq();
        let client = self.client().await;
        let t0 = std::time::Instant::now();
        match client.fetch(range.start, count, kind).await {
            Ok(chunks) => {
                let fetched = t0.elapsed();
                if kind == FetchKind::OnDemand {
                    self.telemetry.on_demand_fetched(fetched);
                }
                for (chunk, data) in range.clone().zip(chunks) {
                    self.arrived(chunk, data, issued).await;
                }
                if kind == FetchKind::OnDemand {
                    tracing::debug!(
                        first_chunk = range.start,
                        chunks = range.end - range.start,
                        fetch_ms = fetched.as_secs_f64() * 1e3,
                        fill_ms = (t0.elapsed() - fetched).as_secs_f64() * 1e3,
                        "on-demand fetch"
                    );
                }
            }
            Err(e) => {
                let mut engine = self.lock();
                engine.handle_fetch_failed_at(range.clone(), issued);
                if matches!(e, FetchError::SourceChanged(_)) {
                    engine.fail(Failure::SourceChanged(e.to_string()));
                } else {
                    tracing::warn!(
                        first_chunk = range.start,
                        chunks = range.end - range.start,
                        error = %e,
                        "fetch failed; will retry"
                    );
                }
                self.wake(engine);
            }
        }
        self.changed.notify_waiters();
    }

    pub(crate) async fn arrived(&self, chunk: u64, fetched: Payload, issued: u64) {
        // A corrupt answer makes the chunk absent again (or, after too
        // many, stops the migration): its requests plan anew.
        let arrival = {
            let mut engine = self.lock();
            let arrival = engine.handle_fetched_at(chunk, &fetched, issued);
            self.wake(engine);
            arrival
        };
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
                let geo = self.geo;
                let backing = self.backing.clone();
                let base = geo.chunk_bytes(chunk).start;
                let runs = plan.runs;
                let fetched = Arc::new(fetched);
                let (data, filled_runs) = (fetched.clone(), runs.clone());
                // A zero chunk's hole punch works on a full filesystem:
                // only data written ends an episode of failed fills.
                let writes_data = matches!(*fetched, Payload::Data { .. }) && !runs.is_empty();
                let since = self.fill_trouble().seq();
                let res = D::offload(move || -> io::Result<()> {
                    for r in runs {
                        let lo = geo.block_bytes(r.start).start;
                        let hi = geo.block_bytes(r.end - 1).end;
                        match &*fetched {
                            Payload::Data { bytes, .. } => backing
                                .write_at(&bytes[(lo - base) as usize..(hi - base) as usize], lo)?,
                            Payload::Zero => backing.punch_hole(lo, hi - lo)?,
                        }
                    }
                    Ok(())
                })
                .await;
                // Recorded before the engine lets waiting requests see the
                // chunk absent again.
                match &res {
                    Ok(()) if writes_data => self.fill_trouble().worked(chunk, since),
                    Ok(()) => {}
                    Err(e) => self.fill_trouble().failed(chunk, e, Instant::now()),
                }
                // The requests waiting for the chunk get what was written:
                // they answer from it instead of reading it back.
                if res.is_ok() {
                    self.waiters.attach_filled(Filled {
                        chunk,
                        runs: filled_runs,
                        data,
                    });
                }
                {
                    let mut engine = self.lock();
                    match res {
                        Ok(()) => engine.handle_fill_done(chunk),
                        Err(_) => engine.handle_fill_failed(chunk),
                    }
                    self.wake(engine);
                }
            }
        }
    }

    /// One sync round: backing file first, then the present bits
    /// (invariants 1 and 2).
    pub async fn sync(&self) -> io::Result<()> {
        let _round = self.sync_lock.lock().await;
        // Nothing is durable before the files that hold it are.
        let created = self.created.lock().expect("created lock").take();
        if let Some(task) = created {
            if let Err(e) = task.await.unwrap_or_else(|e| Err(eio(e.to_string()))) {
                // A failed fsync cannot be retried into success: stop.
                let failure = Failure::FilesNotDurable(e.to_string());
                let msg = failure.to_string();
                tracing::error!("{msg}");
                self.fail(failure);
                return Err(eio(msg));
            }
        }
        let batch = self.lock().begin_sync();
        if batch.is_empty() {
            // Guest writes that were already synced, or none: still make
            // sure completed writes are durable.
            let b = self.backing.clone();
            return D::offload(move || b.sync()).await;
        }
        let backing = self.backing.clone();
        let state = self.state.clone();
        let t0 = std::time::Instant::now();
        let (batch, res) = D::offload(move || {
            let r = backing
                .sync()
                .and_then(|()| state.lock().expect("state lock").persist(&batch));
            Ok((batch, r))
        })
        .await?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "sync round");
        let mut engine = self.lock();
        match res {
            Ok(()) => {
                engine.handle_sync_done(batch);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "sync failed");
                engine.handle_sync_failed(batch);
                Err(e)
            }
        }
    }

    /// Marks whole blocks of `offset..offset+len` as written by `op`
    /// (punching a hole for trim/zeroes), after the engine allows it.
    async fn write_blocks<Op>(self: &Arc<Self>, offset: u64, len: u64, op: Op) -> io::Result<()>
    where
        Op: FnOnce(&D) -> io::Result<()> + Send + 'static,
    {
        let mut op = Some(op);
        let mut stall = self.telemetry.stall();
        let deadline = self.absent_deadline();
        let since = self.fill_trouble().seq();
        let chunks = self.geo.chunks_touching(offset, len);
        let waiting = self.waiters.register(chunks.clone());
        loop {
            if let Some(e) = self.fill_error(since, offset, len) {
                return Err(e);
            }
            let plan = {
                let mut engine = self.lock();
                let plan = engine.plan_write(offset, len);
                self.start_fetches(&mut engine);
                plan
            };
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
                    let res = D::offload(move || {
                        op(&backing)?;
                        state.lock().expect("state lock").mark_written(written)
                    })
                    .await;
                    // On error (e.g. a full filesystem) the blocks this
                    // write made present hold no known data: they are
                    // absent again and fetched anew; the others keep what
                    // the file holds, and the guest is told.
                    let mut engine = self.lock();
                    match &res {
                        Ok(()) => engine.handle_write_done(blocks),
                        Err(_) => engine.handle_write_failed(blocks),
                    }
                    self.wake(engine);
                    self.changed.notify_waiters();
                    if res.is_ok() {
                        self.telemetry.guest_wrote(len);
                    }
                    return res;
                }
                WritePlan::Wait => {
                    stall.waiting();
                    self.wait_absent(&waiting, deadline, ("write", offset, len))
                        .await?;
                }
                WritePlan::Failed(e) => return Err(eio(e.to_string())),
            }
        }
    }
}

/// The pulled disk, as the frontends serve it.
pub struct PullDevice<F: Fetcher, D: Disk = Backing, M: BlockMap = StateFile>(
    pub Arc<Shell<F, D, M>>,
);

thread_local! {
    /// The request [`BlockDevice::copy_now`] or
    /// [`BlockDevice::present_file`] last found not ready on this thread
    /// (see [`PullDevice::key`]). A frontend tries `copy_now` and
    /// `read_now` at once after a `None`; for the same request they are
    /// answered `None` without asking the engine again (`read_now` clears
    /// the mark), so a miss takes the engine lock once on the fast path,
    /// not twice. (`None` is always a right answer: the async path plans
    /// anew.)
    static NOT_READY: Cell<Option<(usize, u64, usize)>> = const { Cell::new(None) };
}

impl<F: Fetcher, D: Disk, M: BlockMap> PullDevice<F, D, M> {
    /// A request of this device: the shell's address, offset, length.
    fn key(&self, offset: u64, len: usize) -> (usize, u64, usize) {
        (Arc::as_ptr(&self.0) as usize, offset, len)
    }
}

impl<F: Fetcher, D: Disk, M: BlockMap> Clone for PullDevice<F, D, M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<F: Fetcher, D: Disk, M: BlockMap> BlockDevice for PullDevice<F, D, M> {
    fn size(&self) -> u64 {
        self.0.backing.size()
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let s = &self.0;
        if NOT_READY.with(Cell::take) == Some(self.key(offset, buf.len())) {
            return None;
        }
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
        // Not ready a moment ago (`present_file`): left for `read_now`,
        // which clears the mark.
        if NOT_READY.with(Cell::get) == Some(self.key(offset, len)) {
            return None;
        }
        // As `read_now`: present blocks are never written by fills. A guest
        // write racing this read may change the bytes under the copy, which
        // the block layer allows for overlapping requests in flight.
        if s.readable_now(offset, len as u64) {
            s.backing.copy_to(offset, len, out, out_offset)
        } else {
            NOT_READY.with(|m| m.set(Some(self.key(offset, len))));
            None
        }
    }

    fn present_file(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        let s = &self.0;
        // As `read_now`: present blocks are never written by fills.
        if s.readable_now(offset, len) {
            s.backing.file()
        } else {
            let n = usize::try_from(len).ok()?;
            NOT_READY.with(|m| m.set(Some(self.key(offset, n))));
            None
        }
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let s = &self.0;
        let mut stall = s.telemetry.stall();
        let deadline = s.absent_deadline();
        let since = s.fill_trouble().seq();
        let waiting = s
            .waiters
            .register(s.geo.chunks_touching(offset, u64::from(len)));
        loop {
            // Data this read waited for could not be written (e.g. a full
            // filesystem): fail now with that error rather than fetch it
            // again and again.
            if let Some(e) = s.fill_error(since, offset, u64::from(len)) {
                return Err(e);
            }
            let plan = {
                let mut engine = s.lock();
                let plan = engine.plan_read(offset, u64::from(len));
                s.start_fetches(&mut engine);
                plan
            };
            match plan {
                ReadPlan::Ready => {
                    // Fetches go out at once (the source answers them only
                    // once it has accepted us); only the answer waits.
                    s.admitted().await?;
                    // Blocks filled for this read while it waited: from
                    // the fetched data. A guest write to them since is a
                    // request in flight with this read, so the read may
                    // return the data before it, as from the file.
                    let mut buf = vec![0u8; len as usize];
                    let geo = s.geo;
                    if waiting.copy_filled(
                        offset,
                        &mut buf,
                        |c| geo.chunk_bytes(c).start,
                        geo.blocks_touching(offset, u64::from(len)),
                    ) {
                        return Ok(buf);
                    }
                    s.backing_reads.fetch_add(1, Ordering::Relaxed);
                    let backing = s.backing.clone();
                    return D::offload(move || backing.read_at(&mut buf, offset).map(|()| buf))
                        .await;
                }
                ReadPlan::Wait => {
                    stall.waiting();
                    s.wait_absent(&waiting, deadline, ("read", offset, u64::from(len)))
                        .await?;
                }
                ReadPlan::Failed(e) => return Err(eio(e.to_string())),
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
