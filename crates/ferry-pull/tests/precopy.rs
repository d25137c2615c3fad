//! Pre-copy from a live source, through the production shell: chunks the
//! source reports written while their old bytes are on the way are never
//! written here; the copy ends equal to the source as it is now, with
//! nothing for verification to fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::engine::{FetchKind, Payload};
use ferry_core::{ChunkKind, Geometry, Manifest};
use ferry_device::BlockDevice;
use ferry_pull::{
    copier, status, ConnState, CopierSettings, FetchError, Fetcher, LinkStats, PullDevice, Report,
    Shell, ShellOptions, Verification, Window,
};
use ferry_store::Precopy;

const CHUNK: u32 = 64 * 1024;
const CHUNKS: u64 = 16;
const ID: [u8; 32] = [9; 32];

/// A source a VM writes (the test). A fetch reads the bytes at once, as a
/// source does, and answers once released: a write in between makes the
/// answer stale.
#[derive(Clone)]
struct LiveSource(Arc<Inner>);

struct Inner {
    geo: Geometry,
    data: Mutex<Vec<u8>>,
    held: AtomicBool,
    release: tokio::sync::Notify,
    asked: Mutex<Vec<(u64, u32)>>,
}

impl LiveSource {
    fn new() -> Self {
        let data: Vec<u8> = (0..CHUNKS as usize * CHUNK as usize)
            .map(|i| (i / 4096) as u8 | 1)
            .collect();
        LiveSource(Arc::new(Inner {
            geo: Geometry::new(data.len() as u64, CHUNK),
            data: Mutex::new(data),
            held: AtomicBool::new(true),
            release: tokio::sync::Notify::new(),
            asked: Mutex::new(Vec::new()),
        }))
    }

    fn write(&self, chunk: u64, byte: u8) {
        let r = self.0.geo.chunk_bytes(chunk);
        self.0.data.lock().unwrap()[r.start as usize..r.end as usize].fill(byte);
    }

    fn manifest_now(&self) -> Arc<Manifest> {
        let data = self.0.data.lock().unwrap();
        let kinds = (0..self.0.geo.chunks())
            .map(|c| {
                let r = self.0.geo.chunk_bytes(c);
                ChunkKind::of(&data[r.start as usize..r.end as usize])
            })
            .collect();
        Arc::new(Manifest::with_source_id(self.0.geo, kinds, ID))
    }
}

impl Fetcher for LiveSource {
    async fn fetch(
        &self,
        first: u64,
        count: u32,
        _kind: FetchKind,
    ) -> Result<Vec<Payload>, FetchError> {
        self.0.asked.lock().unwrap().push((first, count));
        // Read now, answered later.
        let answers: Vec<Payload> = {
            let data = self.0.data.lock().unwrap();
            (first..first + u64::from(count))
                .map(|c| {
                    let r = self.0.geo.chunk_bytes(c);
                    let bytes = data[r.start as usize..r.end as usize].to_vec();
                    Payload::Data {
                        hash: *blake3::hash(&bytes).as_bytes(),
                        bytes,
                    }
                })
                .collect()
        };
        loop {
            let released = self.0.release.notified();
            if !self.0.held.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        Ok(answers)
    }

    async fn manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        // A lazy live source: nothing hashed yet.
        Ok(Arc::new(Manifest::with_source_id(
            self.0.geo,
            vec![ChunkKind::Unhashed; self.0.geo.chunks() as usize],
            ID,
        )))
    }

    async fn complete_manifest(&self) -> Result<Arc<Manifest>, FetchError> {
        Ok(self.manifest_now())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_read_before_a_reported_write_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let source = LiveSource::new();
    let geo = source.0.geo;
    let disk = dir.path().join("disk.img");
    let state = ferry_pull::open::default_state_path(&disk);
    let mut dest = ferry_pull::open::open_or_create(&disk, &state, geo, ID).unwrap();
    ferry_pull::open::keep_recovered_writes(&mut dest).unwrap();
    let engine = ferry_pull::open::engine(&dest.state, geo, false);
    let shell = Shell::new(
        engine,
        dest.backing,
        dest.state,
        None,
        Some(source.clone()),
        ShellOptions::default(),
    );
    let device = PullDevice(shell.clone());
    let settings = Arc::new(CopierSettings {
        rate_limit: std::sync::atomic::AtomicU64::new(0),
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
    tokio::spawn(copier::fetch_manifest(shell.clone()));
    let copy = tokio::spawn(copier::run_copier(
        shell.clone(),
        settings.clone(),
        report.clone(),
    ));
    let sync = tokio::spawn(copier::run_syncer(
        shell.clone(),
        settings.clone(),
        report.clone(),
        |_: &ferry_pull::Status| {},
    ));
    // Every chunk asked for, its old bytes read and held.
    let deadline = Instant::now() + Duration::from_secs(30);
    while source.0.asked.lock().unwrap().len() < 4 {
        assert!(Instant::now() < deadline, "the copier asked for nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The VM writes every chunk; the change is applied while the old
    // answers are on the way, and the copier asks again at once.
    for c in 0..CHUNKS {
        source.write(c, 0xa0 + c as u8);
    }
    let stale = shell
        .apply_changes(
            &[0..CHUNKS],
            false,
            Precopy {
                generation: 1,
                switched: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(stale, 0, "nothing was present yet");
    tokio::time::sleep(Duration::from_millis(50)).await;
    source.0.held.store(false, Ordering::SeqCst);
    source.0.release.notify_waiters();
    let s = loop {
        let s = status::snapshot(&shell, &settings, &report);
        if s.verified == "ok" || s.verified.starts_with("failed") {
            break s;
        }
        assert!(Instant::now() < deadline, "not verified: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    copy.await.unwrap();
    sync.abort();
    assert_eq!(s.verified, "ok", "{s:?}");
    assert_eq!(
        s.verify_refetched_chunks, 0,
        "stale bytes were written and only verification caught them"
    );
    for c in 0..CHUNKS {
        let got = device.read(c * u64::from(CHUNK), CHUNK).await.unwrap();
        assert!(
            got.iter().all(|b| *b == 0xa0 + c as u8),
            "chunk {c} holds the old bytes"
        );
    }
}
