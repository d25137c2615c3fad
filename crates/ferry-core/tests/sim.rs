//! Deterministic simulation of a migration: a simulated source, a link with
//! latency and loss (and corruption), a guest issuing reads, writes and
//! flushes, a backing disk with a volatile cache, and crashes at chosen
//! points. It drives the sans-IO [`Engine`] exactly as the daemon does and
//! checks the design invariants 1–5 and 7 against an oracle.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bitvec::prelude::*;
use ferry_core::engine::{
    Arrival, Engine, FetchKind, FetchRequest, FillPlan, Payload, ReadPlan, SyncBatch, WritePlan,
};
use ferry_core::geometry::BLOCK_SIZE;
use ferry_core::{ChunkKind, Geometry, Manifest};

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

/// The backing file: writes land in a volatile cache; `sync` makes them
/// durable; a crash throws the cache away.
struct SimDisk {
    cache: Vec<u8>,
    durable: Vec<u8>,
}

/// The persisted state file: present bits per block, guest bits per chunk.
#[derive(Clone)]
struct SimMap {
    present: BitVec,
    guest: BitVec,
}

/// A fill whose write has not finished: its runs and the data (None: zeros).
type PendingFill = (Vec<Range<u64>>, Option<Vec<u8>>);

/// What the simulated source answers for one chunk.
enum Answer {
    Data(Vec<u8>, [u8; 32]),
    Zero,
}

enum Event {
    /// A response to a fetch request of `range`; `None` = lost.
    Response(Range<u64>, Option<Vec<Answer>>),
    /// The manifest finished streaming in.
    Manifest,
    /// The backing-file write of a fill finished.
    FillWritten(u64),
}

struct Sim {
    rng: Rng,
    source: Vec<u8>,
    manifest: Arc<Manifest>,
    engine: Engine,
    disk: SimDisk,
    map: SimMap,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    pending_fills: BTreeMap<u64, PendingFill>,
    /// What the guest must read now.
    model: Vec<u8>,
    /// Per block: acceptable contents after a crash (the value at the last
    /// flush, then every value written since).
    acceptable: Vec<Vec<Vec<u8>>>,
    latency: u64,
    loss_per_mille: u64,
    corrupt_per_mille: u64,
    bytes_requested: u64,
    zero_chunk_requests: u64,
    write_stamp: u32,
}

impl Sim {
    fn new(seed: u64, chunk_size: u32, chunks: u64, tail: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
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
        let manifest = Arc::new(Manifest::new(geo, kinds));
        // Half the runs start before the manifest has arrived, as a real
        // pull does: it streams in after switchover.
        let late_manifest = rng.chance(500);
        let engine = if late_manifest {
            Engine::new(geo, BitVec::new(), BitVec::new())
        } else {
            Engine::with_manifest(manifest.clone(), BitVec::new(), BitVec::new())
        };
        let blocks = geo.blocks() as usize;
        let acceptable = (0..blocks)
            .map(|b| {
                let r = geo.block_bytes(b as u64);
                vec![source[r.start as usize..r.end as usize].to_vec()]
            })
            .collect();
        let mut sim = Self {
            latency: 1 + rng.below(20),
            loss_per_mille: rng.below(100),
            corrupt_per_mille: rng.below(50),
            rng,
            model: source.clone(),
            manifest,
            engine,
            disk: SimDisk {
                cache: vec![0; size as usize],
                durable: vec![0; size as usize],
            },
            map: SimMap {
                present: bitvec![0; blocks],
                guest: bitvec![0; geo.chunks() as usize],
            },
            source,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            pending_fills: BTreeMap::new(),
            acceptable,
            bytes_requested: 0,
            zero_chunk_requests: 0,
            write_stamp: 0,
        };
        if late_manifest {
            let delay = 5 + sim.rng.below(200);
            sim.schedule(delay, Event::Manifest);
        }
        sim
    }

    /// Delivers the manifest at once (for tests of one scenario).
    fn manifest_now(mut self) -> Self {
        if !self.engine.has_manifest() {
            self.engine.handle_manifest(self.manifest.clone());
            self.events.clear();
        }
        self
    }

    fn geo(&self) -> Geometry {
        self.manifest.geometry()
    }

    fn schedule(&mut self, delay: u64, ev: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), ev);
    }

    /// Sends a fetch request for `range` over the simulated link.
    fn send(&mut self, range: Range<u64>) {
        let geo = self.geo();
        let mut data = Vec::new();
        for c in range.clone() {
            let hash = match self.manifest.chunk(c) {
                ChunkKind::Zero => {
                    // Allowed only before the manifest has arrived.
                    if self.engine.has_manifest() {
                        self.zero_chunk_requests += 1;
                    }
                    data.push(Answer::Zero);
                    continue;
                }
                ChunkKind::Data(h) => h,
            };
            let r = geo.chunk_bytes(c);
            self.bytes_requested += r.end - r.start;
            let mut d = self.source[r.start as usize..r.end as usize].to_vec();
            if self.rng.chance(self.corrupt_per_mille) {
                let i = self.rng.below(d.len() as u64) as usize;
                d[i] ^= 0x40;
            }
            data.push(Answer::Data(d, hash));
        }
        let lost = self.rng.chance(self.loss_per_mille);
        let delay = self.latency + self.rng.below(3);
        self.schedule(delay, Event::Response(range, (!lost).then_some(data)));
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

    /// Sends every fetch the engine asks for.
    fn send_fetches(&mut self) {
        while let Some(f) = self.engine.poll_fetch() {
            self.send(f.chunks);
        }
    }

    /// Delivers the next event; returns false if there was none.
    fn advance(&mut self) -> bool {
        let Some(((t, _), ev)) = self.events.pop_first() else {
            return false;
        };
        self.now = self.now.max(t);
        match ev {
            Event::Manifest => self.engine.handle_manifest(self.manifest.clone()),
            Event::Response(range, None) => self.engine.handle_fetch_failed(range),
            Event::Response(range, Some(data)) => {
                for (c, answer) in range.zip(data) {
                    let (payload, bytes) = match answer {
                        Answer::Data(d, hash) => (
                            Payload::Data {
                                bytes: d.clone(),
                                hash,
                            },
                            Some(d),
                        ),
                        Answer::Zero => (Payload::Zero, None),
                    };
                    match self.engine.handle_fetched(c, &payload) {
                        Arrival::Corrupt { chunk } | Arrival::Duplicate { chunk } => {
                            assert_eq!(chunk, c)
                        }
                        Arrival::Fill(plan) => {
                            assert_eq!(plan.zero, bytes.is_none());
                            self.pending_fills.insert(c, (plan.runs, bytes));
                            let delay = self.rng.below(3);
                            self.schedule(delay, Event::FillWritten(c));
                        }
                    }
                }
            }
            Event::FillWritten(c) => {
                let (runs, d) = self.pending_fills.remove(&c).expect("pending fill");
                let geo = self.geo();
                let base = geo.chunk_bytes(c).start;
                for r in runs {
                    let lo = geo.block_bytes(r.start).start;
                    let hi = geo.block_bytes(r.end - 1).end;
                    let dst = &mut self.disk.cache[lo as usize..hi as usize];
                    match &d {
                        Some(d) => {
                            dst.copy_from_slice(&d[(lo - base) as usize..(hi - base) as usize])
                        }
                        None => dst.fill(0),
                    }
                }
                self.engine.handle_fill_done(c);
            }
        }
        true
    }

    fn sync(&mut self) {
        let batch: SyncBatch = self.engine.begin_sync();
        // Invariant 1: the data first, then the bits.
        self.disk.durable.copy_from_slice(&self.disk.cache);
        for r in &batch.blocks {
            self.map.present[r.start as usize..r.end as usize].fill(true);
        }
        for c in &batch.guest_chunks {
            self.map.guest.set(*c as usize, true);
        }
        self.engine.handle_sync_done(batch);
    }

    fn guest_read(&mut self, offset: u64, len: u64) {
        for _ in 0..10_000 {
            match self.engine.plan_read(offset, len) {
                ReadPlan::Ready => {
                    let got = &self.disk.cache[offset as usize..(offset + len) as usize];
                    let want = &self.model[offset as usize..(offset + len) as usize];
                    assert!(got == want, "read at {offset}+{len} returned wrong data");
                    return;
                }
                ReadPlan::Wait => {
                    self.send_fetches();
                    assert!(self.advance(), "read waits but nothing is in flight");
                }
                ReadPlan::Failed(e) => panic!("migration failed: {e}"),
            }
        }
        panic!("read never became ready");
    }

    fn guest_write(&mut self, offset: u64, len: u64) {
        self.write_stamp += 1;
        let stamp = self.write_stamp.to_le_bytes();
        let data: Vec<u8> = (0..len).map(|i| stamp[(i % 4) as usize] ^ 0xa5).collect();
        for _ in 0..10_000 {
            match self.engine.plan_write(offset, len) {
                WritePlan::Ready(blocks) => {
                    let r = offset as usize..(offset + len) as usize;
                    self.disk.cache[r.clone()].copy_from_slice(&data);
                    self.model[r].copy_from_slice(&data);
                    for b in blocks.clone() {
                        let br = self.geo().block_bytes(b);
                        let v = self.model[br.start as usize..br.end as usize].to_vec();
                        self.acceptable[b as usize].push(v);
                    }
                    self.engine.handle_write_done(blocks);
                    return;
                }
                WritePlan::Wait => {
                    self.send_fetches();
                    assert!(self.advance(), "write waits but nothing is in flight");
                }
                WritePlan::Failed(e) => panic!("migration failed: {e}"),
            }
        }
        panic!("write never became ready");
    }

    fn guest_flush(&mut self) {
        self.sync();
        // Everything acked before the flush is now the only acceptable
        // content after a crash.
        for b in 0..self.geo().blocks() {
            let r = self.geo().block_bytes(b);
            self.acceptable[b as usize] =
                vec![self.model[r.start as usize..r.end as usize].to_vec()];
        }
    }

    /// Crash: the volatile cache, the engine and the link are lost.
    fn crash(&mut self) {
        self.disk.cache.copy_from_slice(&self.disk.durable);
        self.events.clear();
        self.pending_fills.clear();
        // Invariant 1: every persisted present bit covers durable data that
        // is acceptable for its block (source data or a guest write).
        for b in 0..self.geo().blocks() {
            if self.map.present[b as usize] {
                let r = self.geo().block_bytes(b);
                let got = &self.disk.durable[r.start as usize..r.end as usize];
                assert!(
                    self.acceptable[b as usize].iter().any(|v| v == got),
                    "block {b} is marked present on disk but holds data nobody wrote"
                );
            }
        }
        // The restarted pull gets the manifest again, sometimes late.
        self.engine = Engine::new(self.geo(), self.map.present.clone(), self.map.guest.clone());
        if self.rng.chance(500) {
            self.engine.handle_manifest(self.manifest.clone());
        } else {
            let delay = 1 + self.rng.below(100);
            self.schedule(delay, Event::Manifest);
        }
        // After the crash the guest sees one acceptable version per block:
        // read every block and adopt what it holds, checking it is allowed.
        for b in 0..self.geo().blocks() {
            let r = self.geo().block_bytes(b);
            let want_any = self.acceptable[b as usize].clone();
            for _ in 0..10_000 {
                match self.engine.plan_read(r.start, r.end - r.start) {
                    ReadPlan::Ready => break,
                    ReadPlan::Wait => {
                        self.send_fetches();
                        assert!(self.advance());
                    }
                    ReadPlan::Failed(e) => panic!("{e}"),
                }
            }
            let got = self.disk.cache[r.start as usize..r.end as usize].to_vec();
            assert!(
                want_any.contains(&got),
                "after a crash block {b} holds neither its flushed data nor a later write \
                 (a FLUSHed write was lost or garbage appeared)"
            );
            self.model[r.start as usize..r.end as usize].copy_from_slice(&got);
            self.acceptable[b as usize] = vec![got];
        }
    }

    fn background_step(&mut self) {
        while self.engine.in_flight() < 6 {
            match self.engine.poll_background(3) {
                Some(r) => self.send(r),
                None => break,
            }
        }
    }

    fn random_extent(&mut self) -> (u64, u64) {
        let size = self.geo().disk_size;
        if self.rng.chance(500) {
            // Block-aligned.
            let blocks = self.geo().blocks();
            let b = self.rng.below(blocks);
            let n = 1 + self.rng.below(6.min(blocks - b));
            let r0 = self.geo().block_bytes(b).start;
            let r1 = self.geo().block_bytes(b + n - 1).end;
            (r0, r1 - r0)
        } else {
            let off = self.rng.below(size);
            let len = 1 + self.rng.below((3 * BS as u64).min(size - off));
            (off, len)
        }
    }

    fn run(&mut self, steps: u64, crash_per_mille: u64) {
        for _ in 0..steps {
            if self.rng.chance(700) {
                self.background_step();
            }
            match self.rng.below(10) {
                0..=3 => {
                    let (o, l) = self.random_extent();
                    self.guest_read(o, l);
                }
                4..=6 => {
                    let (o, l) = self.random_extent();
                    self.guest_write(o, l);
                }
                7 => self.guest_flush(),
                8 if self.engine.unsynced_bytes() > 0 => self.sync(),
                _ => {
                    self.advance();
                }
            }
            if self.rng.chance(crash_per_mille) {
                self.crash();
            }
        }
        // Let the copy finish.
        for _ in 0..100_000 {
            self.background_step();
            if !self.advance() {
                break;
            }
        }
        self.sync();
        assert_eq!(
            self.engine.phase(),
            ferry_core::Phase::Complete,
            "background copy did not finish"
        );
        assert!(
            self.disk.cache == self.model,
            "final disk differs from source + guest writes"
        );
        // Invariant 7.
        assert_eq!(self.zero_chunk_requests, 0, "a zero chunk crossed the wire");
        // Every verifiable chunk equals its source hash.
        for (c, kind) in self.engine.verifiable_chunks() {
            let r = self.geo().chunk_bytes(c);
            let got = &self.disk.cache[r.start as usize..r.end as usize];
            match kind {
                ChunkKind::Data(h) => assert_eq!(*blake3::hash(got).as_bytes(), h),
                ChunkKind::Zero => assert!(got.iter().all(|b| *b == 0)),
            }
        }
    }
}

/// The payload the source sends for chunk `c` with bytes `data`.
fn data_payload(sim: &Sim, c: u64, data: &[u8]) -> Payload {
    match sim.manifest.chunk(c) {
        ChunkKind::Data(hash) => Payload::Data {
            bytes: data.to_vec(),
            hash,
        },
        ChunkKind::Zero => Payload::Zero,
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
fn random_workloads_without_crashes_keep_every_invariant() {
    for seed in 0..150 {
        let mut sim = Sim::new(seed, 16 * 1024, 24, (seed % 3) * 1000);
        sim.run(300, 0);
        assert!(sim.bytes_requested > 0);
    }
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
    sim.loss_per_mille = 0;
    sim.corrupt_per_mille = 0;
    sim.run(0, 0);
    assert_eq!(sim.bytes_requested, sim.manifest.data_bytes());
    assert_eq!(
        sim.engine.counters().fetched_background,
        sim.manifest.data_bytes()
    );
}

#[test]
fn late_fetched_data_never_overwrites_a_guest_write() {
    // Invariant 3, one scenario spelled out.
    let mut sim = Sim::new(11, 16 * 1024, 8, 0).manifest_now();
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
    sim.disk.cache[(start + 4096) as usize..(start + 8192) as usize].fill(0xee);
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
    let mut sim = Sim::new(12, 16 * 1024, 8, 0).manifest_now();
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
    let mut sim = Sim::new(15, 16 * 1024, 8, 0);
    sim.engine = Engine::new(sim.geo(), BitVec::new(), BitVec::new());
    sim.events.clear();
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
    let mut sim = Sim::new(13, 16 * 1024, 8, 0).manifest_now();
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
    let mut sim = Sim::new(14, 16 * 1024, 8, 0).manifest_now();
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
fn background_fetching(seed: u64) -> (Sim, Range<u64>, u64, u64, Vec<u8>) {
    let mut sim = Sim::new(seed, 16 * 1024, 8, 0).manifest_now();
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
    let mut sim = Sim::new(16, 16 * 1024, 8, 0).manifest_now();
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
    let mut sim = Sim::new(17, 16 * 1024, 8, 0).manifest_now();
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
