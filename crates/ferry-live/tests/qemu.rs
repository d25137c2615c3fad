//! The live source against the real qemu-storage-daemon (Debian's
//! qemu-system-common), each test with its own daemon on sockets in its own
//! temporary directory: the allocation map of an image with holes, zeros
//! and data; pre-copy rounds while a writer writes, reproducing the image
//! and never losing a write; the merge-back of a failed or abandoned round;
//! and bad input as typed errors. A missing tool fails the test.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_live::{
    dirty_chunks, export_node, ChangeTracker, ChunkSet, LiveError, LiveSource, Qmp, QmpError,
    SourceConfig, TrackerConfig, WriteWatch,
};
use ferry_nbd_client::{NbdClientError, NbdUri};
use ferry_tests::make_image;
use ferry_tests::qmp::{need_tool, NbdWriter, StorageDaemon};
use rand::{Rng, SeedableRng};
use serde_json::json;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * KIB;
/// Bound on each library call (generous: a loaded machine).
const LIMIT: Duration = Duration::from_secs(300);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn block<T>(rt: &tokio::runtime::Runtime, f: impl Future<Output = T>) -> T {
    rt.block_on(async { tokio::time::timeout(LIMIT, f).await })
        .expect("library call within the time limit")
}

/// A daemon on `image` with a read-only export `src` (what ferry reads)
/// and a writable export `w` (the guest's writes), both of node `disk0`.
fn daemon(dir: &Path, image: &Path) -> StorageDaemon {
    let mut qsd = StorageDaemon::start(dir, image);
    qsd.export("src", "src", &[], false).expect("export src");
    qsd.export("w", "w", &[], true).expect("export w");
    qsd
}

fn src_uri(qsd: &StorageDaemon) -> NbdUri {
    NbdUri::parse(&qsd.uri("src")).expect("the daemon's URI parses")
}

fn source(rt: &tokio::runtime::Runtime, qsd: &StorageDaemon) -> LiveSource {
    block(
        rt,
        LiveSource::connect(&src_uri(qsd), SourceConfig::default()),
    )
    .expect("connect the live source")
}

fn tracker(rt: &tokio::runtime::Runtime, qsd: &StorageDaemon, src: &LiveSource) -> ChangeTracker {
    let qmp = block(rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("the second monitor");
    block(
        rt,
        ChangeTracker::start(qmp, src, TrackerConfig::new("disk0")),
    )
    .expect("start the tracker")
}

fn qemu_io_w(qsd: &StorageDaemon, cmd: &str) {
    need_tool("qemu-io", "qemu-utils");
    let (ok, text) = ferry_tests::qemu_io_nbd(&qsd.nbd_socket, "w", 120, &[], &[cmd]);
    assert!(ok && !text.contains("failed"), "qemu-io {cmd}: {text}");
}

fn chunks(s: &ChunkSet) -> Vec<u64> {
    s.iter().collect()
}

#[test]
fn allocation_map_of_holes_zeros_and_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    // 40 MiB and 4 KiB: a short last chunk, and more than one 32 MiB read.
    let size = 40 * MIB + 4 * KIB;
    let last = size / CHUNK; // the short chunk
    make_image(
        &image,
        size,
        &[
            (0, CHUNK),                       // chunk 0, whole
            (3 * CHUNK + 4 * KIB, 4 * KIB),   // inside chunk 3
            (20 * CHUNK, CHUNK),              // chunk 20, zeroed below
            (30 * CHUNK + 60 * KIB, 8 * KIB), // across chunks 30 and 31
            (100 * CHUNK, 3 * CHUNK),         // 100..=102
            (size - 4 * KIB, 4 * KIB),        // the short last chunk
        ],
        11,
    );
    // Chunk 10: zeros written as data (allocated, reads as zeros).
    ferry_tests::apply_write(&image, 10 * CHUNK, &vec![0u8; CHUNK as usize]);
    let qsd = daemon(dir.path(), &image);
    // Chunk 20: zeroed through the export, unmapping (a hole again).
    qemu_io_w(&qsd, &format!("write -z -u {} {}", 20 * CHUNK, CHUNK));

    let rt = runtime();
    let src = source(&rt, &qsd);
    assert_eq!(src.size(), size);
    assert_eq!(src.chunk_count(), last + 1);
    let alloc = block(&rt, src.allocation()).expect("allocation map");
    assert_eq!(
        chunks(&alloc),
        vec![0, 3, 10, 30, 31, 100, 101, 102, last],
        "allocated chunks"
    );

    // Every chunk left out reads as zeros, every chunk in reads as the
    // file: read the whole disk in one call (split at the server's
    // maximum block size) and compare.
    let file = std::fs::read(&image).expect("read the image");
    assert!(src.max_read() < size as u32, "one read must be split");
    let mut whole = vec![0xffu8; size as usize];
    block(&rt, src.read(0, &mut whole)).expect("read the whole disk");
    assert!(whole == file, "the disk read live differs from the image");
    for c in 0..src.chunk_count() {
        let r = src.chunk_range(c);
        let bytes = &file[r.start as usize..r.end as usize];
        if !alloc.contains(c) {
            assert!(bytes.iter().all(|b| *b == 0), "chunk {c} is not zero");
        }
    }
    // The short last chunk alone.
    let mut buf = vec![0u8; CHUNK as usize];
    let n = block(&rt, src.read_chunk(last, &mut buf)).expect("read the last chunk");
    assert_eq!(n as u64, 4 * KIB);
    assert!(buf[..n] == file[(size - 4 * KIB) as usize..]);

    // Reads outside the disk are refused, naming the range.
    let mut two = vec![0u8; 8192];
    let err = block(&rt, src.read(size - 4096, &mut two)).expect_err("past the end");
    assert!(
        matches!(err, LiveError::BadRead { offset, len: 8192, .. } if offset == size - 4096),
        "{err:?}"
    );
    assert!(err.to_string().contains("past the disk's end"), "{err}");
    block(&rt, src.close());
}

/// One write of a writer: when it was sent and acknowledged, where, and
/// which bytes (`at` in the writer's pool, its number in the first 8).
struct Write {
    sent: Instant,
    acked: Instant,
    offset: u64,
    len: u64,
    at: usize,
    tag: u64,
}

impl Write {
    fn chunks(&self) -> std::ops::RangeInclusive<u64> {
        self.offset / CHUNK..=(self.offset + self.len - 1) / CHUNK
    }

    fn data(&self, pool: &[u8]) -> Vec<u8> {
        let mut data = pool[self.at..self.at + self.len as usize].to_vec();
        data[..8].copy_from_slice(&self.tag.to_le_bytes());
        data
    }
}

/// A writer's pool of pseudo-random bytes (xorshift; filling 64 KiB from
/// `StdRng` unoptimised takes ~10 ms a write).
fn pool(seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// One pre-copy round as the test saw it: the chunks, and the time
/// window of the `next_round` call that switched generations.
struct SeenRound {
    dirty: ChunkSet,
    called: Instant,
    returned: Instant,
}

#[test]
fn rounds_while_writing_reproduce_the_disk_and_lose_no_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let size = 64 * MIB;
    make_image(&image, size, &[(0, 3 * MIB), (9 * MIB, MIB)], 21);
    let initial = std::fs::read(&image).expect("read the image");
    let mut qsd = daemon(dir.path(), &image);
    let rt = runtime();
    let src = source(&rt, &qsd);
    let nchunks = src.chunk_count();
    let t_start = Instant::now();
    let mut tracker = tracker(&rt, &qsd, &src);
    assert_eq!(qsd.dirty_bitmaps(), vec!["ferry-g0".to_string()]);

    // The guest: two writers of random 64 KiB blocks, and now and then an
    // unaligned write across two chunks, until stopped (bounded in count
    // and time). Each writes its own half of the disk, so that replaying
    // each one's log in order gives the disk it must end as.
    let half = size / CHUNK / 2;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(std::sync::Barrier::new(3));
    let writers: Vec<_> = (0..2u64)
        .map(|seed| {
            let stop = stop.clone();
            let started = started.clone();
            let sock = qsd.nbd_socket.clone();
            std::thread::spawn(move || {
                let mut w = NbdWriter::connect(&sock, "w");
                let mut rng = rand::rngs::StdRng::seed_from_u64(77 + seed);
                let pool = pool(seed);
                let (lo, hi) = (seed * half, (seed + 1) * half);
                started.wait();
                let mut log: Vec<Write> = Vec::new();
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed)
                    && log.len() < 20_000
                    && t0.elapsed() < Duration::from_secs(120)
                {
                    let (offset, len) = if rng.gen_ratio(1, 5) {
                        (rng.gen_range(lo + 1..hi) * CHUNK - 3000, 6000)
                    } else {
                        (rng.gen_range(lo..hi) * CHUNK, CHUNK)
                    };
                    let at = rng.gen_range(0..pool.len() - len as usize);
                    let tag = log.len() as u64 * 2 + seed;
                    let mut write = Write {
                        sent: Instant::now(),
                        acked: Instant::now(),
                        offset,
                        len,
                        at,
                        tag,
                    };
                    w.write(offset, &write.data(&pool));
                    write.acked = Instant::now();
                    log.push(write);
                    // A guest that leaves some chunks clean in a round.
                    std::thread::sleep(Duration::from_millis(1));
                }
                (pool, log)
            })
        })
        .collect();
    started.wait();

    // What ferry would send: round 0 reads every allocated chunk (the
    // map counts as reading the zero ones), then each round re-reads its
    // dirty chunks. `reads[c]`: when each read of chunk c started.
    let mut copy = vec![0u8; size as usize];
    let mut reads: Vec<Vec<Instant>> = vec![Vec::new(); nchunks as usize];
    let read_chunks = |set: &ChunkSet, copy: &mut [u8], reads: &mut [Vec<Instant>]| {
        for c in set.iter() {
            reads[c as usize].push(Instant::now());
            let r = src.chunk_range(c);
            block(
                &rt,
                src.read(r.start, &mut copy[r.start as usize..r.end as usize]),
            )
            .expect("read a chunk");
        }
    };
    let t_map = Instant::now();
    let alloc = block(&rt, src.allocation()).expect("allocation map");
    for c in (0..nchunks).filter(|c| !alloc.contains(*c)) {
        reads[c as usize].push(t_map);
    }
    read_chunks(&alloc, &mut copy, &mut reads);

    let mut seen: Vec<SeenRound> = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(200));
        let called = Instant::now();
        let round = block(&rt, tracker.next_round()).expect("a round");
        let returned = Instant::now();
        assert_eq!(round.generation() as usize, seen.len());
        read_chunks(round.dirty(), &mut copy, &mut reads);
        seen.push(SeenRound {
            dirty: round.dirty().clone(),
            called,
            returned,
        });
        block(&rt, tracker.complete(round)).expect("complete the round");
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<(Vec<u8>, Vec<Write>)> = writers
        .into_iter()
        .map(|w| w.join().expect("a writer"))
        .collect();
    // The VM is paused: the final round.
    let called = Instant::now();
    let last = block(&rt, tracker.final_round()).expect("the final round");
    let returned = Instant::now();
    assert!(last.is_final());
    read_chunks(last.dirty(), &mut copy, &mut reads);
    seen.push(SeenRound {
        dirty: last.dirty().clone(),
        called,
        returned,
    });
    block(&rt, tracker.complete(last)).expect("complete the final round");
    assert!(
        matches!(block(&rt, tracker.next_round()), Err(LiveError::State(_))),
        "no round after the final one"
    );
    assert_eq!(
        qsd.dirty_bitmaps(),
        Vec::<String>::new(),
        "bitmaps left behind"
    );

    let writes: Vec<&Write> = logs.iter().flat_map(|(_, log)| log).collect();
    let dirty_total: u64 = seen.iter().map(|r| r.dirty.count()).sum();
    eprintln!(
        "writes: {}, dirty chunks per round: {:?}",
        writes.len(),
        seen.iter().map(|r| r.dirty.count()).collect::<Vec<_>>()
    );
    assert!(
        writes.len() >= 50,
        "the writers wrote only {} times",
        writes.len()
    );
    assert!(dirty_total > 0, "no round saw a write");

    // Generation n records the writes that landed between round n-1's
    // switch (the tracker's start for n = 0) and round n's. A write lands
    // between its send and its acknowledgement; each switch happens
    // inside its `next_round` call. So every write is in a round whose
    // window overlaps its own (nothing lost) ...
    let opened = |n: usize| {
        if n == 0 {
            t_start
        } else {
            seen[n - 1].called
        }
    };
    for w in &writes {
        for c in w.chunks() {
            assert!(
                (0..seen.len()).any(|n| seen[n].dirty.contains(c)
                    && w.sent < seen[n].returned
                    && w.acked > opened(n)),
                "write {} to chunk {c} is in no round of its time",
                w.tag
            );
        }
    }
    // ... and every chunk a round reports was written in its window
    // (nothing made up: a tracker reporting the whole disk fails here).
    for (n, r) in seen.iter().enumerate() {
        for c in r.dirty.iter() {
            assert!(
                writes
                    .iter()
                    .any(|w| w.chunks().contains(&c) && w.sent < r.returned && w.acked > opened(n)),
                "round {n} reports chunk {c}, which no write of its time touched"
            );
        }
    }
    // Every write sent after a read of its chunk is followed by a later
    // read of that chunk (the chunk was in a later round's dirty set).
    for w in &writes {
        for c in w.chunks() {
            let r = &reads[c as usize];
            if r.iter().any(|t| *t < w.sent) {
                assert!(
                    r.iter().any(|t| *t > w.sent),
                    "write {} to chunk {c} after its read was in no later round \
                     (reads {r:?}, write sent {:?})",
                    w.tag,
                    w.sent
                );
            }
        }
    }

    // The disk the writers made: the initial image with each writer's
    // writes replayed in order (their halves are disjoint).
    let mut expected = initial;
    for (pool, log) in &logs {
        for w in log {
            let o = w.offset as usize;
            expected[o..o + w.len as usize].copy_from_slice(&w.data(pool));
        }
    }
    let first_diff = |a: &[u8], b: &[u8]| {
        (0..nchunks).find(|c| {
            let r = src.chunk_range(*c);
            a[r.start as usize..r.end as usize] != b[r.start as usize..r.end as usize]
        })
    };
    let file = std::fs::read(&image).expect("read the image");
    if let Some(c) = first_diff(&file, &expected) {
        panic!("chunk {c} of the image is not what the writers wrote");
    }
    // The copy ferry assembled from round 0 and the rounds' changed
    // chunks is that disk, byte for byte.
    if let Some(c) = first_diff(&copy, &expected) {
        panic!(
            "chunk {c} of the copy differs from what the writers wrote (reads {:?})",
            reads[c as usize]
        );
    }
    block(&rt, tracker.close()).expect("close the tracker");
    block(&rt, src.close());
}

#[test]
fn a_failed_or_abandoned_round_is_merged_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[(0, MIB)], 31);
    let mut qsd = daemon(dir.path(), &image);
    let rt = runtime();
    let src = source(&rt, &qsd);
    let mut tracker = tracker(&rt, &qsd, &src);
    let mut w = NbdWriter::connect(&qsd.nbd_socket, "w");
    let block64 = vec![0x5au8; CHUNK as usize];

    // Abandoned (its chunks could not be sent): the next round has them.
    w.write(5 * CHUNK, &block64);
    let r = block(&rt, tracker.next_round()).expect("round 0");
    assert_eq!(chunks(r.dirty()), vec![5]);
    block(&rt, tracker.abandon(r)).expect("abandon round 0");
    w.write(9 * CHUNK + 100, &[1, 2, 3]);
    let r = block(&rt, tracker.next_round()).expect("round 1");
    assert_eq!(chunks(r.dirty()), vec![5, 9], "round 0's chunk kept");
    block(&rt, tracker.complete(r)).expect("complete round 1");

    // Failed inside the round (the round's export cannot be added: its
    // name is taken): the frozen generation is merged back.
    let n = tracker.recording();
    let taken = tracker.generation_name(n);
    qsd.export("blocker", &taken, &[], false)
        .expect("an export holding the round's name");
    w.write(12 * CHUNK, &block64);
    let err = block(&rt, tracker.next_round()).expect_err("the round export is refused");
    match &err {
        LiveError::RoundFailed { round, source } => {
            assert_eq!(*round, n);
            assert!(matches!(**source, LiveError::Qmp { .. }), "{source:?}");
        }
        other => panic!("expected RoundFailed, got {other:?}"),
    }
    assert!(err.to_string().contains(&taken), "{err}");
    qsd.qmp
        .execute("block-export-del", json!({ "id": "blocker" }))
        .expect("remove the blocker");
    w.write(14 * CHUNK, &block64);
    let r = block(&rt, tracker.next_round()).expect("the round after the failure");
    assert_eq!(
        chunks(r.dirty()),
        vec![12, 14],
        "the failed round's chunk kept"
    );
    block(&rt, tracker.complete(r)).expect("complete");

    // A round not handed back blocks the next, with a clear error.
    let r = block(&rt, tracker.next_round()).expect("an empty round");
    assert_eq!(r.dirty().count(), 0);
    let err = block(&rt, tracker.next_round()).expect_err("one round at a time");
    assert!(
        err.to_string().contains("neither completed nor abandoned"),
        "{err}"
    );
    block(&rt, tracker.complete(r)).expect("complete");
    let gens = qsd.dirty_bitmaps();
    assert_eq!(gens, vec![tracker.generation_name(tracker.recording())]);
    block(&rt, tracker.close()).expect("close");
    assert_eq!(qsd.dirty_bitmaps(), Vec::<String>::new());
    block(&rt, src.close());
}

#[test]
fn the_final_round_hands_its_recording_generation_over_as_a_write_watch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[(0, MIB)], 32);
    let mut qsd = daemon(dir.path(), &image);
    let rt = runtime();
    let src = source(&rt, &qsd);
    let mut tracker = tracker(&rt, &qsd, &src);
    let mut w = NbdWriter::connect(&qsd.nbd_socket, "w");
    let block64 = vec![0x5au8; CHUNK as usize];
    // qemu-storage-daemon has no VM: no run state to ask.
    let state = block(&rt, ferry_live::vm_running(tracker.qmp())).expect("query-status");
    assert_eq!(state, None, "qemu-storage-daemon has a run state?");
    w.write(3 * CHUNK, &block64);
    let r = block(&rt, tracker.next_round()).expect("round 0");
    assert!(
        block(&rt, tracker.into_watch(r)).is_err(),
        "not the final round"
    );
    // (into_watch consumed the tracker: a new one for the real case.)
    let mut tracker = self::tracker_named(&rt, &qsd, &src, "t2");
    w.write(6 * CHUNK, &block64);
    let r = block(&rt, tracker.final_round()).expect("the final round");
    assert_eq!(chunks(r.dirty()), vec![6]);
    let recording = tracker.generation_name(tracker.recording());
    let mut watch = block(&rt, tracker.into_watch(r)).expect("into a watch");
    assert_eq!(watch.bitmap(), recording);
    assert_eq!(block(&rt, watch.dirty_bytes()).expect("count"), 0);
    // A write after the final round shows in the watch.
    w.write(7 * CHUNK, &[1, 2, 3]);
    assert_eq!(block(&rt, watch.dirty_bytes()).expect("count"), CHUNK);
    let left = qsd.dirty_bitmaps();
    assert!(left.contains(&recording), "{left:?}");
    assert!(
        !left.iter().any(|b| b == "t2-g0"),
        "the final generation stays: {left:?}"
    );
    block(&rt, watch.close()).expect("close the watch");
    block(&rt, src.close());
}

fn tracker_named(
    rt: &tokio::runtime::Runtime,
    qsd: &StorageDaemon,
    src: &LiveSource,
    prefix: &str,
) -> ChangeTracker {
    let qmp = block(rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("the second monitor");
    let mut cfg = TrackerConfig::new("disk0");
    cfg.prefix = prefix.into();
    block(rt, ChangeTracker::start(qmp, src, cfg)).expect("start the tracker")
}

#[test]
fn bad_input_gives_typed_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, 4 * MIB, &[(0, MIB)], 41);
    let qsd = daemon(dir.path(), &image);
    let rt = runtime();
    let src = source(&rt, &qsd);

    // An export without the bitmap.
    let err = block(&rt, dirty_chunks(&src_uri(&qsd), "b0", CHUNK as u32, LIMIT))
        .expect_err("src exports no bitmap");
    assert!(
        matches!(&err, LiveError::BitmapNotExported { export, bitmap } if export == "src" && bitmap == "b0"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"b0\""), "{err}");

    // A granularity coarser than the chunks, or not a power of two.
    for (granularity, coarse) in [(128 * 1024, true), (48 * 1024, false), (256, false)] {
        let qmp = block(&rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("monitor");
        let mut cfg = TrackerConfig::new("disk0");
        cfg.granularity = granularity;
        let err = block(&rt, ChangeTracker::start(qmp, &src, cfg)).expect_err("refused");
        if coarse {
            assert!(
                matches!(
                    err,
                    LiveError::GranularityTooCoarse {
                        granularity: 131072,
                        chunk_size: 65536
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("131072"), "{err}");
        } else {
            assert!(
                matches!(
                    err,
                    LiveError::Config {
                        what: "bitmap granularity",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
    }

    // A node that does not exist: QEMU's refusal, naming it.
    let qmp = block(&rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("monitor");
    let err = block(
        &rt,
        ChangeTracker::start(qmp, &src, TrackerConfig::new("nonode")),
    )
    .expect_err("no such node");
    assert!(
        matches!(
            &err,
            LiveError::Qmp {
                source: QmpError::Command { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nonode"), "{err}");

    // Unreachable sockets, NBD and QMP.
    let gone = PathBuf::from(dir.path()).join("nothing.sock");
    let uri = NbdUri::parse(&format!("nbd+unix:///src?socket={}", gone.display())).expect("uri");
    let err = block(&rt, LiveSource::connect(&uri, SourceConfig::default()))
        .expect_err("no server there");
    assert!(
        matches!(
            &err,
            LiveError::Nbd {
                source: NbdClientError::Connect { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nothing.sock"), "{err}");
    let err = block(&rt, Qmp::connect(&gone)).expect_err("no monitor there");
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nothing.sock"), "{err}");

    // Limits on the pool.
    let cfg = SourceConfig {
        connections: 0,
        ..SourceConfig::default()
    };
    let err = block(&rt, LiveSource::connect(&src_uri(&qsd), cfg)).expect_err("no connections");
    assert!(matches!(err, LiveError::Config { .. }), "{err:?}");
    block(&rt, src.close());
}

#[test]
fn a_write_watch_counts_every_write_after_its_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[(0, MIB)], 51);
    let mut qsd = daemon(dir.path(), &image);
    let rt = runtime();
    let mut w = NbdWriter::connect(&qsd.nbd_socket, "w");
    // Written before the watch: not counted.
    w.write(0, &[7u8; 4096]);

    let mut qmp = block(&rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("monitor");
    let node = block(&rt, export_node(&mut qmp, "src")).expect("the node of export src");
    assert_eq!(node, "disk0");
    let err = block(&rt, export_node(&mut qmp, "nosuch")).expect_err("no such export");
    assert!(
        err.to_string().contains("\"nosuch\"") && err.to_string().contains("\"src\""),
        "{err}"
    );
    let mut watch = block(&rt, WriteWatch::start(qmp, &node, "watch0")).expect("start");
    assert_eq!(block(&rt, watch.dirty_bytes()).expect("count"), 0);
    // One byte dirties one grain (QEMU's default: 64 KiB for this image).
    w.write(5 * CHUNK + 7, &[1]);
    assert_eq!(block(&rt, watch.dirty_bytes()).expect("count"), CHUNK);
    w.write(2 * MIB, &vec![2u8; 2 * CHUNK as usize]);
    assert_eq!(block(&rt, watch.dirty_bytes()).expect("count"), 3 * CHUNK);

    // The name is the watch's while it lasts.
    qsd.qmp
        .execute(
            "block-dirty-bitmap-add",
            json!({ "node": "disk0", "name": "watch0" }),
        )
        .expect_err("the name is taken");

    // Removed behind the watch's back: an error, never a count of 0.
    qsd.qmp
        .execute(
            "block-dirty-bitmap-remove",
            json!({ "node": "disk0", "name": "watch0" }),
        )
        .expect("remove the bitmap");
    let err = block(&rt, watch.dirty_bytes()).expect_err("the bitmap is gone");
    assert!(
        matches!(&err, LiveError::State(m) if m.contains("watch0")),
        "{err:?}"
    );
    assert!(
        block(&rt, watch.close()).is_err(),
        "closing removes a bitmap that is gone"
    );
    assert_eq!(qsd.dirty_bitmaps(), Vec::<String>::new());

    // close removes the bitmap.
    let qmp = block(&rt, Qmp::connect(&qsd.ferry_qmp_socket)).expect("monitor");
    let watch = block(&rt, WriteWatch::start(qmp, "disk0", "watch1")).expect("start");
    assert_eq!(qsd.dirty_bitmaps(), vec!["watch1".to_string()]);
    block(&rt, watch.close()).expect("close");
    assert_eq!(qsd.dirty_bitmaps(), Vec::<String>::new());
}
