//! Deterministic simulation of a migration, run through the production
//! shell: a simulated source and link (latency, loss, corruption) behind
//! the [`Fetcher`] trait, a backing disk with a volatile cache and a block
//! map behind [`Disk`] and [`BlockMap`], a guest issuing reads, writes and
//! flushes through [`PullDevice`], the production background copier,
//! syncer and verification, and crashes at chosen points. Everything runs
//! on tokio's single-threaded runtime with its clock paused (time advances
//! only when every task waits), and the disk's blocking work runs inline,
//! so a seed replays the same run. An oracle checks the design invariants
//! 1–5 and 7.
//!
//! The scenario tests at the end drive the sans-IO [`Engine`] directly, one
//! rule at a time.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitvec::prelude::*;
use ferry_core::engine::{
    Arrival, Engine, FetchKind, FetchRequest, FillPlan, Payload, ReadPlan, WritePlan,
};
use ferry_core::geometry::BLOCK_SIZE;
use ferry_core::{ChunkKind, Geometry, Manifest, Phase, SyncBatch};
use ferry_device::BlockDevice;
use ferry_pull::{
    copier, status, BlockMap, ConnState, CopierSettings, Disk, FetchError, Fetcher, LinkStats,
    PullDevice, Report, Shell, ShellOptions, Verification, Window,
};

const BS: usize = BLOCK_SIZE as usize;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A source disk of `chunks` chunks of `chunk_size` and `tail` more bytes:
/// 30% zero chunks, some zero blocks inside data chunks. Its bytes and
/// manifest.
fn source_disk(rng: &mut Rng, chunk_size: u32, chunks: u64, tail: u64) -> (Vec<u8>, Manifest) {
    let size = chunks * u64::from(chunk_size) + tail;
    let geo = Geometry::new(size, chunk_size);
    let mut source = vec![0u8; size as usize];
    let mut kinds = Vec::new();
    for c in 0..geo.chunks() {
        let r = geo.chunk_bytes(c);
        if !rng.chance(300) {
            for b in r.clone().step_by(BS) {
                // Some all-zero blocks inside data chunks too.
                if rng.chance(150) {
                    continue;
                }
                let end = (b + BS as u64).min(r.end);
                for i in b..end {
                    source[i as usize] = (rng.next() >> 24) as u8 | 1;
                }
            }
        }
        let bytes = &source[r.start as usize..r.end as usize];
        kinds.push(if bytes.iter().all(|b| *b == 0) {
            ChunkKind::Zero
        } else {
            ChunkKind::Data(*blake3::hash(bytes).as_bytes())
        });
    }
    (source, Manifest::new(geo, kinds))
}

/// Everything that outlives a crash of the pull: the source and the link,
/// the disk (its volatile cache and what is durable), the block map, and
/// the oracle.
struct World {
    rng: Rng,
    source: Vec<u8>,
    manifest: Arc<Manifest>,
    /// The backing file: writes land in `cache`; a sync makes them
    /// `durable`; a crash throws the cache away.
    cache: Vec<u8>,
    durable: Vec<u8>,
    /// The persisted state file: present bits per block, guest bits per
    /// chunk (durable when set).
    present: BitVec,
    guest: BitVec,
    /// What the guest must read now.
    model: Vec<u8>,
    /// Per block: acceptable contents after a crash (the value at the last
    /// flush, then every value written since).
    acceptable: Vec<Vec<Vec<u8>>>,
    latency_ms: u64,
    loss_per_mille: u64,
    corrupt_per_mille: u64,
    /// The longest the manifest takes to arrive after a (re)start, ms.
    manifest_delay_ms: u64,
    /// When this run's manifest arrived (tokio's paused clock).
    manifest_at: Option<tokio::time::Instant>,
    bytes_requested: u64,
    zero_chunk_requests: u64,
    write_stamp: u32,
}

type Shared = Arc<Mutex<World>>;

fn world(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().expect("world lock")
}

/// The simulated source over the simulated link.
#[derive(Clone)]
struct SimSource(Shared);

impl Fetcher for SimSource {
    async fn fetch(
        &self,
        first: u64,
        count: u32,
        _kind: FetchKind,
    ) -> Result<Vec<Payload>, FetchError> {
        let (delay, answer) = {
            let mut w = world(&self.0);
            let geo = w.manifest.geometry();
            // A zero chunk asked for after the manifest arrived crossed the
            // wire for nothing (invariant 7). (A request planned before it
            // arrived goes out at the same instant of the paused clock.)
            let late = w
                .manifest_at
                .is_some_and(|t| tokio::time::Instant::now() > t);
            let mut data = Vec::new();
            for c in first..first + u64::from(count) {
                let hash = match w.manifest.chunk(c) {
                    ChunkKind::Zero => {
                        if late {
                            w.zero_chunk_requests += 1;
                        }
                        data.push(Payload::Zero);
                        continue;
                    }
                    ChunkKind::Data(h) => h,
                    ChunkKind::Unhashed => panic!("the simulated source's manifest is complete"),
                };
                let r = geo.chunk_bytes(c);
                w.bytes_requested += r.end - r.start;
                let mut d = w.source[r.start as usize..r.end as usize].to_vec();
                let corrupt = w.corrupt_per_mille;
                if w.rng.chance(corrupt) {
                    let i = w.rng.below(d.len() as u64) as usize;
                    d[i] ^= 0x40;
                }
                data.push(Payload::Data { hash, bytes: d });
            }
            let loss = w.loss_per_mille;
            let lost = w.rng.chance(loss);
            let delay = w.latency_ms + w.rng.below(3);
            (delay, (!lost).then_some(data))
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        answer.ok_or_else(|| FetchError::Failed("lost on the simulated link".into()))
    }

    async fn manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        let delay = {
            let mut w = world(&self.0);
            let max = w.manifest_delay_ms;
            w.rng.below(max + 1)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut w = world(&self.0);
        w.manifest_at = Some(tokio::time::Instant::now());
        Ok(w.manifest.clone())
    }

    /// As [`SimSource::manifest`], but the engine does not get it: it
    /// does not mark when the engine's manifest arrived (the local filler
    /// may ask before the copier's manifest is in).
    async fn complete_manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        let delay = {
            let mut w = world(&self.0);
            let max = w.manifest_delay_ms;
            w.rng.below(max + 1)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Ok(world(&self.0).manifest.clone())
    }

    fn is_authenticated(&self) -> bool {
        true
    }

    async fn authenticated(&self) -> Result<(), FetchError> {
        Ok(())
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            state: ConnState::Connected,
            reconnects: 0,
            wire_rx_bytes: 0,
            wire_tx_bytes: 0,
            hedged_reads: 0,
            source_lost_ppm: 0,
            source_sent_packets: 0,
            source_retransmitted_bytes: 0,
        }
    }

    fn close(&self) {}
}

/// The simulated backing file.
struct SimDisk(Shared);

impl Disk for SimDisk {
    fn size(&self) -> u64 {
        world(&self.0).cache.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let w = world(&self.0);
        buf.copy_from_slice(&w.cache[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        world(&self.0).cache[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        world(&self.0).cache[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let mut w = world(&self.0);
        let cache = w.cache.clone();
        w.durable = cache;
        Ok(())
    }
    /// Inline, after letting every other ready task run: the disk's work
    /// interleaves with the rest, deterministically.
    async fn offload<R: Send + 'static>(
        f: impl FnOnce() -> std::io::Result<R> + Send + 'static,
    ) -> std::io::Result<R> {
        tokio::task::yield_now().await;
        f()
    }
}

/// The simulated state file.
struct SimMap(Shared);

impl BlockMap for SimMap {
    /// Not modelled: the simulation's crashes lose the page cache too.
    fn mark_written(&mut self, _blocks: Range<u64>) -> std::io::Result<()> {
        Ok(())
    }
    fn persist(&mut self, batch: &SyncBatch) -> std::io::Result<()> {
        let mut w = world(&self.0);
        for r in &batch.blocks {
            w.present[r.start as usize..r.end as usize].fill(true);
        }
        for c in &batch.guest_chunks {
            w.guest.set(*c as usize, true);
        }
        Ok(())
    }
    fn clear_present(&mut self, blocks: &[Range<u64>]) -> std::io::Result<()> {
        let mut w = world(&self.0);
        for r in blocks {
            w.present[r.start as usize..r.end as usize].fill(false);
        }
        Ok(())
    }
    fn record_verified(&mut self, _verified: ferry_store::Verified) -> std::io::Result<()> {
        Ok(())
    }
}

type SimShell = Shell<SimSource, SimDisk, SimMap>;

/// One run of the pull (until a crash): its runtime (dropping it stops
/// every task at once), its shell and its status facts.
struct Boot {
    rt: tokio::runtime::Runtime,
    shell: Arc<SimShell>,
    device: PullDevice<SimSource, SimDisk, SimMap>,
    report: Arc<Report>,
}

/// A migration simulated through the production shell.
struct Sim {
    w: Shared,
    geo: Geometry,
    boot: Option<Boot>,
    /// A content index of a local template (`--index`), and its directory.
    index: Option<(std::path::PathBuf, tempfile::TempDir)>,
    /// Bytes filled locally and stale local chunks, over every boot.
    local: (u64, u64),
}

impl Sim {
    fn create(seed: u64, chunk_size: u32, chunks: u64, tail: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (source, manifest) = source_disk(&mut rng, chunk_size, chunks, tail);
        let geo = manifest.geometry();
        let size = geo.disk_size as usize;
        let blocks = geo.blocks() as usize;
        let acceptable = (0..blocks)
            .map(|b| {
                let r = geo.block_bytes(b as u64);
                vec![source[r.start as usize..r.end as usize].to_vec()]
            })
            .collect();
        let w = World {
            latency_ms: 1 + rng.below(20),
            loss_per_mille: rng.below(100),
            corrupt_per_mille: rng.below(50),
            // Half the runs start before the manifest has arrived, as a
            // real pull does: it streams in after switchover.
            manifest_delay_ms: if rng.chance(500) { 200 } else { 0 },
            rng,
            model: source.clone(),
            manifest: Arc::new(manifest),
            cache: vec![0; size],
            durable: vec![0; size],
            present: bitvec![0; blocks],
            guest: bitvec![0; geo.chunks() as usize],
            source,
            acceptable,
            manifest_at: None,
            bytes_requested: 0,
            zero_chunk_requests: 0,
            write_stamp: 0,
        };
        Sim {
            w: Arc::new(Mutex::new(w)),
            geo,
            boot: None,
            index: None,
            local: (0, 0),
        }
    }

    fn new(seed: u64, chunk_size: u32, chunks: u64, tail: u64) -> Self {
        let mut sim = Self::create(seed, chunk_size, chunks, tail);
        sim.start();
        sim
    }

    /// A migration with 64 KiB chunks and `--index` of a local template
    /// that holds two in three of the source's full chunks (one chunk
    /// further on), some of those (chunks 3, 7, …) changed after indexing.
    fn with_template(seed: u64, chunks: u64, tail: u64) -> Self {
        let cs = ferry_index::CHUNK_SIZE;
        let mut sim = Self::create(seed, cs, chunks, tail);
        let dir = tempfile::tempdir().expect("tempdir");
        let tpl = dir.path().join("template.img");
        let mut t = vec![0u8; (chunks as usize + 1) * cs as usize];
        let source = world(&sim.w).source.clone();
        for c in 0..chunks {
            if c % 3 != 2 {
                let r = sim.geo.chunk_bytes(c);
                let at = (c as usize + 1) * cs as usize;
                t[at..at + cs as usize].copy_from_slice(&source[r.start as usize..r.end as usize]);
            }
        }
        std::fs::write(&tpl, &t).expect("template");
        let idx = dir.path().join("template.ferry-index");
        ferry_index::build(&idx, std::slice::from_ref(&tpl)).expect("index");
        for c in (0..chunks).filter(|c| c % 4 == 3 && c % 3 != 2) {
            let at = (c as usize + 1) * cs as usize + 100;
            t[at] ^= 0x5a;
        }
        std::fs::write(&tpl, &t).expect("template changed");
        sim.index = Some((idx, dir));
        sim.start();
        sim
    }

    /// Starts the pull from the durable state: the shell over the
    /// simulated disk and source, the manifest fetch, the background
    /// copier and the syncer, as `ferry pull` does.
    fn start(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let (present, guest) = {
            let mut w = world(&self.w);
            w.manifest_at = None;
            (w.present.clone(), w.guest.clone())
        };
        let shell = Shell::new(
            Engine::new(self.geo, present, guest),
            SimDisk(self.w.clone()),
            SimMap(self.w.clone()),
            None,
            Some(SimSource(self.w.clone())),
            ShellOptions::default(),
        );
        // With a template, the copier is slowed down so that the local
        // filler finds chunks still absent when its matches are in.
        let rate = if self.index.is_some() { 1_000_000 } else { 0 };
        let settings = Arc::new(CopierSettings {
            rate_limit: AtomicU64::new(rate),
            batch_chunks: 3,
            window: Window::Fixed(6),
            sync_bytes: 64 * 1024,
            link_rtt: Duration::from_millis(10),
        });
        let report = Arc::new(Report {
            nbd: None,
            started: std::time::Instant::now(),
            present_at_start: 0,
            verify: Mutex::new(Verification::default()),
            rate: status::RateMeter::default(),
        });
        rt.spawn(copier::fetch_manifest(shell.clone()));
        rt.spawn(copier::run_copier(
            shell.clone(),
            settings.clone(),
            report.clone(),
        ));
        if let Some((idx, _)) = &self.index {
            let index = ferry_index::Index::open(idx).expect("open index");
            rt.spawn(ferry_pull::local::run_local_fill(
                shell.clone(),
                vec![index],
                settings.clone(),
            ));
        }
        rt.spawn(copier::run_syncer(
            shell.clone(),
            settings,
            report.clone(),
            |_: &ferry_pull::Status| {},
        ));
        self.boot = Some(Boot {
            rt,
            device: PullDevice(shell.clone()),
            shell,
            report,
        });
    }

    /// Adds this boot's local fills to [`Sim::local`].
    fn count_local(&mut self) {
        let c = self.boot().shell.engine_counters();
        self.local.0 += c.filled_local;
        self.local.1 += c.local_stale;
    }

    fn boot(&self) -> &Boot {
        self.boot.as_ref().expect("running")
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.boot().rt.block_on(f)
    }

    /// Lets the simulated time run on by `ms`.
    fn idle(&self, ms: u64) {
        self.block_on(async move { tokio::time::sleep(Duration::from_millis(ms)).await });
    }

    fn guest_read(&mut self, offset: u64, len: u64) {
        let d = self.boot().device.clone();
        let got = self
            .block_on(async move { d.read(offset, len as u32).await })
            .expect("read");
        let w = world(&self.w);
        assert!(
            got == w.model[offset as usize..(offset + len) as usize],
            "read at {offset}+{len} returned wrong data"
        );
    }

    fn guest_write(&mut self, offset: u64, len: u64) {
        let data: Vec<u8> = {
            let mut w = world(&self.w);
            w.write_stamp += 1;
            let stamp = w.write_stamp.to_le_bytes();
            (0..len).map(|i| stamp[(i % 4) as usize] ^ 0xa5).collect()
        };
        let d = self.boot().device.clone();
        let sent = data.clone();
        self.block_on(async move { d.write(offset, sent, false).await })
            .expect("write");
        let mut w = world(&self.w);
        let r = offset as usize..(offset + len) as usize;
        w.model[r].copy_from_slice(&data);
        for b in self.geo.blocks_touching(offset, len) {
            let br = self.geo.block_bytes(b);
            let v = w.model[br.start as usize..br.end as usize].to_vec();
            w.acceptable[b as usize].push(v);
        }
    }

    fn guest_flush(&mut self) {
        let d = self.boot().device.clone();
        self.block_on(async move { d.flush().await })
            .expect("flush");
        // Everything acked before the flush is now the only acceptable
        // content after a crash.
        let mut w = world(&self.w);
        for b in 0..self.geo.blocks() {
            let r = self.geo.block_bytes(b);
            w.acceptable[b as usize] = vec![w.model[r.start as usize..r.end as usize].to_vec()];
        }
    }

    fn sync(&mut self) {
        let s = self.boot().shell.clone();
        self.block_on(async move { s.sync().await }).expect("sync");
    }

    /// Crash: the volatile cache, the pull's memory and every request in
    /// flight are lost; then the pull starts again.
    fn crash(&mut self) {
        self.count_local();
        drop(self.boot.take());
        {
            let mut w = world(&self.w);
            let durable = w.durable.clone();
            w.cache = durable;
            // Invariant 1: every persisted present bit covers durable data
            // that is acceptable for its block (source data or a guest
            // write).
            for b in 0..self.geo.blocks() {
                if w.present[b as usize] {
                    let r = self.geo.block_bytes(b);
                    let got = &w.durable[r.start as usize..r.end as usize];
                    assert!(
                        w.acceptable[b as usize].iter().any(|v| v == got),
                        "block {b} is marked present on disk but holds data nobody wrote"
                    );
                }
            }
        }
        self.start();
        // After the crash the guest sees one acceptable version per block:
        // read every block and adopt what it holds, checking it is allowed.
        for b in 0..self.geo.blocks() {
            let r = self.geo.block_bytes(b);
            let d = self.boot().device.clone();
            let got = self
                .block_on(async move { d.read(r.start, (r.end - r.start) as u32).await })
                .expect("read after a crash");
            let mut w = world(&self.w);
            assert!(
                w.acceptable[b as usize].contains(&got),
                "after a crash block {b} holds neither its flushed data nor a later write \
                 (a FLUSHed write was lost or garbage appeared)"
            );
            w.model[r.start as usize..r.end as usize].copy_from_slice(&got);
            w.acceptable[b as usize] = vec![got];
        }
    }

    fn random_extent(&mut self) -> (u64, u64) {
        let size = self.geo.disk_size;
        let blocks = self.geo.blocks();
        let mut w = world(&self.w);
        if w.rng.chance(500) {
            // Block-aligned.
            let b = w.rng.below(blocks);
            let n = 1 + w.rng.below(6.min(blocks - b));
            let r0 = self.geo.block_bytes(b).start;
            let r1 = self.geo.block_bytes(b + n - 1).end;
            (r0, r1 - r0)
        } else {
            let off = w.rng.below(size);
            let len = 1 + w.rng.below((3 * BS as u64).min(size - off));
            (off, len)
        }
    }

    fn roll(&self, n: u64) -> u64 {
        world(&self.w).rng.below(n)
    }

    fn chance(&self, per_mille: u64) -> bool {
        world(&self.w).rng.chance(per_mille)
    }

    fn run(&mut self, steps: u64, crash_per_mille: u64) {
        for _ in 0..steps {
            match self.roll(10) {
                0..=3 => {
                    let (o, l) = self.random_extent();
                    self.guest_read(o, l);
                }
                4..=6 => {
                    let (o, l) = self.random_extent();
                    self.guest_write(o, l);
                }
                7 => self.guest_flush(),
                8 => self.sync(),
                _ => {
                    let ms = 1 + self.roll(5);
                    self.idle(ms);
                }
            }
            if self.chance(crash_per_mille) {
                self.crash();
            }
        }
        // Let the copy finish and be verified.
        for _ in 0..100_000 {
            let done = {
                let b = self.boot();
                b.shell.engine_phase() == Phase::Complete
                    && b.report.verify.lock().expect("verify lock").state == "ok"
            };
            if done {
                break;
            }
            self.idle(10);
        }
        self.sync();
        let b = self.boot();
        assert_eq!(
            b.shell.engine_phase(),
            Phase::Complete,
            "background copy did not finish"
        );
        let verify = b.report.verify.lock().expect("verify lock").clone();
        assert_eq!(verify.state, "ok", "verification: {verify:?}");
        let w = world(&self.w);
        assert!(
            w.cache == w.model,
            "final disk differs from source + guest writes"
        );
        // Invariant 7.
        assert_eq!(w.zero_chunk_requests, 0, "a zero chunk crossed the wire");
        // Every verifiable chunk equals the source's.
        for (c, kind) in b.shell.verifiable_chunks() {
            let r = self.geo.chunk_bytes(c);
            let got = &w.cache[r.start as usize..r.end as usize];
            match kind {
                ChunkKind::Data(h) => assert_eq!(*blake3::hash(got).as_bytes(), h),
                ChunkKind::Zero => assert!(got.iter().all(|b| *b == 0)),
                ChunkKind::Unhashed => panic!("chunk {c} unhashed in a complete manifest"),
            }
        }
    }
}

#[test]
fn random_workloads_without_crashes_keep_every_invariant() {
    for seed in 0..150 {
        let mut sim = Sim::new(seed, 16 * 1024, 24, (seed % 3) * 1000);
        sim.run(300, 0);
        assert!(world(&sim.w).bytes_requested > 0);
    }
}

#[test]
fn random_workloads_with_local_fills_and_crashes_keep_every_invariant() {
    let mut local = (0, 0);
    for seed in 2000..2060 {
        let mut sim = Sim::with_template(seed, 9, (seed % 2) * 4096 + 100);
        sim.run(200, if seed % 3 == 0 { 0 } else { 15 });
        sim.count_local();
        local.0 += sim.local.0;
        local.1 += sim.local.1;
    }
    // Local fills happened, stale local copies were met (and fetched).
    assert!(local.0 > 0 && local.1 > 0, "{local:?}");
}

#[test]
fn random_workloads_with_crashes_keep_every_invariant() {
    for seed in 1000..1150 {
        let mut sim = Sim::new(seed, 16 * 1024, 20, (seed % 2) * 4096 + 100);
        sim.run(300, 15);
    }
}

#[test]
fn without_loss_or_guest_every_data_byte_crosses_once() {
    let mut sim = Sim::new(7, 64 * 1024, 64, 0);
    {
        let mut w = world(&sim.w);
        w.loss_per_mille = 0;
        w.corrupt_per_mille = 0;
    }
    sim.run(0, 0);
    let w = world(&sim.w);
    assert_eq!(w.bytes_requested, w.manifest.data_bytes());
    assert_eq!(
        sim.boot().shell.engine_counters().fetched_background,
        w.manifest.data_bytes()
    );
}

/// The engine alone, for the scenario tests: a source disk, its manifest
/// (delivered or not), an engine.
struct Scenario {
    source: Vec<u8>,
    manifest: Arc<Manifest>,
    engine: Engine,
}

impl Scenario {
    fn new(seed: u64, chunk_size: u32, chunks: u64, tail: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let (source, manifest) = source_disk(&mut rng, chunk_size, chunks, tail);
        let manifest = Arc::new(manifest);
        let engine = if rng.chance(500) {
            Engine::new(manifest.geometry(), BitVec::new(), BitVec::new())
        } else {
            Engine::with_manifest(manifest.clone(), BitVec::new(), BitVec::new())
        };
        Scenario {
            source,
            manifest,
            engine,
        }
    }

    /// Delivers the manifest at once.
    fn manifest_now(mut self) -> Self {
        if !self.engine.has_manifest() {
            self.engine.handle_manifest(self.manifest.clone());
        }
        self
    }

    fn geo(&self) -> Geometry {
        self.manifest.geometry()
    }

    /// The fetches the engine asks for (all on demand), taken.
    fn fetches(&mut self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        while let Some(f) = self.engine.poll_fetch() {
            assert_eq!(f.kind, FetchKind::OnDemand);
            out.push(f.chunks);
        }
        out
    }
}

/// The payload the source sends for chunk `c` with bytes `data`.
fn data_payload(sim: &Scenario, c: u64, data: &[u8]) -> Payload {
    match sim.manifest.chunk(c) {
        ChunkKind::Data(hash) => Payload::Data {
            bytes: data.to_vec(),
            hash,
        },
        ChunkKind::Zero => Payload::Zero,
        ChunkKind::Unhashed => panic!("the simulated source's manifest is complete"),
    }
}

/// The on-demand fetch of `chunks`.
fn on_demand(chunks: Range<u64>) -> Option<FetchRequest> {
    Some(FetchRequest {
        chunks,
        kind: FetchKind::OnDemand,
    })
}

#[test]
fn late_fetched_data_never_overwrites_a_guest_write() {
    // Invariant 3, one scenario spelled out.
    let mut sim = Scenario::new(11, 16 * 1024, 8, 0).manifest_now();
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let start = sim.geo().chunk_bytes(c).start;
    // The read starts a fetch of the chunk...
    assert!(matches!(sim.engine.plan_read(start, 4096), ReadPlan::Wait));
    // ...the guest overwrites its second block while the data is in flight...
    assert_eq!(
        sim.engine.plan_write(start + 4096, 4096),
        WritePlan::Ready(sim.geo().blocks_touching(start + 4096, 4096))
    );
    // ...and the data arrives: that block is not in the fill.
    let r = sim.geo().chunk_bytes(c);
    let data = sim.source[r.start as usize..r.end as usize].to_vec();
    match sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)) {
        Arrival::Fill(plan) => {
            let b = sim.geo().blocks_touching(start + 4096, 4096).start;
            assert!(
                plan.runs.iter().all(|run| !run.contains(&b)),
                "fill would overwrite the guest write"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sim.engine.counters().discarded_guest_won, 4096);
}

#[test]
fn sub_block_write_to_absent_block_fetches_first_whole_block_does_not() {
    // Invariant 4.
    let mut sim = Scenario::new(12, 16 * 1024, 8, 0).manifest_now();
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let start = sim.geo().chunk_bytes(c).start;
    assert_eq!(sim.engine.plan_write(start + 100, 10), WritePlan::Wait);
    assert_eq!(
        sim.engine.poll_fetch(),
        on_demand(c..c + 1),
        "sub-block write did not fetch"
    );
    // A whole-block write elsewhere in an absent chunk goes ahead at once.
    let c2 = (c + 1..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("another data chunk");
    let s2 = sim.geo().chunk_bytes(c2).start;
    assert!(matches!(
        sim.engine.plan_write(s2, 8192),
        WritePlan::Ready(_)
    ));
}

#[test]
fn before_the_manifest_reads_are_served_and_checked_against_the_carried_hash() {
    // A fresh pull serves reads before the manifest has streamed in.
    let mut sim = Scenario::new(15, 16 * 1024, 8, 0);
    sim.engine = Engine::new(sim.geo(), BitVec::new(), BitVec::new());
    assert_eq!(
        sim.engine.poll_background(4),
        None,
        "no background copy without the manifest"
    );
    let data_c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let r = sim.geo().chunk_bytes(data_c);
    assert!(matches!(
        sim.engine.plan_read(r.start, 4096),
        ReadPlan::Wait
    ));
    // Data whose bytes do not match the hash sent with it is refused.
    let mut bad = sim.source[r.start as usize..r.end as usize].to_vec();
    bad[0] ^= 1;
    assert_eq!(
        sim.engine
            .handle_fetched(data_c, &data_payload(&sim, data_c, &bad)),
        Arrival::Corrupt { chunk: data_c }
    );
    // A zero answer is taken before the manifest, but refused for a chunk
    // the manifest says holds data.
    let zero_c = (0..8).find(|c| sim.manifest.chunk(*c) == ChunkKind::Zero);
    if let Some(z) = zero_c {
        let zr = sim.geo().chunk_bytes(z);
        let _ = sim.engine.plan_read(zr.start, 1);
        assert!(matches!(
            sim.engine.handle_fetched(z, &Payload::Zero),
            Arrival::Fill(FillPlan { zero: true, .. })
        ));
        sim.engine.handle_fill_done(z);
        assert_eq!(sim.engine.plan_read(zr.start, 1), ReadPlan::Ready);
    }
    sim.engine.handle_manifest(sim.manifest.clone());
    let _ = sim.engine.plan_read(r.start, 4096);
    assert_eq!(
        sim.engine.handle_fetched(data_c, &Payload::Zero),
        Arrival::Corrupt { chunk: data_c }
    );
    assert!(
        sim.engine.poll_background(4).is_some(),
        "the manifest starts the background copy"
    );
}

#[test]
fn corrupt_data_is_never_marked_present() {
    // Invariant 5.
    let mut sim = Scenario::new(13, 16 * 1024, 8, 0).manifest_now();
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let r = sim.geo().chunk_bytes(c);
    assert!(matches!(sim.engine.plan_read(r.start, 1), ReadPlan::Wait));
    let mut data = sim.source[r.start as usize..r.end as usize].to_vec();
    data[5] ^= 1;
    assert_eq!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Corrupt { chunk: c }
    );
    assert!(!sim.engine.is_present(sim.geo().chunk_blocks(c).start));
    assert_eq!(sim.fetches(), vec![c..c + 1], "the first plan's fetch");
    // It is fetched again on the next plan.
    assert_eq!(sim.engine.plan_read(r.start, 1), ReadPlan::Wait);
    assert_eq!(sim.fetches(), vec![c..c + 1]);
    // A source that keeps sending other data stops the migration (invariant 6).
    for i in 1..ferry_core::engine::MAX_CORRUPT_RETRIES {
        if i > 1 {
            let _ = sim.engine.plan_read(r.start, 1);
        }
        let _ = sim.engine.handle_fetched(c, &data_payload(&sim, c, &data));
    }
    assert!(matches!(sim.engine.phase(), ferry_core::Phase::Failed(_)));
    assert!(matches!(
        sim.engine.plan_read(r.start, 1),
        ReadPlan::Failed(_)
    ));
}

#[test]
fn unsynced_bits_are_not_handed_out_before_their_write_completes() {
    // Invariant 1 at the API: a fill in progress is not in a sync batch.
    let mut sim = Scenario::new(14, 16 * 1024, 8, 0).manifest_now();
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let r = sim.geo().chunk_bytes(c);
    let _ = sim.engine.plan_read(r.start, 1);
    let data = sim.source[r.start as usize..r.end as usize].to_vec();
    assert!(matches!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Fill(_)
    ));
    assert!(
        sim.engine.begin_sync().is_empty(),
        "bits of an unwritten fill were handed out"
    );
    sim.engine.handle_fill_done(c);
    let batch = sim.engine.begin_sync();
    assert_eq!(batch.blocks, vec![sim.geo().chunk_blocks(c)]);
}

/// A simulation whose background copier has started fetching a range
/// (returned) holding data chunk `c` (returned, with its first byte and
/// its source data).
fn background_fetching(seed: u64) -> (Scenario, Range<u64>, u64, u64, Vec<u8>) {
    let mut sim = Scenario::new(seed, 16 * 1024, 8, 0).manifest_now();
    let bg = sim.engine.poll_background(8).expect("background work");
    let c = bg
        .clone()
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let r = sim.geo().chunk_bytes(c);
    let data = sim.source[r.start as usize..r.end as usize].to_vec();
    (sim, bg, c, r.start, data)
}

#[test]
fn a_read_overtakes_a_background_fetch_and_the_later_answer_is_dropped() {
    let (mut sim, bg, c, start, data) = background_fetching(13);
    // The read does not wait for the background fetch: it asks again.
    assert_eq!(sim.engine.plan_read(start, 4096), ReadPlan::Wait);
    assert_eq!(sim.fetches(), vec![c..c + 1]);
    // Once: a second read of the chunk waits for that request.
    assert_eq!(sim.engine.plan_read(start + 4096, 4096), ReadPlan::Wait);
    assert_eq!(sim.fetches(), Vec::<Range<u64>>::new());
    // The background request fails: the on-demand one is still awaited.
    sim.engine.handle_fetch_failed(bg.clone());
    assert_eq!(sim.engine.plan_read(start, 4096), ReadPlan::Wait);
    assert_eq!(sim.fetches(), Vec::<Range<u64>>::new());
    match sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)) {
        Arrival::Fill(plan) => assert!(!plan.runs.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    sim.engine.handle_fill_done(c);
    assert_eq!(sim.engine.plan_read(start, 4096), ReadPlan::Ready);
    // The guest writes the chunk; a late answer of another request for it
    // writes nothing (invariant 3).
    assert!(matches!(
        sim.engine.plan_write(start, 4096),
        WritePlan::Ready(_)
    ));
    assert_eq!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Duplicate { chunk: c }
    );
    assert_eq!(sim.engine.counters().duplicate, data.len() as u64);
}

#[test]
fn both_answers_of_an_overtaken_fetch_fill_the_chunk_once() {
    let (mut sim, _, c, start, data) = background_fetching(14);
    assert!(matches!(sim.engine.plan_read(start, 4096), ReadPlan::Wait));
    // The background answer comes first this time: it fills.
    assert!(matches!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Fill(_)
    ));
    // While that fill is written, the on-demand answer is dropped, so two
    // fills of one chunk never race a guest write.
    assert_eq!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Duplicate { chunk: c }
    );
    sim.engine.handle_fill_done(c);
    assert_eq!(sim.engine.plan_read(start, 4096), ReadPlan::Ready);
}

#[test]
fn chunks_failing_verification_are_fetched_again_unless_the_guest_wrote_them() {
    let geo = Geometry::new(8 * 65536, 65536);
    let m = Arc::new(Manifest::new(
        geo,
        (0..8).map(|c| ChunkKind::Data([c as u8; 32])).collect(),
    ));
    let mut guest = bitvec![0; 8];
    guest.set(2, true);
    let mut e = Engine::with_manifest(m, bitvec![1; geo.blocks() as usize], guest);
    assert_eq!(e.phase(), ferry_core::Phase::Complete);
    let cleared = e.refetch(&[1, 2]);
    assert_eq!(cleared, vec![geo.chunk_blocks(1)], "chunk 2 is the guest's");
    assert_eq!(e.phase(), ferry_core::Phase::Copying);
    assert!(!e.is_present(geo.chunk_blocks(1).start));
    assert!(e.is_present(geo.chunk_blocks(2).start));
    assert_eq!(e.poll_background(16), Some(1..2));
    assert_eq!(e.present_bytes(), 7 * 65536);
}

#[test]
fn a_failed_guest_write_leaves_no_block_present_without_its_data() {
    // Invariants 1 and 8: a whole-block write into an absent chunk makes
    // its blocks present at once; if the write then fails (a full
    // filesystem), the backing file holds a hole there, so they must be
    // absent again and fetched anew, never kept as present zeros.
    let mut sim = Scenario::new(16, 16 * 1024, 8, 0).manifest_now();
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let start = sim.geo().chunk_bytes(c).start;
    let blocks = sim.geo().blocks_touching(start + 4096, 8192);
    assert_eq!(
        sim.engine.plan_write(start + 4096, 8192),
        WritePlan::Ready(blocks.clone())
    );
    // While it is in flight, reads of those blocks and other writes to
    // them wait (no fetch: the write's outcome decides); other blocks do
    // not.
    assert!(!sim.engine.readable(start + 4096, 4096));
    assert_eq!(sim.engine.plan_read(start + 8192, 512), ReadPlan::Wait);
    assert_eq!(sim.engine.plan_write(start + 8192, 4096), WritePlan::Wait);
    assert_eq!(sim.fetches(), Vec::<Range<u64>>::new());
    assert!(matches!(
        sim.engine.plan_write(start, 4096),
        WritePlan::Ready(_)
    ));
    sim.engine
        .handle_write_done(sim.geo().blocks_touching(start, 4096));
    sim.engine.handle_write_failed(blocks.clone());
    for b in blocks.clone() {
        assert!(
            !sim.engine.is_present(b),
            "block {b} present after a failed write"
        );
    }
    assert!(
        sim.engine
            .begin_sync()
            .blocks
            .iter()
            .all(|r| r.end <= blocks.start || r.start >= blocks.end),
        "a sync round would persist blocks of the failed write as present"
    );
    // A read of them fetches the chunk; its data fills exactly them.
    assert_eq!(sim.engine.plan_read(start + 4096, 8192), ReadPlan::Wait);
    assert_eq!(sim.fetches(), vec![c..c + 1]);
    let r = sim.geo().chunk_bytes(c);
    let data = sim.source[r.start as usize..r.end as usize].to_vec();
    match sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)) {
        Arrival::Fill(plan) => assert!(
            blocks
                .clone()
                .all(|b| plan.runs.iter().any(|run| run.contains(&b))),
            "fill does not write the failed write's blocks: {plan:?}"
        ),
        other => panic!("unexpected {other:?}"),
    }
    sim.engine.handle_fill_done(c);
    assert!(sim.engine.readable(start + 4096, 8192));
    // A write that succeeds keeps its blocks, and others may go on.
    let c2 = (c + 1..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("another data chunk");
    let s2 = sim.geo().chunk_bytes(c2).start;
    let b2 = sim.geo().blocks_touching(s2, 4096);
    assert_eq!(
        sim.engine.plan_write(s2, 4096),
        WritePlan::Ready(b2.clone())
    );
    sim.engine.handle_write_done(b2.clone());
    assert!(sim.engine.readable(s2, 4096));
    assert!(matches!(
        sim.engine.plan_write(s2, 4096),
        WritePlan::Ready(_)
    ));
}

#[test]
fn wake_ups_name_the_chunks_that_changed() {
    let mut sim = Scenario::new(17, 16 * 1024, 8, 0).manifest_now();
    while sim.engine.poll_wake().is_some() {}
    let c = (0..8)
        .find(|c| matches!(sim.manifest.chunk(*c), ChunkKind::Data(_)))
        .expect("a data chunk");
    let r = sim.geo().chunk_bytes(c);
    assert_eq!(sim.engine.plan_read(r.start, 1), ReadPlan::Wait);
    assert_eq!(sim.engine.poll_wake(), None, "planning changes no chunk");
    let data = sim.source[r.start as usize..r.end as usize].to_vec();
    assert!(matches!(
        sim.engine.handle_fetched(c, &data_payload(&sim, c, &data)),
        Arrival::Fill(_)
    ));
    sim.engine.handle_fill_done(c);
    assert_eq!(
        sim.engine.poll_wake(),
        Some(ferry_core::Wake::Chunks(c..c + 1))
    );
    assert_eq!(sim.engine.poll_wake(), None);
    // A failed fetch of a range wakes that range, at once.
    let other = (0..8).filter(|x| *x != c).collect::<Vec<_>>();
    sim.engine.handle_fetch_failed(other[0]..other[0] + 2);
    assert_eq!(
        sim.engine.poll_wake(),
        Some(ferry_core::Wake::Chunks(other[0]..other[0] + 2))
    );
    // A stopped migration wakes everyone.
    sim.engine
        .fail(ferry_core::Failure::SourceChanged("test".into()));
    assert_eq!(sim.engine.poll_wake(), Some(ferry_core::Wake::All));
    assert_eq!(sim.engine.poll_wake(), None);
}

#[test]
fn a_seed_replays_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, 16 * 1024, 20, 100);
        sim.run(200, 20);
        let w = world(&sim.w);
        (
            w.bytes_requested,
            blake3::hash(&w.model),
            sim.boot().shell.engine_counters(),
        )
    };
    for seed in [3, 1001] {
        assert_eq!(run(seed), run(seed), "seed {seed} ran differently");
    }
}
