//! End-to-end tests of the QUIC transport on 127.0.0.1: a server over an
//! in-memory source and a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{ChunkKind, Geometry, Manifest, SharedManifest};
use ferry_transport::server::ChunkSource;
use ferry_transport::wire::{self, ErrorCode, Message, Priority};
use ferry_transport::{
    tls, Client, ClientOptions, ConnState, DiskReads, Fetched, Fingerprint, Identity, Server,
    ServerOptions, TransportError, Tuning,
};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const CHUNK: u32 = 64 * 1024;

/// `read_chunks` of data chunks, as plain bytes (a zero answer is an error
/// here: these tests ask for data chunks).
trait ReadBytes {
    async fn read_bytes(
        &self,
        first: u64,
        count: u32,
        prio: Priority,
    ) -> Result<Vec<Vec<u8>>, TransportError>;
}

impl ReadBytes for Client {
    async fn read_bytes(
        &self,
        first: u64,
        count: u32,
        prio: Priority,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let v = self.read_chunks(first, count, prio).await?;
        Ok(v.into_iter()
            .map(|f| match f {
                Fetched::Data { bytes, .. } => bytes,
                Fetched::Zero => panic!("unexpected zero answer"),
            })
            .collect())
    }
}
const LIMIT: Duration = Duration::from_secs(30);

/// A disk in memory; its manifest is computed like the real one: BLAKE3
/// per chunk, all-zero chunks marked Zero.
struct MemSource {
    data: Vec<u8>,
    /// The complete manifest.
    manifest: Manifest,
    /// What the server is given: the complete manifest, or for a lazy
    /// source one that lists every chunk as unhashed.
    shared: SharedManifest,
    /// Set by a test: the source's disk was changed behind its back.
    changed: std::sync::Mutex<Option<String>>,
    /// Time each chunk read takes.
    delay: Duration,
    /// Chunk reads so far.
    reads: std::sync::atomic::AtomicU64,
    /// The nice value of the thread that read each chunk, in read order.
    reader_nice: std::sync::Mutex<Vec<(u64, i32)>>,
    /// Every read that reached the "disk" (`read_chunks`), as (first
    /// chunk, count), in order.
    disk_reads: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Reads at the disk now, and the most there were at once.
    disk_inside: std::sync::atomic::AtomicUsize,
    disk_most: std::sync::atomic::AtomicUsize,
    /// A live source's change log (a VM writes it), if it is one.
    live: Option<FakeLive>,
}

/// The change log of a live source whose "VM" is the test.
#[derive(Default)]
struct FakeLive {
    log: std::sync::Mutex<ferry_core::changes::ChangeLog>,
    frozen: std::sync::atomic::AtomicBool,
    /// Why the next freeze is refused (its VM still runs), once.
    refuse: std::sync::Mutex<Option<String>>,
}

impl ferry_transport::LiveChanges for FakeLive {
    fn end_round(&self, force: bool) -> u64 {
        self.log.lock().unwrap().end_round(force)
    }
    fn since(&self, applied: u64) -> (u64, Option<Vec<std::ops::Range<u64>>>) {
        let log = self.log.lock().unwrap();
        (log.generation(), log.since(applied))
    }
    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        if let Some(why) = self.refuse.lock().unwrap().take() {
            return Box::pin(async move { Err(why) });
        }
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl MemSource {
    fn new(data: Vec<u8>) -> Arc<Self> {
        let g = Geometry::new(data.len() as u64, CHUNK);
        let chunks = (0..g.chunks())
            .map(|c| {
                let r = g.chunk_bytes(c);
                let bytes = &data[r.start as usize..r.end as usize];
                if bytes.iter().all(|&b| b == 0) {
                    ChunkKind::Zero
                } else {
                    ChunkKind::Data(*blake3::hash(bytes).as_bytes())
                }
            })
            .collect();
        let manifest = Manifest::new(g, chunks);
        Arc::new(MemSource {
            shared: SharedManifest::new(manifest.clone()),
            changed: Default::default(),
            manifest,
            data,
            delay: Duration::ZERO,
            reads: Default::default(),
            reader_nice: Default::default(),
            disk_reads: Default::default(),
            disk_inside: Default::default(),
            disk_most: Default::default(),
            live: None,
        })
    }

    /// A live source: a "VM" (the test) writes it, through its change log.
    fn live(data: Vec<u8>) -> Arc<Self> {
        let mut s = Arc::into_inner(Self::new(data)).unwrap();
        s.live = Some(FakeLive::default());
        Arc::new(s)
    }

    /// A source that has hashed nothing yet: every chunk unhashed, with
    /// the complete manifest's id.
    fn lazy(data: Vec<u8>) -> Arc<Self> {
        let mut s = Arc::into_inner(Self::new(data)).unwrap();
        let g = s.manifest.geometry();
        let unhashed = vec![ChunkKind::Unhashed; g.chunks() as usize];
        s.shared = SharedManifest::new(Manifest::with_source_id(
            g,
            unhashed,
            s.manifest.source_id(),
        ));
        Arc::new(s)
    }

    fn slow(data: Vec<u8>, delay: Duration) -> Arc<Self> {
        let mut s = Arc::into_inner(Self::new(data)).unwrap();
        s.delay = delay;
        Arc::new(s)
    }

    fn chunk(&self, c: u64) -> &[u8] {
        let r = self.manifest.geometry().chunk_bytes(c);
        &self.data[r.start as usize..r.end as usize]
    }
}

impl ChunkSource for MemSource {
    fn manifest(&self) -> &SharedManifest {
        &self.shared
    }

    fn changed(&self) -> Option<String> {
        self.changed.lock().unwrap().clone()
    }

    fn changes(&self) -> Option<&dyn ferry_transport::LiveChanges> {
        self.live
            .as_ref()
            .map(|l| l as &dyn ferry_transport::LiveChanges)
    }

    fn read_chunk(&self, index: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.read_chunks(index, 1, buf)
    }

    /// One read of the range, as a disk does: it takes `delay` whatever
    /// its size.
    fn read_chunks(&self, first: u64, count: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.disk_reads.lock().unwrap().push((first, count));
        let now = self.disk_inside.fetch_add(1, SeqCst) + 1;
        self.disk_most.fetch_max(now, SeqCst);
        std::thread::sleep(self.delay);
        self.disk_inside.fetch_sub(1, SeqCst);
        self.reads.fetch_add(count, SeqCst);
        let nice = this_threads_nice();
        buf.clear();
        for c in first..first + count {
            self.reader_nice.lock().unwrap().push((c, nice));
            buf.extend_from_slice(self.chunk(c));
        }
        Ok(())
    }
}

/// The calling thread's nice value (Linux: `getpriority(PRIO_PROCESS, 0)`
/// reads the calling thread's).
fn this_threads_nice() -> i32 {
    rustix::process::getpriority_process(None).expect("getpriority")
}

/// 64 chunks and a short one; every 5th chunk is zero.
fn disk(seed: u64) -> Vec<u8> {
    let len = 64 * CHUNK as usize + 1000;
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for c in (0..65).step_by(5) {
        let s = c * CHUNK as usize;
        let e = (s + CHUNK as usize).min(len);
        v[s..e].fill(0);
    }
    v
}

fn tuning() -> Tuning {
    let mut t = Tuning::for_link(1_000_000_000, Duration::from_millis(1));
    t.keep_alive = Duration::from_millis(200);
    t.idle_timeout = Duration::from_secs(3);
    t
}

struct Ids {
    server: Identity,
    client: Identity,
}

fn ids() -> Ids {
    Ids {
        server: Identity::generate().unwrap(),
        client: Identity::generate().unwrap(),
    }
}

fn server_opts(ids: &Ids, listen: SocketAddr) -> ServerOptions {
    ServerOptions {
        listen,
        identity: ids.server.clone(),
        trusted: vec![ids.client.fingerprint()],
        tuning: tuning(),
        corrupt_once: vec![],
        compress: true,
        disk_reads: DiskReads::default(),
    }
}

fn start(opts: ServerOptions, src: Arc<MemSource>) -> (SocketAddr, JoinHandle<()>) {
    let server = Server::bind(opts, src).unwrap();
    let addr = server.local_addr();
    let task = tokio::spawn(async move {
        server.run().await.unwrap();
    });
    (addr, task)
}

/// Binds again on an address a stopped server held, retrying while its
/// socket is still being released.
async fn restart(opts: ServerOptions, src: Arc<MemSource>) -> JoinHandle<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Server::bind(opts.clone(), src.clone()) {
            Ok(server) => {
                return tokio::spawn(async move {
                    server.run().await.unwrap();
                })
            }
            Err(TransportError::Bind { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebind failed: {e}"),
        }
    }
}

fn client_opts(ids: &Ids, server: SocketAddr) -> ClientOptions {
    ClientOptions {
        server: server.into(),
        identity: ids.client.clone(),
        server_fingerprint: ids.server.fingerprint(),
        tuning: tuning(),
        connect_timeout: Duration::from_secs(5),
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn data_chunks(m: &Manifest) -> Vec<u64> {
    (0..m.geometry().chunks())
        .filter(|&c| matches!(m.chunk(c), ChunkKind::Data(_)))
        .collect()
}

fn hash_ok(m: &Manifest, c: u64, data: &[u8]) -> bool {
    m.chunk(c) == ChunkKind::Data(*blake3::hash(data).as_bytes())
}

/// A source that has hashed nothing: its manifest lists every chunk as
/// unhashed, each chunk read comes with the hash computed as it was read
/// (an all-zero one as a Zero answer), the source learns them, and the
/// complete manifest hashes the rest; once its disk changed, every read
/// and manifest is refused with `SourceChanged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_source_hashes_as_it_sends_and_a_changed_one_refuses() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::lazy(disk(3));
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        client.authenticated().await.unwrap();
        assert_eq!(client.info().source_id, src.manifest.source_id());
        let first = client.manifest().await.unwrap();
        let n = first.geometry().chunks();
        assert_eq!(first.unhashed(), n);
        // Chunk 0 holds zeros (see `disk`), chunk 1 data.
        assert_eq!(src.manifest.chunk(0), ChunkKind::Zero);
        let got = client
            .read_chunks(0, 2, Priority::Background)
            .await
            .unwrap();
        assert_eq!(got[0], Fetched::Zero);
        match &got[1] {
            Fetched::Data { hash, bytes } => {
                assert_eq!(bytes.as_slice(), src.chunk(1));
                assert!(hash_ok(&src.manifest, 1, bytes));
                assert_eq!(*hash, *blake3::hash(src.chunk(1)).as_bytes());
            }
            other => panic!("chunk 1: {other:?}"),
        }
        assert_eq!(src.shared.chunk(0), ChunkKind::Zero);
        assert_eq!(src.shared.chunk(1), src.manifest.chunk(1));
        assert_eq!(src.shared.chunk(2), ChunkKind::Unhashed);
        let reads_before = src.reads.load(std::sync::atomic::Ordering::SeqCst);
        let complete = client.complete_manifest().await.unwrap();
        assert_eq!(*complete, src.manifest);
        assert_eq!(complete.follows(&first), Ok(()));
        // The two chunks read already were not read again.
        let reads = src.reads.load(std::sync::atomic::Ordering::SeqCst) - reads_before;
        assert_eq!(reads, n - 2);

        *src.changed.lock().unwrap() = Some("disk.img: mtime changed".into());
        for prio in [Priority::OnDemand, Priority::Background] {
            let e = client.read_chunks(6, 1, prio).await.unwrap_err();
            assert_eq!(e.remote_code(), Some(ErrorCode::SourceChanged), "{e}");
            assert!(e.to_string().contains("disk.img: mtime changed"), "{e}");
        }
        let e = client.complete_manifest().await.unwrap_err();
        assert_eq!(e.remote_code(), Some(ErrorCode::SourceChanged), "{e}");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_reads_and_concurrency() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(1));
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        client.authenticated().await.unwrap();
        // Asking again is fine.
        client.authenticated().await.unwrap();
        assert_eq!(client.info().source_id, src.manifest.source_id());
        assert_eq!(client.info().geometry, src.manifest.geometry());
        assert!(client.manifest_if_fetched().is_none());
        let m = client.manifest().await.unwrap();
        assert_eq!(*m, src.manifest);
        let n = m.geometry().chunks();

        // A run of data chunks, exact bytes.
        let got = client.read_bytes(1, 4, Priority::Background).await.unwrap();
        assert_eq!(got.len(), 4);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), src.chunk(1 + i as u64));
        }
        // The short last chunk.
        let last = client
            .read_bytes(n - 1, 1, Priority::OnDemand)
            .await
            .unwrap();
        assert_eq!(last[0].len(), 1000);
        assert_eq!(last[0].as_slice(), src.chunk(n - 1));

        // 64 concurrent readers.
        let chunks = data_chunks(&m);
        let mut tasks = Vec::new();
        for t in 0..64usize {
            let (client, src, chunks) = (client.clone(), src.clone(), chunks.clone());
            tasks.push(tokio::spawn(async move {
                let c = chunks[(t * 7) % chunks.len()];
                let prio = if t % 2 == 0 {
                    Priority::OnDemand
                } else {
                    Priority::Background
                };
                let d = client.read_bytes(c, 1, prio).await.unwrap();
                assert_eq!(d[0].as_slice(), src.chunk(c), "chunk {c}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        // Zero chunks are answered without their bytes; past the end is
        // refused.
        let zeros: Vec<u64> = (0..n).filter(|c| m.chunk(*c) == ChunkKind::Zero).collect();
        assert!(!zeros.is_empty());
        let before = client.stats().wire_rx_bytes;
        let z = client
            .read_chunks(zeros[0], 1, Priority::OnDemand)
            .await
            .unwrap();
        assert_eq!(z, vec![Fetched::Zero]);
        assert!(
            client.stats().wire_rx_bytes - before < 1000,
            "a zero chunk crossed the wire"
        );
        let e = client
            .read_bytes(n - 1, 2, Priority::OnDemand)
            .await
            .unwrap_err();
        assert_eq!(e.remote_code(), Some(ErrorCode::OutOfRange), "{e}");
        // The client still works after refusals.
        assert!(client.read_bytes(6, 1, Priority::OnDemand).await.is_ok());

        let s = client.stats();
        assert_eq!(s.state, ConnState::Connected);
        assert_eq!(s.reconnects, 0);
        assert!(s.wire_rx_bytes > 69 * u64::from(CHUNK), "{s:?}");
        assert!(s.wire_tx_bytes > 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_is_refused() {
    timeout(LIMIT, async {
        let ids = ids();
        let stranger = Identity::generate().unwrap();
        let (addr, _server) = start(server_opts(&ids, localhost()), MemSource::new(disk(2)));
        let mut opts = client_opts(&ids, addr);
        opts.identity = stranger.clone();
        let check = |e: TransportError| {
            let msg = e.to_string();
            assert!(
                matches!(e, TransportError::CertificateRefused { .. }),
                "{e:?}"
            );
            assert!(msg.contains(&stranger.fingerprint().to_string()), "{msg}");
            assert!(msg.contains("--trust-peer"), "{msg}");
        };
        // The Welcome is 0.5-RTT data, so connecting may succeed before the
        // source has looked at our certificate; then the acceptance never
        // comes, and no request is served (nor retried forever).
        match Client::connect(opts).await {
            Err(e) => check(e),
            Ok(client) => {
                check(client.authenticated().await.unwrap_err());
                check(client.manifest().await.unwrap_err());
                check(
                    client
                        .read_bytes(0, 1, Priority::OnDemand)
                        .await
                        .unwrap_err(),
                );
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_fingerprint_is_refused() {
    timeout(LIMIT, async {
        let ids = ids();
        let (addr, _server) = start(server_opts(&ids, localhost()), MemSource::new(disk(3)));
        let mut opts = client_opts(&ids, addr);
        opts.server_fingerprint = Fingerprint([7; 32]);
        let e = Client::connect(opts).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, TransportError::ServerNotTrusted { .. }),
            "{e:?}"
        );
        assert!(msg.contains(&ids.server.fingerprint().to_string()), "{msg}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_source_names_the_address() {
    timeout(LIMIT, async {
        let ids = ids();
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let mut opts = client_opts(&ids, addr);
        opts.connect_timeout = Duration::from_millis(500);
        let e = Client::connect(opts).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TransportError::Unreachable { .. }), "{e:?}");
        assert!(
            msg.contains(&format!("source {addr} unreachable after")),
            "{msg}"
        );
    })
    .await
    .expect("test timed out");
}

/// Feature: a source given by host name is looked up at connect and again
/// at each reconnect attempt (here the name stays on one address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_named_by_host_is_reached_and_reached_again_after_a_restart() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(4));
        let name: ferry_transport::ServerAddr = "localhost:1".parse().unwrap();
        let ip = name.resolve().await.unwrap()[0].ip();
        let (addr, server) = start(server_opts(&ids, (ip, 0).into()), src.clone());
        let mut opts = client_opts(&ids, addr);
        opts.server = format!("localhost:{}", addr.port()).parse().unwrap();
        let client = Client::connect(opts).await.unwrap();
        assert!(client.read_bytes(1, 1, Priority::OnDemand).await.is_ok());
        server.abort();
        let _ = server.await;
        let c2 = client.clone();
        let pending = tokio::spawn(async move { c2.read_bytes(2, 1, Priority::OnDemand).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _server = restart(server_opts(&ids, addr), src.clone()).await;
        let got = pending.await.unwrap().unwrap();
        assert_eq!(got[0].as_slice(), src.chunk(2));
        assert!(client.stats().reconnects >= 1);
    })
    .await
    .expect("test timed out");
}

/// A name that does not resolve fails the connection at once, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_source_name_is_named_in_the_error() {
    timeout(LIMIT, async {
        let ids = ids();
        let mut opts = client_opts(&ids, localhost());
        opts.server = "no-such-host.invalid:7700".parse().unwrap();
        let e = Client::connect(opts).await.unwrap_err();
        assert!(matches!(e, TransportError::Resolve { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("cannot resolve the source's name no-such-host.invalid:7700"),
            "{e}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_restart() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(4));
        let (addr, server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        assert!(client.read_bytes(1, 1, Priority::OnDemand).await.is_ok());

        server.abort();
        let _ = server.await;
        // A read issued while the source is down waits...
        let c2 = client.clone();
        let pending = tokio::spawn(async move { c2.read_bytes(2, 3, Priority::OnDemand).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!pending.is_finished(), "read did not wait for the source");
        // ...and succeeds once it is back.
        let _server = restart(server_opts(&ids, addr), src.clone()).await;
        let got = pending.await.unwrap().unwrap();
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), src.chunk(2 + i as u64));
        }
        let got = client.read_bytes(6, 1, Priority::Background).await.unwrap();
        assert_eq!(got[0].as_slice(), src.chunk(6));
        let s = client.stats();
        assert!(s.reconnects >= 1, "{s:?}");
        assert_eq!(s.state, ConnState::Connected);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_in_flight_survives_a_restart() {
    timeout(LIMIT, async {
        let ids = ids();
        let data = disk(10);
        let slow = MemSource::slow(data.clone(), Duration::from_millis(400));
        let (addr, server) = start(server_opts(&ids, localhost()), slow);
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        let c2 = client.clone();
        // Chunks 1..=4 take 400 ms to read (one background read of the
        // run): the server dies in the middle.
        let pending = tokio::spawn(async move { c2.read_bytes(1, 4, Priority::Background).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        server.abort();
        let _ = server.await;
        let fast = MemSource::new(data);
        let _server = restart(server_opts(&ids, addr), fast.clone()).await;
        let got = pending.await.unwrap().unwrap();
        assert_eq!(got.len(), 4);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), fast.chunk(1 + i as u64));
        }
        assert!(client.stats().reconnects >= 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_source_sends_its_change_rounds_and_its_last_list_at_the_switchover() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::live(disk(7));
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        assert!(client.info().live, "the Welcome says the source is live");
        let mut feed = client.precopy(0).await.unwrap();
        // At once: nothing written yet.
        let first = feed.next().await.unwrap();
        assert_eq!((first.generation, first.chunks.clone()), (0, vec![]));
        // The VM writes; the next round names it.
        let live = src.live.as_ref().unwrap();
        live.log.lock().unwrap().record(3..5);
        live.log.lock().unwrap().record(9..10);
        let round = feed.next().await.unwrap();
        assert_eq!(round.generation, 1);
        assert_eq!(round.chunks, vec![3..5, 9..10]);
        assert!(!round.everything);
        feed.applied(1).await.unwrap();
        // A generation the source never published: it cannot tell.
        let mut lost = client.precopy(7).await.unwrap();
        assert!(lost.next().await.unwrap().everything);
        // The switchover: frozen, a last generation with what changed
        // after the one applied.
        live.log.lock().unwrap().record(4..5);
        // A freeze refused (the VM still runs): an error naming why, the
        // source still live.
        *live.refuse.lock().unwrap() = Some("the VM still runs".into());
        let e = client.switchover(1).await.unwrap_err();
        assert!(e.to_string().contains("the VM still runs"), "{e}");
        assert!(!live.frozen.load(std::sync::atomic::Ordering::SeqCst));
        let last = client.switchover(1).await.unwrap();
        assert_eq!((last.generation, last.chunks), (2, vec![4..5]));
        assert!(live.frozen.load(std::sync::atomic::Ordering::SeqCst));
        // Frozen, it is no longer live to a new destination.
        let again = Client::connect(client_opts(&ids, addr)).await.unwrap();
        assert!(!again.info().live);
        // A source nobody writes has no changes, ever.
        let (quiet, _s2) = start(server_opts(&ids, localhost()), MemSource::new(disk(8)));
        let q = Client::connect(client_opts(&ids, quiet)).await.unwrap();
        assert!(!q.info().live);
        let mut f = q.precopy(0).await.unwrap();
        let c = f.next().await.unwrap();
        assert_eq!((c.generation, c.chunks, c.everything), (0, vec![], false));
        let c = q.switchover(0).await.unwrap();
        assert_eq!((c.generation, c.chunks), (0, vec![]));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_source_is_detected() {
    timeout(LIMIT, async {
        let ids = ids();
        let (addr, server) = start(server_opts(&ids, localhost()), MemSource::new(disk(5)));
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        assert!(client.read_bytes(1, 1, Priority::OnDemand).await.is_ok());
        server.abort();
        let _ = server.await;
        let _server = restart(server_opts(&ids, addr), MemSource::new(disk(6))).await;
        let e = client
            .read_bytes(1, 1, Priority::OnDemand)
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::SourceChanged { .. }), "{e:?}");
        // And for every later caller too.
        let e = client
            .read_bytes(2, 1, Priority::Background)
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::SourceChanged { .. }), "{e:?}");
    })
    .await
    .expect("test timed out");
}

/// Sends `bytes` on a new stream and returns the decoded response frames,
/// or None if the stream was reset.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Option<Vec<Message>> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The server may stop our stream early: write errors are fine.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let buf = match recv.read_to_end(16 << 20).await {
        Ok(b) => b,
        Err(_) => return None,
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let (m, used) = wire::decode(&buf[pos..]).expect("server sent a malformed frame");
        out.push(m);
        pos += used;
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_do_not_break_the_connection() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(7));
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let cfg =
            tls::quinn_client_config(&ids.client, ids.server.fingerprint(), &tuning()).unwrap();
        let endpoint = quinn::Endpoint::client(localhost()).unwrap();
        let conn = endpoint
            .connect_with(cfg, addr, tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();

        let garbage: [&[u8]; 5] = [
            &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], // too long
            &[3, 0, 0, 0, 99, 1, 2],            // unknown type
            &[2, 0, 0, 0, 4, 1],                // Read with a short payload
            &[0, 0, 0, 0],                      // empty frame
            &[40, 0, 0, 0, 4, 1, 2],            // ends inside the frame
        ];
        for g in garbage {
            match raw_exchange(&conn, g).await {
                None => {}
                Some(frames) => assert!(
                    matches!(
                        frames.as_slice(),
                        [Message::Error {
                            code: ErrorCode::Malformed,
                            ..
                        }]
                    ),
                    "{g:?} -> {frames:?}"
                ),
            }
        }
        // A response frame as a request.
        let r = raw_exchange(
            &conn,
            &Message::Welcome {
                version: 1,
                manifest_len: 0,
                disk_size: 0,
                chunk_size: 4096,
                source_id: [0; 32],
                live: false,
            }
            .encode(),
        )
        .await;
        assert!(
            matches!(
                r.as_deref(),
                None | Some([Message::Error {
                    code: ErrorCode::UnexpectedMessage,
                    ..
                }])
            ),
            "{r:?}"
        );
        // Another protocol version.
        let r = raw_exchange(&conn, &Message::Hello { version: 99 }.encode()).await;
        assert!(
            matches!(
                r.as_deref(),
                Some([Message::Error {
                    code: ErrorCode::VersionMismatch,
                    ..
                }])
            ),
            "{r:?}"
        );
        // A proper Read on the same connection still works.
        let read = Message::Read {
            first_chunk: 1,
            count: 2,
            priority: Priority::OnDemand,
        };
        let r = raw_exchange(&conn, &read.encode())
            .await
            .expect("read was reset");
        assert_eq!(
            r,
            vec![
                Message::Chunk {
                    index: 1,
                    hash: *blake3::hash(src.chunk(1)).as_bytes(),
                    data: src.chunk(1).to_vec()
                },
                Message::Chunk {
                    index: 2,
                    hash: *blake3::hash(src.chunk(2)).as_bytes(),
                    data: src.chunk(2).to_vec()
                },
            ]
        );
        assert!(conn.close_reason().is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_names_the_address() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(8));
        let first = Server::bind(server_opts(&ids, localhost()), src.clone()).unwrap();
        let addr = first.local_addr();
        let e = Server::bind(server_opts(&ids, addr), src).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TransportError::Bind { .. }), "{e:?}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_once_corrupts_only_the_first_transmission() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(9));
        let mut opts = server_opts(&ids, localhost());
        opts.corrupt_once = vec![3];
        let (addr, _server) = start(opts, src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        let m = client.manifest().await.unwrap();
        // Background reads: an on-demand read on this young connection is
        // hedged, and its second, intact copy may win the race.
        let first = client.read_bytes(2, 2, Priority::Background).await.unwrap();
        assert!(hash_ok(&m, 2, &first[0]), "chunk 2 must be intact");
        assert!(!hash_ok(&m, 3, &first[1]), "chunk 3 must be corrupted once");
        let again = client.read_bytes(3, 1, Priority::Background).await.unwrap();
        assert!(hash_ok(&m, 3, &again[0]), "second read must be correct");
        assert_eq!(again[0].as_slice(), src.chunk(3));
    })
    .await
    .expect("test timed out");
}

/// Background chunks are read (and compressed) on threads of lower CPU
/// priority, on-demand chunks at the server's own priority: a busy
/// background copy does not take the CPU from a guest's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_chunks_are_read_at_a_lower_cpu_priority_than_on_demand_ones() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(11));
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        let ours = this_threads_nice();
        client.read_bytes(1, 4, Priority::Background).await.unwrap();
        client.read_bytes(6, 3, Priority::OnDemand).await.unwrap();
        let seen = src.reader_nice.lock().unwrap().clone();
        // On-demand reads of a young connection are hedged: each chunk
        // may be read more than once.
        for c in [1, 2, 3, 4, 6, 7, 8] {
            assert!(
                seen.iter().any(|&(k, _)| k == c),
                "chunk {c} not read: {seen:?}"
            );
        }
        // Ten levels below our own priority, clamped at the lowest (19):
        // never above it, also when we run at nice 19 ourselves.
        let background = (ours + 10).min(19);
        for (chunk, nice) in seen {
            if chunk < 5 {
                assert!(
                    nice == background && (nice > ours || ours == 19),
                    "background chunk {chunk} read at nice {nice}, we run at {ours}"
                );
            } else {
                assert_eq!(nice, ours, "on-demand chunk {chunk} read at nice {nice}");
            }
        }
    })
    .await
    .expect("test timed out");
}

/// 200 chunks, of which chunk 7 of every 25 is zero, served with
/// `disk_reads` from a disk that takes 3 ms per read; eight background
/// requests of 25 chunks at once, as the copier keeps many batches in
/// flight. Checks every answer and returns the reads that reached the disk
/// as `(first, count)`, sorted, and the most that were at the disk at once.
async fn eight_background_requests(disk_reads: DiskReads) -> (Vec<(u64, u64)>, usize) {
    let ids = ids();
    let mut data: Vec<u8> = (0..200 * CHUNK as usize)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    for r in 0..8 {
        let s = (r * 25 + 7) * CHUNK as usize;
        data[s..s + CHUNK as usize].fill(0);
    }
    let src = MemSource::slow(data, Duration::from_millis(3));
    let mut opts = server_opts(&ids, localhost());
    opts.disk_reads = disk_reads;
    let (addr, _server) = start(opts, src.clone());
    let client = Arc::new(Client::connect(client_opts(&ids, addr)).await.unwrap());
    let mut tasks = Vec::new();
    for r in 0..8u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            (
                r,
                client.read_chunks(r * 25, 25, Priority::Background).await,
            )
        }));
    }
    for t in tasks {
        let (r, got) = t.await.unwrap();
        let got = got.unwrap();
        assert_eq!(got.len(), 25);
        for (i, f) in got.into_iter().enumerate() {
            let c = r * 25 + i as u64;
            match f {
                Fetched::Zero => assert_eq!(c % 25, 7, "chunk {c} answered as zero"),
                Fetched::Data { bytes, .. } => {
                    assert_eq!(bytes.as_slice(), src.chunk(c), "chunk {c}")
                }
            }
        }
    }
    let mut seen = src.disk_reads.lock().unwrap().clone();
    seen.sort();
    let most = src.disk_most.load(std::sync::atomic::Ordering::SeqCst);
    (seen, most)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reads_reach_the_disk_as_runs_of_up_to_1_mib_one_at_a_time() {
    timeout(LIMIT, async {
        let (seen, most) = eight_background_requests(DiskReads::default()).await;
        // Each request's data chunks went to the disk in runs of at most
        // 16 chunks (1 MiB), never across a zero chunk, each chunk once.
        let mut want = Vec::new();
        for r in 0..8u64 {
            want.extend([(r * 25, 7), (r * 25 + 8, 16), (r * 25 + 24, 1)]);
        }
        assert_eq!(seen, want);
        // One at the disk at a time, though eight requests wanted to read.
        assert_eq!(most, 1, "background reads at the disk at once");
    })
    .await
    .expect("test timed out");
}

/// The operator's bounds (`ferry serve --background-disk-reads`,
/// `--background-read-kib`) replace the defaults: runs of 4 chunks, and
/// more than one read at the disk at once, never more than asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_disk_reads_follow_the_operators_bounds() {
    timeout(LIMIT, async {
        let (seen, most) = eight_background_requests(DiskReads {
            at_once: 3,
            read_bytes: 4 * u64::from(CHUNK) + 100,
        })
        .await;
        let mut want = Vec::new();
        for r in 0..8u64 {
            let b = r * 25;
            want.extend([(b, 4), (b + 4, 3)]);
            want.extend([
                (b + 8, 4),
                (b + 12, 4),
                (b + 16, 4),
                (b + 20, 4),
                (b + 24, 1),
            ]);
        }
        want.sort();
        assert_eq!(seen, want);
        assert!(
            (2..=3).contains(&most),
            "{most} background reads at the disk at once, bound 3"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_read_bounds_out_of_range_are_refused_by_name() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(4));
        for (d, what) in [
            (
                DiskReads {
                    at_once: 0,
                    ..DiskReads::default()
                },
                "at once",
            ),
            (
                DiskReads {
                    at_once: 9,
                    ..DiskReads::default()
                },
                "at once",
            ),
            (
                DiskReads {
                    read_bytes: u64::from(CHUNK) - 1,
                    ..DiskReads::default()
                },
                "background read must be",
            ),
            (
                DiskReads {
                    read_bytes: 17 << 20,
                    ..DiskReads::default()
                },
                "background read must be",
            ),
        ] {
            let mut opts = server_opts(&ids, localhost());
            opts.disk_reads = d;
            let e = Server::bind(opts, src.clone()).unwrap_err();
            assert!(matches!(e, TransportError::Options { .. }), "{e:?}");
            assert!(e.to_string().contains(what), "{e}");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_are_split() {
    timeout(LIMIT, async {
        let ids = ids();
        // 300 data chunks (18.75 MiB): more than one 16 MiB request.
        let data: Vec<u8> = (0..300 * CHUNK as usize)
            .map(|i| (i % 251) as u8 | 1)
            .collect();
        let src = MemSource::new(data);
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        let got = client
            .read_bytes(0, 300, Priority::Background)
            .await
            .unwrap();
        assert_eq!(got.len(), 300);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), src.chunk(i as u64), "chunk {i}");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressible_chunks_cross_the_wire_compressed_and_arrive_exact() {
    timeout(LIMIT, async {
        let ids = ids();
        // Text-like, highly compressible data: 64 chunks.
        let data: Vec<u8> = (0..64 * CHUNK as usize)
            .map(|i| b"ferry moves disks; "[i % 19])
            .collect();
        let src = MemSource::new(data);
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());
        let client = Client::connect(client_opts(&ids, addr)).await.unwrap();
        let m = client.manifest().await.unwrap();
        let before = client.stats().wire_rx_bytes;
        let got = client
            .read_bytes(0, 64, Priority::Background)
            .await
            .unwrap();
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.as_slice(), src.chunk(i as u64));
            assert!(hash_ok(&m, i as u64, d));
        }
        let wire = client.stats().wire_rx_bytes - before;
        assert!(
            wire < 64 * u64::from(CHUNK) / 10,
            "{wire} bytes on the wire for {} bytes of compressible data",
            64 * CHUNK
        );
        // Without compression the same read costs the full size.
        let mut opts = server_opts(&ids, localhost());
        opts.compress = false;
        let (addr2, _server2) = start(opts, src.clone());
        let plain = Client::connect(client_opts(&ids, addr2)).await.unwrap();
        let before = plain.stats().wire_rx_bytes;
        plain.read_bytes(0, 64, Priority::Background).await.unwrap();
        assert!(plain.stats().wire_rx_bytes - before > 64 * u64::from(CHUNK));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_reads_are_hedged_on_a_lossy_path_only() {
    timeout(LIMIT, async {
        let ids = ids();
        let src = MemSource::new(disk(9));
        let data = data_chunks(&src.manifest);
        let (addr, _server) = start(server_opts(&ids, localhost()), src.clone());

        // A clean path. A young connection hedges: the source has sent too
        // few packets for "no loss seen" to mean anything.
        let clean = Client::connect(client_opts(&ids, addr)).await.unwrap();
        clean.authenticated().await.unwrap();
        let got = clean
            .read_bytes(data[0], 1, Priority::OnDemand)
            .await
            .unwrap();
        assert_eq!(got[0].as_slice(), src.chunk(data[0]));
        assert_eq!(clean.stats().hedged_reads, 1);
        // Background copy until the source's reports rest on enough
        // packets; then, with no loss reported, nothing is hedged.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while clean.stats().source_sent_packets < ferry_transport::path::TRUSTED_PACKETS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the source's reports never reached {} packets: {:?}",
                ferry_transport::path::TRUSTED_PACKETS,
                clean.stats()
            );
            for &c in &data {
                let got = clean.read_bytes(c, 1, Priority::Background).await.unwrap();
                assert_eq!(got[0].as_slice(), src.chunk(c));
            }
            // The next report (every 100 ms) carries the new count.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for &c in &data[..8] {
            let got = clean.read_bytes(c, 1, Priority::OnDemand).await.unwrap();
            assert_eq!(got[0].as_slice(), src.chunk(c));
        }
        assert_eq!(clean.stats().hedged_reads, 1, "{:?}", clean.stats());
        assert_eq!(clean.stats().source_lost_ppm, 0);

        // 2% of the datagrams towards the destination dropped.
        let relay = relay(addr, 50, Duration::ZERO);
        let lossy = Client::connect(client_opts(&ids, relay)).await.unwrap();
        lossy.authenticated().await.unwrap();
        // Background copy until the source has measured and reported its
        // loss; background reads are never hedged.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while lossy.stats().source_lost_ppm < 5000 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the source never reported the loss: {:?}",
                lossy.stats()
            );
            for &c in &data {
                let got = lossy.read_bytes(c, 1, Priority::Background).await.unwrap();
                assert_eq!(got[0].as_slice(), src.chunk(c));
            }
        }
        let young = lossy.stats().hedged_reads;
        assert_eq!(young, 0, "background reads hedged");
        // Now every on-demand read goes out three times (2% loss: a 64 KiB
        // answer loses a datagram 61% of the time) and still returns the
        // right bytes, once.
        let before = src.reads.load(std::sync::atomic::Ordering::Relaxed);
        for &c in &data[..6] {
            let got = lossy.read_bytes(c, 1, Priority::OnDemand).await.unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].as_slice(), src.chunk(c), "chunk {c}");
        }
        assert_eq!(lossy.stats().hedged_reads, 6);
        // The source saw more than one request of at least some of them (a
        // later copy may be stopped before it is read).
        let reads = src.reads.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            reads > 6,
            "{reads} chunk reads at the source for 6 hedged reads"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_datagrams_carry_the_data_with_under_2_percent_overhead() {
    timeout(LIMIT, async {
        // Loopback takes 9000-byte packets: told the link has jumbo frames,
        // both ends send datagrams of up to 8972 bytes once MTU discovery
        // has found them (quinn's GSO batches of 10 would not fit one send:
        // they must not be lost).
        let ids = ids();
        let src = MemSource::new(disk(11));
        let data = data_chunks(&src.manifest);
        let mut sopts = server_opts(&ids, localhost());
        sopts.tuning = tuning().with_link_mtu(9000);
        sopts.compress = false;
        let (addr, _server) = start(sopts, src.clone());
        let mut copts = client_opts(&ids, addr);
        copts.tuning = tuning().with_link_mtu(9000);
        let client = Client::connect(copts).await.unwrap();
        client.authenticated().await.unwrap();
        // Warm up: MTU discovery runs in the first round trips.
        for &c in &data[..4] {
            client.read_bytes(c, 1, Priority::Background).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = client.stats().wire_rx_bytes;
        let mut bytes = 0u64;
        for _ in 0..8 {
            for &c in &data {
                let got = client.read_bytes(c, 1, Priority::Background).await.unwrap();
                assert_eq!(got[0].as_slice(), src.chunk(c));
                bytes += got[0].len() as u64;
            }
        }
        // Let a Path report carry the source's loss count.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let st = client.stats();
        let ratio = (st.wire_rx_bytes - before) as f64 / bytes as f64;
        assert!(ratio < 1.02, "wire/data {ratio:.4} ({st:?})");
        assert!(st.source_lost_ppm < 1000, "{st:?}");
    })
    .await
    .expect("test timed out");
}

/// A UDP relay in front of `server`. The server's datagrams go to the
/// client one at a time, `gap` apart (when not zero), as a paced link
/// delivers them (on bare loopback a whole train arrives at once and is
/// acknowledged by one ACK whatever the ACK frequency); with `drop_every`
/// above zero, every `drop_every`-th of them after the first 20 (so the
/// handshake is not slowed) is dropped.
fn relay(server: SocketAddr, drop_every: u64, gap: Duration) -> SocketAddr {
    let front = std::net::UdpSocket::bind(localhost()).unwrap();
    let back = std::net::UdpSocket::bind(localhost()).unwrap();
    back.connect(server).unwrap();
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, c) = (
        front.try_clone().unwrap(),
        back.try_clone().unwrap(),
        client.clone(),
    );
    // Both threads end when the test process does; a read timeout bounds
    // each wait.
    for s in [&front, &back] {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let end = std::time::Instant::now() + LIMIT;
        while std::time::Instant::now() < end {
            if let Ok((n, from)) = f.recv_from(&mut buf) {
                *c.lock().unwrap() = Some(from);
                let _ = b.send(&buf[..n]);
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let end = std::time::Instant::now() + LIMIT;
        let mut count = 0u64;
        while std::time::Instant::now() < end {
            if let Ok(n) = back.recv(&mut buf) {
                count += 1;
                if drop_every > 0 && count > 20 && count.is_multiple_of(drop_every) {
                    continue;
                }
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to);
                }
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_acknowledges_about_every_8th_datagram() {
    timeout(LIMIT, async {
        // Both ends ask for an ACK every ACK_EVERY_PACKETS ack-eliciting
        // packets (or after 10 ms), not quinn's default of every 2nd: an
        // ACK costs the destination a send and the source a receive, and
        // the path an ACK-sized datagram, per couple of data datagrams.
        let ids = ids();
        let src = MemSource::new(disk(12));
        let data = data_chunks(&src.manifest);
        let mut sopts = server_opts(&ids, localhost());
        sopts.compress = false;
        let (addr, _server) = start(sopts, src.clone());
        let relay = relay(addr, 0, Duration::from_micros(100));
        let client = Client::connect(client_opts(&ids, relay)).await.unwrap();
        client.authenticated().await.unwrap();
        // The ACK_FREQUENCY frame goes out once the handshake is confirmed.
        client
            .read_bytes(data[0], 1, Priority::Background)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = client.stats();
        for _ in 0..2 {
            // Eight reads in flight: the source sends long trains.
            let mut tasks = Vec::new();
            for part in data.chunks(data.len().div_ceil(8)) {
                let (client, part) = (client.clone(), part.to_vec());
                tasks.push(tokio::spawn(async move {
                    for c in part {
                        client.read_bytes(c, 1, Priority::Background).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        let st = client.stats();
        let datagrams = st.wire_rx_datagrams - before.wire_rx_datagrams;
        let acks = st.acks_sent - before.acks_sent;
        // 2 x 52 chunks of 64 KiB: about 4600 datagrams.
        assert!(datagrams > 4000, "{datagrams} datagrams ({st:?})");
        // Every 8th is 1/8; requests and the ends of trains (acknowledged
        // after max_ack_delay) add a few. Every 2nd would be 1/2.
        let per = acks as f64 / datagrams as f64;
        eprintln!("{acks} ACKs for {datagrams} datagrams ({per:.3})");
        assert!(
            per < 0.2,
            "{acks} ACKs for {datagrams} datagrams ({per:.3})"
        );
    })
    .await
    .expect("test timed out");
}
