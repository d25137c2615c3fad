//! The migration engine of the destination: which blocks are present, which
//! chunks are being fetched or filled, what the background copier fetches
//! next, and what must be made durable before a present bit may be.
//!
//! It is a sans-IO state machine in the shape of quinn-proto's
//! `Connection`: the caller (the `ferry pull` daemon's shell, or a
//! simulation test) plans guest requests ([`Engine::plan_read`],
//! [`Engine::plan_write`]), reports what happened through the `handle_*`
//! inputs (data fetched, a fetch failed, a fill or a write done, a sync
//! round done, …), and takes the engine's outputs from the `poll_*`
//! methods: the fetches to issue ([`Engine::poll_fetch`],
//! [`Engine::poll_background`]) and the chunks whose waiting requests to
//! wake ([`Engine::poll_wake`]). The rules it enforces are the design
//! invariants:
//!
//! 1. A block's present bit is persisted only after its data was synced:
//!    [`Engine::begin_sync`] hands out only blocks whose writes completed.
//! 2. A guest FLUSH persists the present bits of the blocks the guest wrote
//!    (the caller runs one sync round for it).
//! 3. Guest writes win: a fill writes only blocks that were absent when the
//!    data arrived, and a guest write waits while its chunk is being filled.
//! 4. A sub-block write to an absent block fetches the block's chunk first.
//! 5. Fetched data is checked against the manifest's hash before any of it
//!    is written ([`Engine::handle_fetched`]). Until the manifest has
//!    arrived (it streams in after switchover, so the first read does not
//!    wait for it), and for chunks the manifest lists as unhashed (the
//!    source had not read them yet), the source's hash carried with each
//!    chunk is used. Verification checks the whole disk against the
//!    source's complete manifest at the end.
//! 7. Zero chunks are present from the start and never fetched.
//! 8. A guest write that fails leaves each block with its old content or
//!    the new one: blocks it made present (absent before, so the backing
//!    file holds a hole or a partial write there) are absent again
//!    ([`Engine::handle_write_failed`]) and fetched anew. Until the write is done,
//!    other guest requests for them wait.
//!
//! Chunks the destination already holds elsewhere (a local image found
//! through a content index) are filled from there instead of fetched: the
//! caller names them ([`Engine::handle_local_matches`]); a guest request or
//! the local filler ([`Engine::poll_local_background`]) claims one like a
//! fetch ([`Engine::poll_fill_local`]), the caller reads and checks the
//! local bytes and hands them in through [`Engine::handle_fetched`] like
//! fetched data (the same hash check, the same fill, the same sync), or
//! reports a local copy that no longer matches
//! ([`Engine::handle_local_failed`]): the chunk is then fetched from the
//! source. The background copier leaves matched chunks to the local
//! filler.
//!
//! A guest request for a chunk that only the background copier is fetching
//! starts its own, on-demand fetch of it (the background answer may wait
//! behind a bandwidth-delay product of other data); the first good answer
//! fills the chunk and later ones are [`Arrival::Duplicate`]s, never written.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use bitvec::prelude::*;

use crate::geometry::{Geometry, BLOCK_SIZE};
use crate::manifest::{ChunkKind, Manifest};

/// Consecutive hash mismatches of one chunk after which the source is taken
/// to have changed (invariant 6) and the engine stops fetching.
pub const MAX_CORRUPT_RETRIES: u32 = 4;

/// Why a chunk is being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    /// A guest request waits for it.
    OnDemand,
    /// The background copier asked for it.
    Background,
}

/// What the caller must do before a read can be served.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadPlan {
    /// Every block is present: read the backing file.
    Ready,
    /// Issue the fetches [`Engine::poll_fetch`] hands out, then wait for a
    /// change of one of the read's chunks ([`Engine::poll_wake`]) and plan
    /// again.
    Wait,
    /// The migration stopped; absent data cannot be had.
    Failed(Failure),
}

/// What the caller must do before a write can be applied.
#[derive(Debug, PartialEq, Eq)]
pub enum WritePlan {
    /// Write the data to the backing file, then call
    /// [`Engine::handle_write_done`] with this range of blocks (or
    /// [`Engine::handle_write_failed`] if the write failed).
    Ready(Range<u64>),
    /// Issue the fetches [`Engine::poll_fetch`] hands out (if any), wait
    /// for a change of one of the write's chunks, plan again.
    Wait,
    /// The write needs absent data that cannot be had: the migration failed.
    Failed(Failure),
}

/// A fetch to issue: one request to the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// The chunks, consecutive.
    pub chunks: Range<u64>,
    /// Why: its priority at the source.
    pub kind: FetchKind,
}

/// Requests waiting for chunks to wake (see [`Engine::poll_wake`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// Those waiting for any of these chunks.
    Chunks(Range<u64>),
    /// Every waiting request (the migration stopped, the manifest arrived).
    All,
}

/// Why the migration stopped. Guest writes are kept whatever the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The source is not the one the copy began with; `0` says how that
    /// was noticed.
    #[error("{0}; the source must not change after switchover; the destination's writes are kept")]
    SourceChanged(String),
    /// A chunk failed its hash check [`MAX_CORRUPT_RETRIES`] times in a row.
    #[error(
        "chunk {chunk} failed its hash check {streak} times in a row: \
         the source disk changed after switchover (it must stay unchanged); \
         the destination's writes are kept"
    )]
    CorruptStreak {
        /// The chunk.
        chunk: u64,
        /// Consecutive failed checks.
        streak: u32,
    },
    /// The source's manifest could not be had; `0` says why.
    #[error("cannot fetch the source's manifest: {0}")]
    NoManifest(String),
    /// Freshly created files could not be made durable; `0` says why.
    #[error("cannot make the new disk and state files durable: {0}")]
    FilesNotDurable(String),
}

/// Blocks of a fetched chunk to write into the backing file.
#[derive(Debug, PartialEq, Eq)]
pub struct FillPlan {
    /// The chunk.
    pub chunk: u64,
    /// Runs of blocks (absolute block numbers) to copy from the fetched data
    /// (or to zero, for a zero chunk).
    pub runs: Vec<Range<u64>>,
    /// The source said the chunk holds only zeros: deallocate (or zero) the
    /// runs instead of copying.
    pub zero: bool,
}

/// What the source sent for a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The chunk's bytes, with the hash the source's manifest gives them
    /// (not yet checked: [`Engine::handle_fetched`] checks).
    Data {
        /// The source's hash for the chunk.
        hash: [u8; 32],
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The chunk holds only zeros.
    Zero,
}

/// Result of handing fetched data to the engine.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The data matched its hash: write `FillPlan`'s blocks, then call
    /// [`Engine::handle_fill_done`].
    Fill(FillPlan),
    /// The data did not match its hash and was dropped; the chunk is absent
    /// again and will be fetched anew.
    Corrupt {
        /// The chunk.
        chunk: u64,
    },
    /// Another request for the chunk answered first (an on-demand read
    /// overtook a background fetch of it): nothing to write.
    Duplicate {
        /// The chunk.
        chunk: u64,
    },
}

/// Blocks whose present bits a sync round persists.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncBatch {
    /// Runs of blocks whose data writes completed before the round began.
    pub blocks: Vec<Range<u64>>,
    /// Chunks the guest wrote into.
    pub guest_chunks: Vec<u64>,
}

impl SyncBatch {
    /// Whether there is nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.guest_chunks.is_empty()
    }
}

/// Phase of the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Blocks are still absent.
    Copying,
    /// Every block is present.
    Complete,
    /// Stopped: the source changed or failed; the guest's writes are kept.
    Failed(Failure),
}

/// Counters, in bytes unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes fetched for guest requests.
    pub fetched_on_demand: u64,
    /// Bytes fetched by the background copier.
    pub fetched_background: u64,
    /// Bytes fetched but dropped for a hash mismatch.
    pub rejected_corrupt: u64,
    /// Fetched bytes not written because the guest had written them.
    pub discarded_guest_won: u64,
    /// Bytes fetched twice: a background fetch overtaken by an on-demand
    /// one for the same chunk, whichever answered second.
    pub duplicate: u64,
    /// Bytes filled from local copies (a content index) instead of
    /// fetched.
    pub filled_local: u64,
    /// Chunks whose local copy no longer matched the source's hash (the
    /// indexed file changed): fetched from the source instead.
    pub local_stale: u64,
}

/// A chunk being fetched: why, and by how many requests.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    kind: FetchKind,
    requests: u32,
    /// Filled from a local copy, not fetched: never fetched over it too.
    local: bool,
}

/// The engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    manifest: Option<Arc<Manifest>>,
    geo: Geometry,
    present: BitVec,
    guest_chunks: BitVec,
    fetching: HashMap<u64, Fetch>,
    filling: HashMap<u64, Vec<Range<u64>>>,
    unsynced: Vec<Range<u64>>,
    unsynced_guest: HashSet<u64>,
    /// Runs of blocks (start to end) that a guest write in flight made
    /// present: absent before it, their data is not in the backing file
    /// until it is done (invariant 8). Never overlapping: a write touching
    /// one waits.
    claimed: BTreeMap<u64, u64>,
    corrupt_streak: HashMap<u64, u32>,
    present_blocks: u64,
    bg_cursor: u64,
    background_paused: bool,
    error: Option<Failure>,
    counters: Counters,
    /// Fetches for guest requests not yet handed out by
    /// [`Engine::poll_fetch`].
    to_fetch: VecDeque<FetchRequest>,
    /// Chunks whose waiting requests are to be woken
    /// ([`Engine::poll_wake`]).
    to_wake: BTreeSet<u64>,
    /// Every waiting request is to be woken.
    wake_all: bool,
    /// Chunks with a local copy not tried yet (one bit per chunk; empty
    /// until [`Engine::handle_local_matches`]).
    local: BitVec,
    /// Where [`Engine::poll_local_background`] looks next.
    local_cursor: usize,
    /// Local fills claimed for guest requests, not yet handed out by
    /// [`Engine::poll_fill_local`].
    to_fill_local: VecDeque<u64>,
    /// Chunks a live source reported written during pre-copy
    /// ([`Engine::handle_changed`]): whatever a manifest says of them is
    /// out of date (they count as unhashed), and a zero one is fetched.
    changed: BitVec,
    /// Chunks reported written while their fill was being written: the
    /// fill's blocks do not become present, and the chunk is not fetched
    /// again until that write is done (a late stale write must not land
    /// over the new data).
    stale_fills: HashSet<u64>,
    /// Bumped by every [`Engine::handle_changed`].
    change_seq: u64,
    /// Chunk → the [`Engine::change_seq`] of its last change: an answer
    /// to a request issued before it may hold the old bytes.
    changed_at: HashMap<u64, u64>,
}

impl Engine {
    /// An engine for a source of geometry `geo` whose manifest has not
    /// arrived yet, resuming from the persisted `present` bits (one per
    /// block) and `guest_chunks` bits (one per chunk); pass empty bit
    /// vectors for a fresh start. Guest I/O is served at once; the
    /// background copier starts with [`Engine::handle_manifest`].
    pub fn new(geo: Geometry, present: BitVec, guest_chunks: BitVec) -> Self {
        let mut present = present;
        present.resize(geo.blocks() as usize, false);
        let mut guest_chunks = guest_chunks;
        guest_chunks.resize(geo.chunks() as usize, false);
        let present_blocks = present.count_ones() as u64;
        Self {
            manifest: None,
            geo,
            present,
            guest_chunks,
            fetching: HashMap::new(),
            filling: HashMap::new(),
            unsynced: Vec::new(),
            unsynced_guest: HashSet::new(),
            claimed: BTreeMap::new(),
            corrupt_streak: HashMap::new(),
            present_blocks,
            bg_cursor: 0,
            background_paused: false,
            error: None,
            counters: Counters::default(),
            to_fetch: VecDeque::new(),
            to_wake: BTreeSet::new(),
            wake_all: false,
            local: BitVec::new(),
            local_cursor: 0,
            to_fill_local: VecDeque::new(),
            changed: BitVec::new(),
            stale_fills: HashSet::new(),
            change_seq: 0,
            changed_at: HashMap::new(),
        }
    }

    /// [`Engine::new`] followed by [`Engine::handle_manifest`].
    pub fn with_manifest(manifest: Arc<Manifest>, present: BitVec, guest_chunks: BitVec) -> Self {
        let mut e = Self::new(manifest.geometry(), present, guest_chunks);
        e.handle_manifest(manifest);
        e
    }

    /// The source's manifest arrived. Blocks of zero chunks become present
    /// (the backing file is sparse, so they read as zeros) and are never
    /// fetched; the background copier can start.
    ///
    /// # Panics
    /// If the manifest's geometry is not the engine's.
    pub fn handle_manifest(&mut self, manifest: Arc<Manifest>) {
        assert_eq!(
            manifest.geometry(),
            self.geo,
            "manifest of another geometry"
        );
        let manifest = self.without_changed(manifest);
        // Runs of consecutive zero chunks, filled a run at a time: a 1 TiB
        // disk has 16 M chunks.
        let kinds = manifest.chunks();
        let mut c = 0usize;
        while c < kinds.len() {
            if kinds[c] != ChunkKind::Zero || self.filling.contains_key(&(c as u64)) {
                c += 1;
                continue;
            }
            let start = c;
            while c < kinds.len()
                && kinds[c] == ChunkKind::Zero
                && (self.filling.is_empty() || !self.filling.contains_key(&(c as u64)))
            {
                c += 1;
            }
            let lo = self.geo.chunk_blocks(start as u64).start as usize;
            let hi = self.geo.chunk_blocks(c as u64 - 1).end as usize;
            let bits = &mut self.present[lo..hi];
            self.present_blocks += (bits.len() - bits.count_ones()) as u64;
            bits.fill(true);
        }
        self.manifest = Some(manifest);
        self.wake_all = true;
    }

    /// The source's complete manifest (every hash known, see
    /// [`Manifest::is_complete`]), fetched for verification: replaces the
    /// first one, so chunks fetched again are checked against its hashes.
    ///
    /// # Panics
    /// If the manifest's geometry is not the engine's.
    pub fn handle_complete_manifest(&mut self, manifest: Arc<Manifest>) {
        assert_eq!(
            manifest.geometry(),
            self.geo,
            "manifest of another geometry"
        );
        self.manifest = Some(manifest);
    }

    /// `manifest` with every chunk reported changed listed as unhashed:
    /// a manifest taken before a write still names the old hash (or a
    /// hole).
    fn without_changed(&self, manifest: Arc<Manifest>) -> Arc<Manifest> {
        if self.changed.not_any() {
            return manifest;
        }
        let mut m = (*manifest).clone();
        for c in self.changed.iter_ones() {
            m.set_chunk(c as u64, ChunkKind::Unhashed);
        }
        Arc::new(m)
    }

    /// A live source reports `chunks` written since the destination copied
    /// them (pre-copy, docs/decisions/precopy-switchover.md): each chunk
    /// the guest here never wrote becomes absent, its hash unknown (the
    /// source's hash comes with the data), and is fetched again. An answer
    /// in flight for it is dropped when it arrives (it may hold the old
    /// bytes); a fill being written does not make it present. Returns the
    /// blocks made absent, for the caller to clear in the state file
    /// before it acknowledges the change.
    pub fn handle_changed(&mut self, chunks: &[Range<u64>]) -> Vec<Range<u64>> {
        if self.changed.is_empty() {
            self.changed.resize(self.geo.chunks() as usize, false);
        }
        let n = self.geo.chunks();
        self.change_seq += 1;
        // Copied only if another holder shares it (a 1 TiB disk's manifest
        // is half a GiB).
        let mut manifest = self.manifest.take();
        let mut cleared = Vec::new();
        for r in chunks {
            for c in r.start.min(n)..r.end.min(n) {
                if self.guest_chunks[c as usize] {
                    continue;
                }
                self.changed.set(c as usize, true);
                self.changed_at.insert(c, self.change_seq);
                if let Some(m) = manifest.as_mut() {
                    Arc::make_mut(m).set_chunk(c, ChunkKind::Unhashed);
                }
                if self.fetching.remove(&c).is_some() {
                    self.wake(c..c + 1);
                }
                if self.filling.remove(&c).is_some() {
                    self.stale_fills.insert(c);
                }
                self.corrupt_streak.remove(&c);
                let b = self.geo.chunk_blocks(c);
                let bits = &mut self.present[b.start as usize..b.end as usize];
                let had = bits.count_ones() as u64;
                // The copier's cursor is not pulled back: what was never
                // copied goes first, the changed chunks when it comes
                // round again (a hot chunk is written again meanwhile).
                if had == 0 {
                    continue;
                }
                self.present_blocks -= had;
                bits.fill(false);
                self.drop_unsynced(&b);
                cleared.push(b);
            }
        }
        self.manifest = manifest;
        cleared
    }

    /// The count of [`Engine::handle_changed`] calls so far: taken when a
    /// request to the source is issued, and handed back with its answer
    /// ([`Engine::handle_fetched_at`]).
    pub fn change_seq(&self) -> u64 {
        self.change_seq
    }

    /// Whether `chunk` was reported changed after a request issued at
    /// `issued` ([`Engine::change_seq`]).
    fn changed_after(&self, chunk: u64, issued: u64) -> bool {
        self.changed_at.get(&chunk).is_some_and(|at| *at > issued)
    }

    /// Forgets the not yet persisted present bits of `b`.
    fn drop_unsynced(&mut self, b: &Range<u64>) {
        let mut kept = Vec::with_capacity(self.unsynced.len());
        for r in std::mem::take(&mut self.unsynced) {
            if r.end <= b.start || r.start >= b.end {
                kept.push(r);
                continue;
            }
            if r.start < b.start {
                kept.push(r.start..b.start);
            }
            if r.end > b.end {
                kept.push(b.end..r.end);
            }
        }
        self.unsynced = kept;
    }

    /// Whether the manifest has arrived.
    pub fn has_manifest(&self) -> bool {
        self.manifest.is_some()
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The source's manifest, once it has arrived.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// Whether block `block` is present (its data is in the backing file).
    pub fn is_present(&self, block: u64) -> bool {
        self.present[block as usize]
    }

    /// Whether the guest has written into chunk `chunk`.
    pub fn guest_wrote(&self, chunk: u64) -> bool {
        self.guest_chunks[chunk as usize]
    }

    /// Bytes present at the destination (zero chunks included).
    pub fn present_bytes(&self) -> u64 {
        let full = self.present_blocks * u64::from(BLOCK_SIZE);
        // The last block may be short.
        let last = self.geo.blocks().saturating_sub(1);
        if self.geo.blocks() > 0 && self.present[last as usize] {
            let r = self.geo.block_bytes(last);
            full - u64::from(BLOCK_SIZE) + (r.end - r.start)
        } else {
            full
        }
    }

    /// Number of chunks the guest has written into.
    pub fn guest_chunk_count(&self) -> u64 {
        self.guest_chunks.count_ones() as u64
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        if let Some(e) = &self.error {
            Phase::Failed(e.clone())
        } else if self.present_blocks == self.geo.blocks() && self.manifest.is_some() {
            Phase::Complete
        } else {
            Phase::Copying
        }
    }

    /// Stops the migration (e.g. the source changed); wakes every waiting
    /// request.
    pub fn fail(&mut self, reason: Failure) {
        if self.error.is_none() {
            self.error = Some(reason);
        }
        self.wake_all = true;
    }

    /// The next fetch to issue for guest requests (planned by
    /// [`Engine::plan_read`] and [`Engine::plan_write`]).
    pub fn poll_fetch(&mut self) -> Option<FetchRequest> {
        self.to_fetch.pop_front()
    }

    /// The next chunks whose waiting requests to wake: their state changed
    /// (filled, a fetch or fill failed, a write done), so a request
    /// waiting for them plans again.
    pub fn poll_wake(&mut self) -> Option<Wake> {
        if self.wake_all {
            self.wake_all = false;
            self.to_wake.clear();
            return Some(Wake::All);
        }
        let first = self.to_wake.pop_first()?;
        let mut end = first + 1;
        while self.to_wake.remove(&end) {
            end += 1;
        }
        Some(Wake::Chunks(first..end))
    }

    fn wake(&mut self, chunks: Range<u64>) {
        if !self.wake_all {
            self.to_wake.extend(chunks);
        }
    }

    /// Holds back (or releases) the background copier.
    pub fn set_background_paused(&mut self, paused: bool) {
        self.background_paused = paused;
    }

    /// Whether the background copier is held back.
    pub fn background_paused(&self) -> bool {
        self.background_paused
    }

    /// Number of chunks being fetched.
    pub fn in_flight(&self) -> usize {
        self.fetching.len()
    }

    fn chunk_present(&self, chunk: u64) -> bool {
        let b = self.geo.chunk_blocks(chunk);
        self.present[b.start as usize..b.end as usize].all()
    }

    fn blocks_present(&self, blocks: Range<u64>) -> bool {
        self.present[blocks.start as usize..blocks.end as usize].all()
    }

    /// Whether a guest write in flight made any of `blocks` present (see
    /// [`Engine::claimed`]).
    fn blocks_claimed(&self, blocks: &Range<u64>) -> bool {
        !self.claimed.is_empty()
            && self
                .claimed
                .range(..blocks.end)
                .next_back()
                .is_some_and(|(_, &end)| end > blocks.start)
    }

    /// Marks `chunks` (absent; not in flight, or in flight in the
    /// background when `kind` is on-demand) as fetching by one more request
    /// and groups them into consecutive ranges.
    fn start_fetches(&mut self, chunks: Vec<u64>, kind: FetchKind) -> Vec<Range<u64>> {
        // Chunks with a local copy, not in flight: filled from it.
        let chunks = if self.local.is_empty() {
            chunks
        } else {
            let mut remote = Vec::with_capacity(chunks.len());
            for c in chunks {
                if self.local[c as usize] && !self.fetching.contains_key(&c) {
                    self.claim_local(c, kind);
                    self.to_fill_local.push_back(c);
                } else {
                    remote.push(c);
                }
            }
            remote
        };
        let ranges = self.mark_fetching(chunks, kind);
        self.to_fetch.extend(ranges.iter().map(|r| FetchRequest {
            chunks: r.clone(),
            kind,
        }));
        ranges
    }

    fn mark_fetching(&mut self, chunks: Vec<u64>, kind: FetchKind) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for c in chunks {
            self.fetching
                .entry(c)
                .and_modify(|f| {
                    f.kind = kind;
                    f.requests += 1;
                })
                .or_insert(Fetch {
                    kind,
                    requests: 1,
                    local: false,
                });
            match ranges.last_mut() {
                Some(r) if r.end == c => r.end += 1,
                _ => ranges.push(c..c + 1),
            }
        }
        ranges
    }

    /// Whether a read of `len` bytes at `offset` can be served from the
    /// backing file now (every block present). Changes nothing.
    pub fn readable(&self, offset: u64, len: u64) -> bool {
        let blocks = self.geo.blocks_touching(offset, len);
        self.blocks_present(blocks.clone()) && !self.blocks_claimed(&blocks)
    }

    /// Whether a guest request needing `chunk` must start a fetch of it:
    /// none is in flight, or only a background one. That one may wait
    /// behind a bandwidth-delay product of other background data (and
    /// answers with its whole batch), so the guest's request asks again
    /// at on-demand priority; the first answer fills the chunk
    /// ([`Arrival::Duplicate`] for the other).
    fn must_fetch(&self, chunk: u64) -> bool {
        !self.filling.contains_key(&chunk)
            && !self.stale_fills.contains(&chunk)
            && self
                .fetching
                .get(&chunk)
                .is_none_or(|f| f.kind == FetchKind::Background && !f.local)
    }

    /// Plans a guest read of `len` bytes at `offset` (inside the disk).
    pub fn plan_read(&mut self, offset: u64, len: u64) -> ReadPlan {
        let blocks = self.geo.blocks_touching(offset, len);
        if self.blocks_present(blocks.clone()) {
            if self.blocks_claimed(&blocks) {
                // A guest write in flight makes them present: its data (or,
                // if it fails, the source's) is not there yet.
                return ReadPlan::Wait;
            }
            return ReadPlan::Ready;
        }
        if let Some(e) = &self.error {
            return ReadPlan::Failed(e.clone());
        }
        let mut to_start = Vec::new();
        for c in self.geo.chunks_touching(offset, len) {
            let cb = self.geo.chunk_blocks(c);
            let lo = cb.start.max(blocks.start);
            let hi = cb.end.min(blocks.end);
            if self.blocks_present(lo..hi) || !self.must_fetch(c) {
                continue;
            }
            to_start.push(c);
        }
        self.start_fetches(to_start, FetchKind::OnDemand);
        ReadPlan::Wait
    }

    /// Plans a guest write of `len` bytes at `offset` (inside the disk).
    ///
    /// On [`WritePlan::Ready`] the blocks are already marked present, so a
    /// fetch that lands later cannot overwrite them (invariant 3).
    pub fn plan_write(&mut self, offset: u64, len: u64) -> WritePlan {
        let blocks = self.geo.blocks_touching(offset, len);
        if blocks.is_empty() {
            return WritePlan::Ready(blocks);
        }
        let bs = u64::from(BLOCK_SIZE);
        // Another write in flight made some of them present: if it fails
        // they become absent again (invariant 8).
        let mut must_wait = self.blocks_claimed(&blocks);
        let mut to_start = Vec::new();
        // Chunks being filled: their fill may write blocks we are about to
        // write; wait until it is done.
        for c in self.geo.chunks_touching(offset, len) {
            if self.filling.contains_key(&c) || self.stale_fills.contains(&c) {
                must_wait = true;
            }
        }
        // Partial head and tail blocks that are absent need their old data.
        let end = offset + len;
        let mut partial = Vec::new();
        if !offset.is_multiple_of(bs) {
            partial.push(blocks.start);
        }
        let tail_block = blocks.end - 1;
        let tail_end = self.geo.block_bytes(tail_block).end;
        if !end.is_multiple_of(bs) && end != tail_end && !partial.contains(&tail_block) {
            partial.push(tail_block);
        }
        for b in partial {
            if self.present[b as usize] {
                continue;
            }
            must_wait = true;
            let c = self.geo.chunk_of_block(b);
            if self.must_fetch(c) && !to_start.contains(&c) {
                to_start.push(c);
            }
        }
        if must_wait {
            if !to_start.is_empty() {
                if let Some(e) = &self.error {
                    return WritePlan::Failed(e.clone());
                }
            }
            to_start.sort_unstable();
            self.start_fetches(to_start, FetchKind::OnDemand);
            return WritePlan::Wait;
        }
        let mut run: Option<Range<u64>> = None;
        for b in blocks.clone() {
            if !self.present[b as usize] {
                self.present.set(b as usize, true);
                self.present_blocks += 1;
                match &mut run {
                    Some(r) if r.end == b => r.end += 1,
                    _ => {
                        if let Some(r) = run.replace(b..b + 1) {
                            self.claimed.insert(r.start, r.end);
                        }
                    }
                }
            }
        }
        if let Some(r) = run {
            self.claimed.insert(r.start, r.end);
        }
        for c in self.geo.chunks_touching(offset, len) {
            self.guest_chunks.set(c as usize, true);
            self.unsynced_guest.insert(c);
        }
        WritePlan::Ready(blocks)
    }

    /// The guest's write of `blocks` reached the backing file (not yet
    /// synced).
    pub fn handle_write_done(&mut self, blocks: Range<u64>) {
        self.wake_blocks(&blocks);
        self.take_claims(&blocks);
        if !blocks.is_empty() {
            self.unsynced.push(blocks);
        }
    }

    /// The guest's write of `blocks` failed (e.g. a full filesystem): what
    /// reached the backing file is unknown. The blocks it made present
    /// hold no known data (a hole, or part of the write) and are absent
    /// again, to be fetched anew; the others keep what they hold (their old
    /// data, or part of the write), as after a write cut off by a crash
    /// (invariants 1 and 8).
    pub fn handle_write_failed(&mut self, blocks: Range<u64>) {
        self.wake_blocks(&blocks);
        for r in self.take_claims(&blocks) {
            for b in r {
                if self.present[b as usize] {
                    self.present.set(b as usize, false);
                    self.present_blocks -= 1;
                }
            }
        }
    }

    /// Wakes the requests waiting for the chunks of `blocks`.
    fn wake_blocks(&mut self, blocks: &Range<u64>) {
        if let (Some(first), Some(last)) = (blocks.clone().next(), blocks.clone().last()) {
            let chunks = self.geo.chunk_of_block(first)..self.geo.chunk_of_block(last) + 1;
            self.wake(chunks);
        }
    }

    /// Removes and returns the claims of the write of `blocks` (every claim
    /// inside them is that write's: others wait while one overlaps).
    fn take_claims(&mut self, blocks: &Range<u64>) -> Vec<Range<u64>> {
        if self.claimed.is_empty() {
            return Vec::new();
        }
        let starts: Vec<u64> = self
            .claimed
            .range(blocks.start..blocks.end)
            .map(|(&s, _)| s)
            .collect();
        starts
            .into_iter()
            .filter_map(|s| self.claimed.remove(&s).map(|e| s..e))
            .collect()
    }

    /// Chunks whose content a local copy holds (found in a content index
    /// by the source's hash). Those absent, not in flight and never written
    /// by the guest are filled from it ([`Engine::poll_local_background`],
    /// or a guest request's [`Engine::poll_fill_local`]) instead of
    /// fetched. Returns how many were taken.
    pub fn handle_local_matches(&mut self, chunks: &[u64]) -> u64 {
        if self.local.is_empty() {
            self.local = bitvec![0; self.geo.chunks() as usize];
        }
        let mut n = 0;
        for &c in chunks {
            if c >= self.geo.chunks()
                || self.guest_chunks[c as usize]
                || self.fetching.contains_key(&c)
                || self.filling.contains_key(&c)
                || self.chunk_present(c)
            {
                continue;
            }
            if !self.local[c as usize] {
                self.local.set(c as usize, true);
                n += 1;
            }
        }
        self.local_cursor = 0;
        n
    }

    fn claim_local(&mut self, chunk: u64, kind: FetchKind) {
        self.local.set(chunk as usize, false);
        self.fetching.insert(
            chunk,
            Fetch {
                kind,
                requests: 1,
                local: true,
            },
        );
    }

    /// The next chunk a guest request needs that is to be filled from its
    /// local copy: read it, check it, and hand it in through
    /// [`Engine::handle_fetched`] (or [`Engine::handle_local_failed`]).
    pub fn poll_fill_local(&mut self) -> Option<u64> {
        self.to_fill_local.pop_front()
    }

    /// Up to `max` chunks to fill from their local copies in the
    /// background, claimed as [`Engine::poll_fill_local`]'s are; empty
    /// when none is left (or the migration failed). A held-back copier
    /// ([`Engine::set_background_paused`]) does not hold these back: they
    /// cost the link nothing.
    pub fn poll_local_background(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        if self.error.is_some() || self.local.is_empty() {
            return out;
        }
        while out.len() < max {
            let Some(i) = self.local[self.local_cursor..].first_one() else {
                break;
            };
            let c = (self.local_cursor + i) as u64;
            self.local_cursor += i + 1;
            if self.fetching.contains_key(&c)
                || self.filling.contains_key(&c)
                || self.chunk_present(c)
            {
                self.local.set(c as usize, false);
                continue;
            }
            self.claim_local(c, FetchKind::Background);
            out.push(c);
        }
        out
    }

    /// The local copy of `chunk` could not be read or no longer matches
    /// the source's hash: the chunk is absent again and is fetched from
    /// the source like any other.
    pub fn handle_local_failed(&mut self, chunk: u64) {
        if self.fetching.get(&chunk).is_some_and(|f| f.local) {
            self.fetching.remove(&chunk);
            self.counters.local_stale += 1;
        }
        self.wake(chunk..chunk + 1);
    }

    /// Whether some chunks are still to be filled from local copies.
    pub fn local_pending(&self) -> bool {
        !self.local.is_empty() && self.local[self.local_cursor.min(self.local.len())..].any()
    }

    /// The next range of chunks for the background copier, at most
    /// `max_chunks` long, or `None` when nothing is left to start (or the
    /// copier is held back, or the migration failed).
    pub fn poll_background(&mut self, max_chunks: u64) -> Option<Range<u64>> {
        if self.background_paused || self.error.is_some() {
            return None;
        }
        self.manifest.as_ref()?;
        let n = self.geo.chunks();
        // Any absent chunk: zero chunks are present from the manifest's
        // arrival on, absent again only when made so by
        // [`Engine::refetch`].
        // Chunks with a local copy are the local filler's.
        let wanted = |e: &Self, c: u64| {
            !e.fetching.contains_key(&c)
                && !e.filling.contains_key(&c)
                && !e.stale_fills.contains(&c)
                && !e.chunk_present(c)
                && (e.local.is_empty() || !e.local[c as usize])
        };
        // One pass from the cursor, wrapping once, so chunks passed over
        // while in flight (and later failed) are found again.
        for step in 0..n {
            let c = (self.bg_cursor + step) % n;
            if wanted(self, c) {
                let mut end = c + 1;
                while end < n && end - c < max_chunks && wanted(self, end) {
                    end += 1;
                }
                self.bg_cursor = end % n.max(1);
                let r = self.mark_fetching((c..end).collect(), FetchKind::Background);
                debug_assert_eq!(r.len(), 1);
                return Some(c..end);
            }
        }
        None
    }

    /// A fetch of `chunks` failed without data (transport error); they are
    /// absent again and may be fetched anew.
    pub fn handle_fetch_failed(&mut self, chunks: Range<u64>) {
        self.handle_fetch_failed_at(chunks, u64::MAX);
    }

    /// [`Engine::handle_fetch_failed`] for a request issued at `issued`
    /// ([`Engine::change_seq`]): chunks changed since are another
    /// request's now, and left alone.
    pub fn handle_fetch_failed_at(&mut self, chunks: Range<u64>, issued: u64) {
        self.wake(chunks.clone());
        for c in chunks {
            if self.changed_after(c, issued) {
                continue;
            }
            if let Some(f) = self.fetching.get_mut(&c) {
                f.requests -= 1;
                if f.requests == 0 {
                    self.fetching.remove(&c);
                }
            }
        }
    }

    /// The source's answer for `chunk` arrived. Data is checked against
    /// the manifest's hash, or before the manifest arrives against the hash
    /// the source sent with it (invariant 5); a zero answer must match a
    /// zero chunk. On a match the chunk is marked as filling and the blocks
    /// still absent are named for writing (invariant 3).
    pub fn handle_fetched(&mut self, chunk: u64, payload: &Payload) -> Arrival {
        self.handle_fetched_at(chunk, payload, u64::MAX)
    }

    /// [`Engine::handle_fetched`] for the answer to a request issued at
    /// `issued` ([`Engine::change_seq`]): a chunk a live source reported
    /// written since may hold the old bytes, and is dropped as a
    /// duplicate (the request issued after the change brings the new ones).
    pub fn handle_fetched_at(&mut self, chunk: u64, payload: &Payload, issued: u64) -> Arrival {
        let stale = self.changed_after(chunk, issued);
        let fetch = if stale {
            None
        } else {
            self.fetching.get(&chunk).copied()
        };
        let Some(fetch) = fetch else {
            // Another request for it answered first.
            if let Payload::Data { bytes, .. } = payload {
                self.counters.duplicate += bytes.len() as u64;
            }
            return Arrival::Duplicate { chunk };
        };
        let kind = fetch.kind;
        let expected = self.manifest.as_ref().map(|m| m.chunk(chunk));
        let len = self.geo.chunk_len(chunk) as usize;
        let (ok, wire_len) = match payload {
            Payload::Data { bytes, hash } => {
                // An unhashed chunk's hash is the one the source computed
                // as it read the chunk to send it: the bytes still must
                // match it.
                let want = match expected {
                    Some(ChunkKind::Data(h)) => Some(h),
                    Some(ChunkKind::Zero) => None,
                    Some(ChunkKind::Unhashed) | None => Some(*hash),
                };
                let ok = want
                    .is_some_and(|h| bytes.len() == len && *blake3::hash(bytes).as_bytes() == h);
                (ok, bytes.len() as u64)
            }
            // An allocated chunk that holds only zeros is answered as zero.
            Payload::Zero => (
                matches!(expected, None | Some(ChunkKind::Zero | ChunkKind::Unhashed)),
                0,
            ),
        };
        if !ok {
            self.counters.rejected_corrupt += wire_len;
            // Another request for the chunk may still bring good data; the
            // streak counts rounds of requests, not their answers.
            if fetch.requests > 1 {
                if let Some(f) = self.fetching.get_mut(&chunk) {
                    f.requests -= 1;
                }
                return Arrival::Corrupt { chunk };
            }
            self.fetching.remove(&chunk);
            self.wake(chunk..chunk + 1);
            let streak = {
                let s = self.corrupt_streak.entry(chunk).or_insert(0);
                *s += 1;
                *s
            };
            if streak >= MAX_CORRUPT_RETRIES {
                self.fail(Failure::CorruptStreak { chunk, streak });
            }
            return Arrival::Corrupt { chunk };
        }
        // The first good answer: any other request's answer is a duplicate.
        self.fetching.remove(&chunk);
        let zero = matches!(payload, Payload::Zero);
        let data_len = if zero { 0 } else { len as u64 };
        self.corrupt_streak.remove(&chunk);
        match kind {
            _ if fetch.local => self.counters.filled_local += data_len,
            FetchKind::OnDemand => self.counters.fetched_on_demand += data_len,
            FetchKind::Background => self.counters.fetched_background += data_len,
        }
        let mut runs: Vec<Range<u64>> = Vec::new();
        for b in self.geo.chunk_blocks(chunk) {
            if self.present[b as usize] {
                let r = self.geo.block_bytes(b);
                self.counters.discarded_guest_won += r.end - r.start;
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == b => r.end += 1,
                _ => runs.push(b..b + 1),
            }
        }
        self.filling.insert(chunk, runs.clone());
        Arrival::Fill(FillPlan { chunk, runs, zero })
    }

    /// The blocks named by the fill of `chunk` were written to the backing
    /// file (not yet synced): they become present.
    pub fn handle_fill_done(&mut self, chunk: u64) {
        self.wake(chunk..chunk + 1);
        self.stale_fills.remove(&chunk);
        let Some(runs) = self.filling.remove(&chunk) else {
            return;
        };
        for r in runs {
            for b in r.clone() {
                if !self.present[b as usize] {
                    self.present.set(b as usize, true);
                    self.present_blocks += 1;
                }
            }
            self.unsynced.push(r);
        }
    }

    /// Writing the fill of `chunk` failed: its blocks stay absent.
    pub fn handle_fill_failed(&mut self, chunk: u64) {
        self.wake(chunk..chunk + 1);
        self.stale_fills.remove(&chunk);
        self.filling.remove(&chunk);
    }

    /// Bytes written to the backing file whose present bits are not yet
    /// persisted.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced
            .iter()
            .map(|r| (r.end - r.start) * u64::from(BLOCK_SIZE))
            .sum()
    }

    /// Starts a sync round: takes the blocks whose writes completed so far.
    /// The caller syncs the backing file, then persists exactly these
    /// present bits (and guest chunk bits), then calls
    /// [`Engine::handle_sync_done`] — or [`Engine::handle_sync_failed`] to
    /// give them back.
    pub fn begin_sync(&mut self) -> SyncBatch {
        let mut blocks = std::mem::take(&mut self.unsynced);
        blocks.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(blocks.len());
        for r in blocks {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut guest_chunks: Vec<u64> = self.unsynced_guest.drain().collect();
        guest_chunks.sort_unstable();
        SyncBatch {
            blocks: merged,
            guest_chunks,
        }
    }

    /// The round's bits are durable.
    pub fn handle_sync_done(&mut self, _batch: SyncBatch) {}

    /// The round failed: its blocks stay unsynced for the next round.
    pub fn handle_sync_failed(&mut self, batch: SyncBatch) {
        self.unsynced.extend(batch.blocks);
        self.unsynced_guest.extend(batch.guest_chunks);
    }

    /// Chunks whose data was found not to be the source's once the copy was
    /// complete (a failed verification): those the guest never wrote, and
    /// that are not being fetched or filled, become absent again, so they
    /// are fetched anew. Returns the blocks made absent (for the caller to
    /// clear in the state file).
    pub fn refetch(&mut self, chunks: &[u64]) -> Vec<Range<u64>> {
        let mut cleared = Vec::new();
        for &c in chunks {
            if c >= self.geo.chunks()
                || self.guest_chunks[c as usize]
                || self.fetching.contains_key(&c)
                || self.filling.contains_key(&c)
            {
                continue;
            }
            let b = self.geo.chunk_blocks(c);
            let bits = &mut self.present[b.start as usize..b.end as usize];
            self.present_blocks -= bits.count_ones() as u64;
            bits.fill(false);
            // Not yet persisted bits of these blocks must not be.
            self.drop_unsynced(&b);
            self.bg_cursor = self.bg_cursor.min(c);
            cleared.push(b);
        }
        cleared
    }

    /// Whether chunk `chunk` is to be verified against the source once the
    /// copy is complete: the guest never wrote it (its data is the
    /// guest's otherwise). See [`Engine::verifiable_chunks`].
    pub fn verifiable(&self, chunk: u64) -> bool {
        !self.guest_chunks[chunk as usize]
    }

    /// The chunks to verify once the copy is complete, with what the
    /// source's manifest says of them: every chunk the guest never wrote,
    /// data chunks against their hash, zero chunks against zeros. Empty
    /// before the manifest has arrived.
    pub fn verifiable_chunks(&self) -> impl Iterator<Item = (u64, ChunkKind)> + '_ {
        let m = self.manifest.clone();
        (0..self.geo.chunks()).filter_map(move |c| {
            let kind = m.as_ref()?.chunk(c);
            self.verifiable(c).then_some((c, kind))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 65536;

    fn data(c: u64, v: u8) -> Vec<u8> {
        vec![v.wrapping_add(c as u8); CS as usize]
    }

    /// Four chunks: 0 and 1 data, 2 zero, 3 data; the first manifest.
    fn engine() -> Engine {
        let geo = Geometry::new(4 * u64::from(CS), CS);
        let kinds = vec![
            ChunkKind::of(&data(0, 1)),
            ChunkKind::of(&data(1, 1)),
            ChunkKind::Zero,
            ChunkKind::of(&data(3, 1)),
        ];
        Engine::with_manifest(
            Arc::new(Manifest::new(geo, kinds)),
            BitVec::new(),
            BitVec::new(),
        )
    }

    fn payload(bytes: Vec<u8>) -> Payload {
        Payload::Data {
            hash: *blake3::hash(&bytes).as_bytes(),
            bytes,
        }
    }

    /// Fetches and fills `chunk` with `bytes` through the background copier.
    fn fill(e: &mut Engine, chunk: u64, bytes: Vec<u8>) {
        assert_eq!(e.poll_background(1), Some(chunk..chunk + 1));
        match e.handle_fetched(chunk, &payload(bytes)) {
            Arrival::Fill(_) => e.handle_fill_done(chunk),
            other => panic!("chunk {chunk}: {other:?}"),
        }
    }

    #[test]
    fn a_changed_chunk_is_absent_again_and_fetched_with_the_sources_new_hash() {
        let mut e = engine();
        fill(&mut e, 0, data(0, 1));
        fill(&mut e, 1, data(1, 1));
        let batch = e.begin_sync();
        assert_eq!(batch.blocks, vec![0..32]);
        // Chunk 3 is in flight, chunk 2 (a hole) was written at the source.
        assert_eq!(e.poll_background(1), Some(3..4));
        let cleared = e.handle_changed(&[0..1, 2..4]);
        assert_eq!(cleared, vec![0..16, 32..48], "chunk 0 and the zero chunk 2");
        assert!(!e.is_present(0) && e.is_present(16) && !e.is_present(32));
        assert_eq!(e.phase(), Phase::Copying);
        // The answer in flight (old bytes) is dropped, never written.
        assert_eq!(
            e.handle_fetched(3, &payload(data(3, 1))),
            Arrival::Duplicate { chunk: 3 }
        );
        // The new bytes are accepted with the hash the source sends,
        // the old manifest's hash (or hole) no longer applies.
        fill(&mut e, 0, data(0, 9));
        fill(&mut e, 2, data(2, 9));
        fill(&mut e, 3, data(3, 9));
        assert_eq!(e.poll_background(1), None);
        assert_eq!(e.phase(), Phase::Complete);
    }

    #[test]
    fn an_answer_to_a_request_issued_before_a_change_is_never_written() {
        let mut e = engine();
        // Requested before the change (old bytes on the way) ...
        assert_eq!(e.poll_background(1), Some(0..1));
        let issued = e.change_seq();
        e.handle_changed(&[0..1]);
        // ... and again after it, by the copier (after the chunks it
        // had not reached).
        let again = std::iter::from_fn(|| e.poll_background(1)).find(|r| r.start == 0);
        assert_eq!(again, Some(0..1));
        let again = e.change_seq();
        // The old answer arrives first: dropped, the new request still counts.
        assert_eq!(
            e.handle_fetched_at(0, &payload(data(0, 1)), issued),
            Arrival::Duplicate { chunk: 0 }
        );
        e.handle_fetch_failed_at(0..1, issued);
        assert!(matches!(
            e.handle_fetched_at(0, &payload(data(0, 2)), again),
            Arrival::Fill(_)
        ));
    }

    /// A change behind the copier does not pull it back: the chunks it
    /// never copied go first (a pre-copy's copy rate halved while each
    /// round of changes rewound it).
    #[test]
    fn a_change_behind_the_copier_waits_for_its_next_pass() {
        let mut e = engine();
        fill(&mut e, 0, data(0, 1));
        fill(&mut e, 1, data(1, 1));
        e.handle_changed(&[0..1]);
        let order: Vec<u64> = std::iter::from_fn(|| e.poll_background(1))
            .map(|r| r.start)
            .collect();
        assert_eq!(order, vec![3, 0]);
    }

    #[test]
    fn a_fill_being_written_when_its_chunk_changes_does_not_make_it_present() {
        let mut e = engine();
        assert_eq!(e.poll_background(1), Some(0..1));
        assert!(matches!(
            e.handle_fetched(0, &payload(data(0, 1))),
            Arrival::Fill(_)
        ));
        assert_eq!(e.handle_changed(&[0..1]), vec![]);
        // Not fetched again while the stale write is still landing.
        assert_eq!(e.poll_background(1), Some(1..2));
        e.handle_fill_done(0);
        assert!(!e.is_present(0));
        let mut next = Vec::new();
        while let Some(r) = e.poll_background(1) {
            next.push(r.start);
        }
        assert_eq!(
            next,
            vec![3, 0],
            "fetched again once its stale fill is done"
        );
    }

    #[test]
    fn a_manifest_arriving_after_a_change_does_not_bring_back_the_old_hash() {
        let geo = Geometry::new(4 * u64::from(CS), CS);
        let mut e = Engine::new(geo, BitVec::new(), BitVec::new());
        e.handle_changed(&[2..3]);
        let kinds = vec![
            ChunkKind::Zero,
            ChunkKind::Zero,
            ChunkKind::Zero,
            ChunkKind::Zero,
        ];
        e.handle_manifest(Arc::new(Manifest::new(geo, kinds)));
        // The hole the manifest names was written: fetched, not zero.
        assert!(!e.is_present(32));
        fill(&mut e, 2, data(2, 5));
        assert_eq!(e.phase(), Phase::Complete);
    }
}
