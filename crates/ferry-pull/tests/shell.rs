//! The I/O shell against an in-memory source: guest reads and writes of
//! absent blocks, the background copy to a verified disk, fetch errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::engine::{FetchKind, Payload};
use ferry_core::{ChunkKind, Geometry, Manifest};
use ferry_device::BlockDevice;
use ferry_pull::{
    copier, status, ConnState, CopierSettings, FetchError, Fetcher, LinkStats, PullDevice, Report,
    Shell, ShellOptions, Verification, Window,
};

const CHUNK: u32 = 64 * 1024;
const CHUNKS: u64 = 16;

/// A source in memory. Answers can be held back (`hold`) until released,
/// or fail (`fail`).
#[derive(Clone)]
struct MemSource(Arc<Inner>);

struct Inner {
    data: Vec<u8>,
    /// The complete manifest (what the source answers by).
    manifest: Arc<Manifest>,
    /// The manifest the source gives first: the complete one, or for a
    /// lazy source one with every chunk unhashed.
    first: Arc<Manifest>,
    /// What the source gives as its complete manifest, when not
    /// `manifest` (a source that changed).
    complete: Mutex<Option<Arc<Manifest>>>,
    fail: AtomicBool,
    held: AtomicBool,
    release: tokio::sync::Notify,
    /// Chunk ranges asked for, in order.
    asked: Mutex<Vec<(u64, u32, FetchKind)>>,
    fetches: AtomicU64,
}

impl MemSource {
    fn new(data: Vec<u8>) -> Self {
        let geo = Geometry::new(data.len() as u64, CHUNK);
        let kinds = (0..geo.chunks())
            .map(|c| {
                let r = geo.chunk_bytes(c);
                let bytes = &data[r.start as usize..r.end as usize];
                if bytes.iter().all(|b| *b == 0) {
                    ChunkKind::Zero
                } else {
                    ChunkKind::Data(*blake3::hash(bytes).as_bytes())
                }
            })
            .collect();
        let manifest = Arc::new(Manifest::new(geo, kinds));
        MemSource(Arc::new(Inner {
            first: manifest.clone(),
            complete: Mutex::new(None),
            manifest,
            data,
            fail: AtomicBool::new(false),
            held: AtomicBool::new(false),
            release: tokio::sync::Notify::new(),
            asked: Mutex::new(Vec::new()),
            fetches: AtomicU64::new(0),
        }))
    }

    /// A source that has hashed nothing yet (all chunks unhashed, the
    /// zero one too: its answer is a zero one).
    fn lazy(data: Vec<u8>) -> Self {
        let s = Self::new(data);
        let mut inner = Arc::into_inner(s.0).unwrap();
        let g = inner.manifest.geometry();
        inner.first = Arc::new(Manifest::with_source_id(
            g,
            vec![ChunkKind::Unhashed; g.chunks() as usize],
            inner.manifest.source_id(),
        ));
        MemSource(Arc::new(inner))
    }

    fn release(&self) {
        self.0.held.store(false, Ordering::SeqCst);
        self.0.release.notify_waiters();
    }
}

impl Fetcher for MemSource {
    async fn fetch(
        &self,
        first: u64,
        count: u32,
        kind: FetchKind,
    ) -> Result<Vec<Payload>, FetchError> {
        self.0.fetches.fetch_add(1, Ordering::SeqCst);
        self.0.asked.lock().unwrap().push((first, count, kind));
        loop {
            let released = self.0.release.notified();
            if !self.0.held.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        if self.0.fail.load(Ordering::SeqCst) {
            // A source that answers nothing but errors, not at once.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(FetchError::Failed("the source is gone (test)".into()));
        }
        let geo = self.0.manifest.geometry();
        Ok((first..first + u64::from(count))
            .map(|c| match self.0.manifest.chunk(c) {
                ChunkKind::Zero => Payload::Zero,
                ChunkKind::Data(hash) => {
                    let r = geo.chunk_bytes(c);
                    Payload::Data {
                        hash,
                        bytes: self.0.data[r.start as usize..r.end as usize].to_vec(),
                    }
                }
                ChunkKind::Unhashed => panic!("the complete manifest has chunk {c} unhashed"),
            })
            .collect())
    }

    async fn manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        Ok(self.0.first.clone())
    }

    async fn complete_manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        let other = self.0.complete.lock().unwrap().clone();
        Ok(other.unwrap_or_else(|| self.0.manifest.clone()))
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

/// Source data: chunk 3 all zeros, the rest patterned.
fn source_data() -> Vec<u8> {
    let size = CHUNKS * u64::from(CHUNK);
    let mut d: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    let z = 3 * CHUNK as usize;
    d[z..z + CHUNK as usize].fill(0);
    d
}

struct Pull {
    _dir: tempfile::TempDir,
    source: MemSource,
    shell: Arc<Shell<MemSource>>,
    device: PullDevice<MemSource>,
}

/// A fresh pull of `source_data()` with the manifest not yet fetched and
/// no background copy running.
fn pull(absent_timeout: Option<Duration>) -> Pull {
    pull_from(MemSource::new(source_data()), absent_timeout)
}

/// A fresh pull from `source`, as [`pull`].
fn pull_from(source: MemSource, absent_timeout: Option<Duration>) -> Pull {
    let dir = tempfile::tempdir().unwrap();
    let geo = source.0.manifest.geometry();
    let disk = dir.path().join("disk.img");
    let state = ferry_pull::open::default_state_path(&disk);
    let mut dest = ferry_pull::open::open_or_create(&disk, &state, geo, [7; 32]).unwrap();
    ferry_pull::open::keep_recovered_writes(&mut dest).unwrap();
    let engine = ferry_pull::open::engine(&dest.state, geo, false);
    let shell = Shell::new(
        engine,
        dest.backing,
        dest.state,
        None,
        Some(source.clone()),
        ShellOptions {
            gated: true,
            absent_timeout,
            awaiting_switchover: false,
        },
    );
    Pull {
        _dir: dir,
        device: PullDevice(shell.clone()),
        shell,
        source,
    }
}

fn range(c: u64) -> std::ops::Range<usize> {
    let start = c as usize * CHUNK as usize;
    start..start + CHUNK as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_an_absent_block_fetches_its_chunk_and_answers_the_source_data() {
    let p = pull(None);
    let want = source_data();
    let at = 5 * u64::from(CHUNK) + 8192;
    assert!(
        p.device.read_now(at, &mut [0u8; 4096]).is_none(),
        "an absent block is not readable at once"
    );
    let got = p.device.read(at, 4096).await.unwrap();
    assert_eq!(got, want[at as usize..at as usize + 4096]);
    assert_eq!(
        *p.source.0.asked.lock().unwrap(),
        vec![(5, 1, FetchKind::OnDemand)],
        "one on-demand fetch of the chunk"
    );
    // Now present: answered at once, from the backing file.
    let mut buf = vec![0u8; 4096];
    p.device.read_now(at, &mut buf).unwrap().unwrap();
    assert_eq!(buf, want[at as usize..at as usize + 4096]);
    assert_eq!(p.source.0.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn present_blocks_are_handed_out_in_the_backing_file_at_their_own_offsets() {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let p = pull(None);
    let want = source_data();
    let at = 5 * u64::from(CHUNK) + 8192;
    let out = tempfile::tempfile().unwrap();
    // Absent: no file, and the mark it leaves answers `copy_now` and
    // `read_now` of the same request without asking the engine again.
    assert!(p.device.present_file(at, 4096).is_none());
    assert!(p.device.copy_now(at, 4096, out.as_fd(), 0).is_none());
    assert!(p.device.read_now(at, &mut [0u8; 4096]).is_none());
    p.device.read(at, 4096).await.unwrap();
    // Present: the backing file, holding the block at its own offset.
    let fd = p.device.present_file(at, 4096).expect("present");
    let mut got = vec![0u8; 4096];
    std::fs::File::from(fd.try_clone_to_owned().unwrap())
        .read_exact_at(&mut got, at)
        .unwrap();
    assert_eq!(got, want[at as usize..at as usize + 4096]);
    // A range reaching an absent chunk is not handed out.
    assert!(p.device.present_file(at, u64::from(CHUNK)).is_none());
    p.device.read_now(at, &mut [0u8; 4096]).unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_an_absent_block_is_kept_and_never_overwritten_by_a_later_fetch() {
    let p = pull(None);
    let want = source_data();
    let c = 6u64;
    let base = c * u64::from(CHUNK);
    // A read of the chunk's first block starts a fetch, held at the source.
    p.source.0.held.store(true, Ordering::SeqCst);
    let reader = {
        let d = p.device.clone();
        tokio::spawn(async move { d.read(base, 4096).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.source.0.fetches.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the read never fetched");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The guest writes the chunk's second block (whole) while it is in
    // flight: the write goes ahead at once.
    let mine = vec![0xeeu8; 4096];
    p.device
        .write(base + 4096, mine.clone(), false)
        .await
        .unwrap();
    // The source's answer arrives and fills the rest of the chunk only.
    p.source.release();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got, want[base as usize..base as usize + 4096]);
    let chunk = p.device.read(base, CHUNK).await.unwrap();
    assert_eq!(
        chunk[4096..8192],
        mine[..],
        "the fill overwrote the guest's write"
    );
    assert_eq!(chunk[..4096], want[base as usize..base as usize + 4096]);
    assert_eq!(chunk[8192..], want[base as usize + 8192..range(c).end]);
    assert_eq!(
        p.shell.engine_counters().discarded_guest_won,
        4096,
        "the guest's block was not filled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_copy_reaches_a_complete_and_verified_disk() {
    let p = pull(None);
    let want = source_data();
    // The guest writes a block of chunk 2 first: its chunk is never
    // compared with the source.
    p.device
        .write(2 * u64::from(CHUNK), vec![0x55; 4096], false)
        .await
        .unwrap();
    let s = copy_to_the_end(&p, |s| s.verified == "ok").await;
    assert_eq!(s.phase, "complete");
    assert_eq!(s.present_bytes, s.total_bytes);
    assert_eq!(s.guest_written_chunks, 1);
    // Every chunk but the zero one and the guest's: 14 checked.
    assert_eq!(s.verified_chunks, CHUNKS - 1);
    assert_eq!(
        s.skipped_zero_bytes,
        u64::from(CHUNK),
        "the zero chunk was not fetched"
    );
    for c in (0..CHUNKS).filter(|c| *c != 2) {
        let got = p.device.read(c * u64::from(CHUNK), CHUNK).await.unwrap();
        assert!(got == want[range(c)], "chunk {c} differs from the source");
    }
    let two = p.device.read(2 * u64::from(CHUNK), 4096).await.unwrap();
    assert_eq!(two, vec![0x55; 4096]);
    assert!(
        p.source
            .0
            .asked
            .lock()
            .unwrap()
            .iter()
            .all(|(first, n, _)| !(*first..*first + u64::from(*n)).contains(&3)),
        "the zero chunk crossed the wire"
    );
}

/// Runs the manifest fetch, the copier and the syncer of `p` until `done`
/// says so of a status snapshot (or the copier ends); returns that
/// snapshot.
async fn copy_to_the_end(p: &Pull, done: impl Fn(&status::Status) -> bool) -> status::Status {
    let settings = Arc::new(CopierSettings {
        rate_limit: AtomicU64::new(0),
        batch_chunks: 4,
        window: Window::Fixed(4),
        sync_bytes: 1 << 20,
        link_rtt: Duration::from_millis(1),
    });
    let report = Arc::new(Report {
        nbd: None,
        started: Instant::now(),
        present_at_start: 0,
        verify: Mutex::new(Verification::default()),
        rate: status::RateMeter::default(),
    });
    tokio::spawn(copier::fetch_manifest(p.shell.clone()));
    let copy = tokio::spawn(copier::run_copier(
        p.shell.clone(),
        settings.clone(),
        report.clone(),
    ));
    let sync = tokio::spawn(copier::run_syncer(
        p.shell.clone(),
        settings.clone(),
        report.clone(),
        |_: &ferry_pull::Status| {},
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = loop {
        let s = status::snapshot(&p.shell, &settings, &report);
        if done(&s) {
            break s;
        }
        assert!(
            !s.verified.starts_with("failed") && Instant::now() < deadline,
            "not verified: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    copy.await.unwrap();
    sync.abort();
    s
}

/// A source that has hashed nothing when the pull starts: every chunk is
/// fetched with the hash the source computed as it read it, the zero one
/// comes back as a zero answer, and verification checks the whole disk
/// against the complete manifest fetched at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_source_is_copied_and_verified_against_its_complete_manifest() {
    let p = pull_from(MemSource::lazy(source_data()), None);
    let want = source_data();
    let s = copy_to_the_end(&p, |s| s.verified == "ok").await;
    assert_eq!(s.phase, "complete");
    assert_eq!(s.verified_chunks, CHUNKS);
    for c in 0..CHUNKS {
        let got = p.device.read(c * u64::from(CHUNK), CHUNK).await.unwrap();
        assert!(got == want[range(c)], "chunk {c} differs from the source");
    }
}

/// A complete manifest that contradicts the first one (a hole of the
/// first became data: the source was written behind its back) fails the
/// pull as a changed source; the disk is not declared verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_manifest_that_contradicts_the_first_fails_the_pull() {
    let p = pull(None);
    let m = p.source.0.manifest.clone();
    let mut kinds = m.chunks().to_vec();
    assert_eq!(kinds[3], ChunkKind::Zero);
    kinds[3] = ChunkKind::Data([1; 32]);
    *p.source.0.complete.lock().unwrap() = Some(Arc::new(Manifest::with_source_id(
        m.geometry(),
        kinds,
        m.source_id(),
    )));
    let s = copy_to_the_end(&p, |s| s.phase == "error").await;
    let why = s.error.clone().unwrap_or_default();
    assert!(why.contains("chunk 3 was Zero"), "{s:?}");
    assert!(why.contains("the source must not change"), "{s:?}");
    assert!(s.verified.starts_with("failed"), "{s:?}");
    let e = p.device.read(0, 4096).await;
    assert!(e.is_ok(), "present data stays readable: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_only_fails_fails_the_read_after_the_absent_timeout() {
    let p = pull(Some(Duration::from_secs(1)));
    p.source.0.fail.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let e = p.device.read(0, 4096).await.unwrap_err();
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "failed before the timeout"
    );
    // Not an errno of its own: the frontends answer EIO.
    assert_eq!(e.kind(), std::io::ErrorKind::Other);
    assert!(e.raw_os_error().is_none());
    let msg = e.to_string();
    assert!(
        msg.contains("absent data not fetched within") && msg.contains("read of 4096 bytes at 0"),
        "{msg}"
    );
    assert!(p.source.0.fetches.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_answered_from_the_fetched_data_without_reading_the_backing_file() {
    let p = pull(None);
    let want = source_data();
    let at = 5 * u64::from(CHUNK) + 4096 + 100;
    let got = p.device.read(at, 10_000).await.unwrap();
    assert_eq!(got, want[at as usize..at as usize + 10_000]);
    assert_eq!(p.shell.backing_reads(), 0, "the miss read the data back");
    // A read of the zero chunk: zeros, from the fill.
    let z = 3 * u64::from(CHUNK);
    assert_eq!(p.device.read(z, 8192).await.unwrap(), vec![0; 8192]);
    assert_eq!(p.shell.backing_reads(), 0);
    // A block the guest wrote is not in the fill: that read takes it from
    // the file.
    let c7 = 7 * u64::from(CHUNK);
    p.device
        .write(c7 + 4096, vec![0xab; 4096], false)
        .await
        .unwrap();
    let got = p.device.read(c7, 8192).await.unwrap();
    assert_eq!(got[..4096], want[c7 as usize..c7 as usize + 4096]);
    assert_eq!(got[4096..], vec![0xab; 4096]);
    assert_eq!(p.shell.backing_reads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_index_matched_chunks_come_from_the_local_file_and_stale_ones_from_the_source() {
    let data = source_data();
    // A lazy source: the first manifest knows no hash, so the matches come
    // from the complete manifest the local filler asks for.
    let p = pull_from(MemSource::lazy(data.clone()), None);
    // A template holding source chunks 4..=9 one chunk on, after an
    // unrelated chunk; indexed, then its copy of chunk 7 changed.
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("template.img");
    let mut t = vec![0x55u8; CHUNK as usize];
    t.extend_from_slice(&data[range(4).start..range(9).end]);
    std::fs::write(&tpl, &t).unwrap();
    let idx = dir.path().join("template.ferry-index");
    ferry_index::build(&idx, std::slice::from_ref(&tpl)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&tpl).unwrap();
        f.write_all_at(&[0xaa; 4096], 4 * u64::from(CHUNK)).unwrap();
    }
    // The source answers no fetch until released.
    p.source.0.held.store(true, Ordering::SeqCst);
    let settings = Arc::new(CopierSettings {
        rate_limit: AtomicU64::new(0),
        batch_chunks: 4,
        window: Window::Fixed(4),
        sync_bytes: 1 << 20,
        link_rtt: Duration::from_millis(1),
    });
    tokio::spawn(copier::fetch_manifest(p.shell.clone()));
    tokio::spawn(ferry_pull::local::run_local_fill(
        p.shell.clone(),
        vec![ferry_index::Index::open(&idx).unwrap()],
        settings,
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.shell.engine_counters().local_stale == 0
        || p.shell.engine_counters().filled_local < 5 * u64::from(CHUNK)
    {
        assert!(Instant::now() < deadline, "no local fills");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Matched chunks are read while the source answers nothing.
    for c in [4u64, 5, 6, 8, 9] {
        let at = c * u64::from(CHUNK);
        let got = tokio::time::timeout(Duration::from_secs(10), p.device.read(at, CHUNK))
            .await
            .expect("a matched chunk waits for the source")
            .unwrap();
        assert_eq!(got, data[range(c)], "chunk {c}");
    }
    let c = p.shell.engine_counters();
    assert_eq!(
        (c.filled_local, c.local_stale, c.fetched_on_demand),
        (5 * u64::from(CHUNK), 1, 0)
    );
    assert!(
        p.source.0.asked.lock().unwrap().is_empty(),
        "nothing was fetched: {:?}",
        p.source.0.asked.lock().unwrap()
    );
    // Chunk 7's local copy is stale: its read goes to the source.
    let at = 7 * u64::from(CHUNK);
    let reader = {
        let d = p.device.clone();
        tokio::spawn(async move { d.read(at, CHUNK).await })
    };
    while p.source.0.fetches.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stale chunk was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        *p.source.0.asked.lock().unwrap(),
        vec![(7, 1, FetchKind::OnDemand)]
    );
    p.source.release();
    assert_eq!(reader.await.unwrap().unwrap(), data[range(7)]);
}
