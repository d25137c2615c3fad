//! The background copier, the periodic sync, the final verification and
//! the control socket of a pull.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_core::engine::FetchKind;
use ferry_core::{ControlParseError, ControlRequest, Phase};
use ferry_transport::ConnState;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::{CopierSettings, Report, Shared};
use crate::control::Status;

/// Outcome of the end-to-end verification.
#[derive(Debug, Default, Clone)]
pub(crate) struct Verification {
    /// "pending", "running", "ok" or "failed".
    pub(crate) state: String,
    pub(crate) chunks_checked: u64,
    pub(crate) mismatches: Vec<u64>,
    pub(crate) disk_blake3: Option<String>,
    /// `disk_blake3` as bytes (zero until known).
    pub(crate) disk_blake3_bytes: [u8; 32],
    /// Chunks that earlier rounds found differing from the source and
    /// fetched again (so `ok` after them means repaired, not clean).
    pub(crate) refetched: u64,
}

/// Verification rounds: after a failed one, the mismatching chunks are
/// fetched again and the disk verified again, at most this many times in
/// all; a mismatch that survives a fresh fetch is reported as failed.
const MAX_VERIFY_ROUNDS: u32 = 3;

/// Fetches the manifest (while the disk is already served) and hands it to
/// the engine, which starts the background copy.
pub(crate) async fn fetch_manifest(shared: Arc<Shared>) {
    let client = shared.client().await;
    let t0 = Instant::now();
    match client.manifest().await {
        Ok(m) => {
            tracing::info!(
                data_bytes = m.data_bytes(),
                ms = t0.elapsed().as_millis() as u64,
                "manifest received; background copy can start"
            );
            shared.engine.lock().expect("engine lock").set_manifest(m);
        }
        Err(e) => {
            shared
                .engine
                .lock()
                .expect("engine lock")
                .fail(format!("cannot fetch the source's manifest: {e}"));
        }
    }
    shared.changed.notify_waiters();
}

/// Background requests in flight at the start of the copy (see
/// `run_copier`).
const RAMP_START: usize = 4;

/// How many background requests may be in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Window {
    /// As many as the operator said (`--window`).
    Fixed(usize),
    /// Enough for four times the link's bandwidth-delay product (`bdp`,
    /// bytes) *on the wire*, from the compression the copy has seen so
    /// far; `request_bytes` is a request's uncompressed size. A window
    /// counted in uncompressed bytes left a link idle where the source's
    /// data compresses: measured on the ext4 image at 200 Mbit/s and
    /// 50 ms, 5 requests of 1 MiB (2.6:1, so 1.6 BDP on the wire) filled
    /// 78% of the link and the copy took 15.1 s; 12 requests, 12.5 s.
    Wire { bdp: f64, request_bytes: f64 },
}

/// Uncompressed bytes fetched after which their compression ratio is
/// trusted (before that, data counts as incompressible).
const RATIO_AFTER_BYTES: u64 = 8 << 20;

impl Window {
    /// The window of a copy over a link of `link_mbit` Mbit/s and
    /// `link_rtt_ms` ms RTT, with requests of `request_bytes`.
    pub(crate) fn wire(link_mbit: u64, link_rtt_ms: u64, request_bytes: u64) -> Window {
        Window::Wire {
            bdp: ferry_transport::tuning::bdp_bytes(
                link_mbit.saturating_mul(1_000_000),
                Duration::from_millis(link_rtt_ms),
            ) as f64,
            request_bytes: request_bytes as f64,
        }
    }

    /// Requests allowed in flight after `fetched` uncompressed bytes came
    /// in over `wire` bytes of UDP payload.
    pub(crate) fn requests(self, fetched: u64, wire: u64) -> usize {
        match self {
            Window::Fixed(n) => n,
            Window::Wire { bdp, request_bytes } => {
                let ratio = if fetched >= RATIO_AFTER_BYTES && wire > 0 {
                    (fetched as f64 / wire as f64).clamp(1.0, 16.0)
                } else {
                    1.0
                };
                ((4.0 * bdp * ratio / request_bytes).ceil() as usize).clamp(4, 128)
            }
        }
    }
}

/// Seconds of the rate a background copy may have in flight beyond two
/// round trips of the link (for the source's reads and compression).
const IN_FLIGHT_SLACK_SECS: f64 = 0.1;

/// The background copy's rate limit (`--rate`, `ferry background rate=`).
///
/// Requests go out paced: after one of `b` bytes, the next waits `b /
/// rate` seconds, and no credit is banked while the copier is idle or
/// held up (the next request is never due before now). That alone did not
/// keep the rate through an outage: the requests paced out while the link
/// was down waited in flight and all came in at once when it came back
/// (10–22 MB within a second against a limit of 1.5–2 MB/s, in 6 of 6
/// reconnects). So the bytes in flight are bounded too, by what the rate
/// needs over two round trips of the link and a little more
/// ([`IN_FLIGHT_SLACK_SECS`]), at least one request: after an outage of
/// any length, the copy delivers at most that bound and one more request
/// at once, then the rate.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When the next request is due.
    next: Option<Instant>,
}

/// What [`Throttle::gate`] says of the next background request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Send it now.
    Go,
    /// Wait until then.
    Until(Instant),
    /// Wait for answers to the requests in flight.
    Answers,
}

impl Throttle {
    /// Bytes of background requests allowed in flight at `rate` bytes
    /// per second over a link of round-trip time `rtt` (0: no bound).
    pub(crate) fn in_flight_bound(rate: u64, rtt: Duration) -> u64 {
        if rate == 0 {
            return 0;
        }
        (rate as f64 * (2.0 * rtt.as_secs_f64() + IN_FLIGHT_SLACK_SECS)) as u64
    }

    /// Whether a request of `bytes` may go out at `now` at `rate` bytes
    /// per second (0: unlimited), with `in_flight` bytes of background
    /// requests not yet answered.
    pub(crate) fn gate(
        &self,
        now: Instant,
        rate: u64,
        rtt: Duration,
        in_flight: u64,
        bytes: u64,
    ) -> Gate {
        if rate == 0 {
            return Gate::Go;
        }
        if in_flight > 0 && in_flight + bytes > Self::in_flight_bound(rate, rtt) {
            return Gate::Answers;
        }
        match self.next {
            Some(t) if t > now => Gate::Until(t),
            _ => Gate::Go,
        }
    }

    /// A request of `bytes` went out at `now`.
    pub(crate) fn sent(&mut self, now: Instant, rate: u64, bytes: u64) {
        if rate == 0 {
            self.next = None;
            return;
        }
        let from = self.next.map_or(now, |t| t.max(now));
        self.next = Some(from + Duration::from_secs_f64(bytes as f64 / rate as f64));
    }
}

/// Fetches every absent data chunk, paced and windowed, then verifies.
pub(crate) async fn run_copier(
    shared: Arc<Shared>,
    settings: Arc<CopierSettings>,
    report: Arc<Report>,
) {
    let mut throttle = Throttle::default();
    // Requests issued so far: the window opens like slow start, from
    // RAMP_START requests by one per completed request, so the copier's
    // first burst does not stand in front of the guest's first reads.
    let mut issued = 0usize;
    let mut rounds = 0u32;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (phase, unsynced, fetched) = {
            let e = shared.engine.lock().expect("engine lock");
            let c = e.counters();
            (
                e.phase(),
                e.unsynced_bytes(),
                c.fetched_background + c.fetched_on_demand,
            )
        };
        match phase {
            Phase::Complete => {
                rounds += 1;
                if verify(&shared, &report, rounds < MAX_VERIFY_ROUNDS).await {
                    continue;
                }
                return;
            }
            Phase::Error(e) => {
                tracing::error!("migration stopped: {e}");
                return;
            }
            Phase::Copying => {}
        }
        let in_flight = shared.bg_in_flight.load(Ordering::Relaxed) as usize;
        // Fetched data could not be written (e.g. a full filesystem): one
        // request at a time, after a wait that doubles with each failed
        // try (up to FILL_BACKOFF_MAX), until one works again.
        let retry_at = shared.fill_trouble().retry_at();
        if let Some(at) = retry_at {
            if in_flight > 0 {
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                continue;
            }
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
        }
        // Back-pressure: at most `window` requests in flight, and no more
        // than one sync batch of unsynced data, so a crash costs at most
        // one batch of re-fetching.
        let completed = issued.saturating_sub(in_flight);
        let wire = shared.client_now().map_or(0, |c| c.stats().wire_rx_bytes);
        let window = settings
            .window
            .requests(fetched, wire)
            .min(RAMP_START + completed);
        let rate = settings.rate_limit.load(Ordering::Relaxed);
        let geo = shared.engine.lock().expect("engine lock").geometry();
        let largest = settings.batch_chunks * u64::from(geo.chunk_size);
        let in_flight_bytes = shared.bg_in_flight_bytes.load(Ordering::Relaxed);
        let answers = throttle.gate(
            Instant::now(),
            rate,
            settings.link_rtt,
            in_flight_bytes,
            largest,
        ) == Gate::Answers;
        if in_flight >= window || unsynced >= settings.sync_bytes || answers {
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            continue;
        }
        let next = shared
            .engine
            .lock()
            .expect("engine lock")
            .next_background(settings.batch_chunks);
        let Some(range) = next else {
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            continue;
        };
        let bytes: u64 = range.clone().map(|c| u64::from(geo.chunk_len(c))).sum();
        if let Gate::Until(t) = throttle.gate(Instant::now(), rate, settings.link_rtt, 0, bytes) {
            tokio::time::sleep_until(t.into()).await;
        }
        throttle.sent(Instant::now(), rate, bytes);
        shared.bg_in_flight.fetch_add(1, Ordering::Relaxed);
        shared
            .bg_in_flight_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        issued += 1;
        let s = shared.clone();
        tokio::spawn(async move {
            s.clone().fetch(range, FetchKind::Background).await;
            s.bg_in_flight.fetch_sub(1, Ordering::Relaxed);
            s.bg_in_flight_bytes.fetch_sub(bytes, Ordering::Relaxed);
            s.changed.notify_waiters();
        });
    }
}

/// Persists the block map every second, or sooner when a batch of
/// `sync_bytes` is waiting; samples the progress rate.
pub(crate) async fn run_syncer(
    shared: Arc<Shared>,
    settings: Arc<CopierSettings>,
    report: Arc<Report>,
) {
    let mut last_sync = Instant::now();
    let mut last_status = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (unsynced, present) = {
            let e = shared.engine.lock().expect("engine lock");
            (e.unsynced_bytes(), e.present_bytes())
        };
        report.rate.sample(Instant::now(), present);
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            let total = shared.backing.size().max(1);
            crate::notify::notify(&format!(
                "STATUS={:.1}% present, {} B/s",
                present as f64 * 100.0 / total as f64,
                report.rate.last_rate.load(Ordering::Relaxed)
            ));
        }
        if unsynced > 0
            && (unsynced >= settings.sync_bytes || last_sync.elapsed() >= Duration::from_secs(1))
        {
            if let Err(e) = shared.sync().await {
                tracing::error!(error = %e, "periodic sync failed; will retry");
            }
            last_sync = Instant::now();
            shared.changed.notify_waiters();
        }
    }
}

/// Once every block is present: sync, then read the whole disk, hash it,
/// and check every chunk the guest never wrote against the source's hash.
/// With `may_refetch`, chunks that differ (and that the guest did not write
/// meanwhile) are made absent again, in the engine and the state file, so
/// the copier fetches them anew: returns true then, and the copy goes on.
async fn verify(shared: &Arc<Shared>, report: &Arc<Report>, may_refetch: bool) -> bool {
    let refetched_before = report.verify.lock().expect("verify lock").refetched;
    if let Err(e) = shared.sync().await {
        tracing::error!(error = %e, "sync before verification failed");
    }
    report.verify.lock().expect("verify lock").state = "running".into();
    tracing::info!("every block is present; verifying the whole disk against the source's hashes");
    let s = shared.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<Verification> {
        let (geo, manifest) = {
            let e = s.engine.lock().expect("engine lock");
            let m = e
                .manifest()
                .cloned()
                .ok_or_else(|| std::io::Error::other("no manifest"))?;
            (e.geometry(), m)
        };
        let mut disk = blake3::Hasher::new();
        let mut v = Verification::default();
        let mut buf = Vec::new();
        for c in 0..geo.chunks() {
            let r = geo.chunk_bytes(c);
            buf.resize((r.end - r.start) as usize, 0);
            s.backing.read_at(&mut buf, r.start)?;
            disk.update(&buf);
            if s.engine.lock().expect("engine lock").guest_wrote(c) {
                continue;
            }
            // Every chunk the guest did not write: data against its hash,
            // zero chunks against zeros.
            v.chunks_checked += 1;
            let same = match manifest.chunk(c) {
                ferry_core::ChunkKind::Data(h) => *blake3::hash(&buf).as_bytes() == h,
                ferry_core::ChunkKind::Zero => buf.iter().all(|b| *b == 0),
            };
            if !same && !s.engine.lock().expect("engine lock").guest_wrote(c) {
                v.mismatches.push(c);
            }
        }
        let digest = disk.finalize();
        v.disk_blake3 = Some(digest.to_hex().to_string());
        v.disk_blake3_bytes = *digest.as_bytes();
        v.state = if v.mismatches.is_empty() {
            "ok"
        } else {
            "failed"
        }
        .into();
        Ok(v)
    })
    .await;
    let mut v = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => Verification {
            state: format!("failed: {e}"),
            ..Default::default()
        },
        Err(e) => Verification {
            state: format!("failed: {e}"),
            ..Default::default()
        },
    };
    v.refetched = refetched_before;
    if may_refetch && !v.mismatches.is_empty() {
        let cleared = shared
            .engine
            .lock()
            .expect("engine lock")
            .refetch(&v.mismatches);
        if !cleared.is_empty() {
            let state = shared.state.clone();
            let n = cleared.len() as u64;
            let blocks = cleared.clone();
            let res = tokio::task::spawn_blocking(move || {
                state.lock().expect("state lock").clear_present(&blocks)
            })
            .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot record the chunks to fetch again; a restart verifies them again")
                }
                Err(e) => tracing::error!(error = %e, "state task failed"),
            }
            tracing::warn!(
                chunks = ?v.mismatches,
                "verification found chunks differing from the source's hashes; fetching them again"
            );
            v.refetched += n;
            v.state = "refetching".into();
            *report.verify.lock().expect("verify lock") = v;
            shared.changed.notify_waiters();
            return true;
        }
    }
    if v.state == "ok" {
        tracing::info!(
            chunks = v.chunks_checked,
            refetched = v.refetched,
            disk_blake3 = v.disk_blake3.as_deref().unwrap_or(""),
            "copy complete and verified: every chunk the guest did not write equals the source; the source may be stopped"
        );
        // Recorded durably: a restart serves the disk without the source.
        let record = ferry_store::Verified {
            disk_blake3: v.disk_blake3_bytes,
            chunks_checked: v.chunks_checked,
        };
        let state = shared.state.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            state.lock().expect("state lock").record_verified(record)
        })
        .await;
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot record the verification; a restart will need the source")
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the verification; a restart will need the source")
            }
        }
        // Nothing more is needed from the source: let it go.
        if let Some(c) = shared.client_now() {
            c.close();
        }
    } else {
        tracing::error!(state = %v.state, mismatches = ?v.mismatches, refetched = v.refetched, "verification FAILED");
    }
    *report.verify.lock().expect("verify lock") = v;
    false
}

/// Removes a unix socket left behind by a crashed process, but never a
/// live one (something accepts on it) nor a file that is not a socket.
pub(crate) fn remove_stale_socket(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{what} {} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{what} {} is in use by another running process",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale socket {}", path.display()))
}

/// Longest control request line, newline included; a longer one is
/// refused (the requests are a few bytes; without a cap a peer that never
/// sends a newline made the pull buffer all it sent).
pub(crate) const MAX_REQUEST_BYTES: usize = 4096;

/// Control connections served at once; more are closed at once, so idle
/// connections cannot take every file descriptor.
pub(crate) const MAX_CONTROL_CONNECTIONS: usize = 64;

/// How long a control client may take to send its request line.
pub(crate) const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control socket.
pub(crate) struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Binds `path`, replacing a stale socket but never a live one, with
    /// the mode of `access` (owner-only by default) whatever the umask.
    pub(crate) fn bind(path: &Path, access: &ferry_nbd::SocketAccess) -> Result<Self> {
        remove_stale_socket(path, "--control")?;
        let listener = ferry_nbd::bind_unix_socket(path, access)
            .and_then(UnixListener::from_std)
            .with_context(|| format!("cannot bind control socket {}", path.display()))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Answers requests until the process ends: one request line per
    /// connection, at most [`MAX_CONTROL_CONNECTIONS`] connections at once.
    pub(crate) async fn serve(
        self,
        shared: Arc<Shared>,
        settings: Arc<CopierSettings>,
        report: Arc<Report>,
    ) {
        let _keep = self.path;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
        let mut refusing = false;
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: back off, do not spin.
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if !refusing {
                    refusing = true;
                    tracing::warn!(
                        open = MAX_CONTROL_CONNECTIONS,
                        "too many control connections at once; closing new ones until one ends"
                    );
                }
                let _ = stream
                    .try_write(b"{\"ok\":false,\"error\":\"too many control connections\"}\n");
                continue;
            };
            refusing = false;
            let (shared, settings, report) = (shared.clone(), settings.clone(), report.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let (r, mut w) = stream.into_split();
                let reply = match tokio::time::timeout(CONTROL_IDLE_TIMEOUT, read_request(r)).await
                {
                    Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "control connection failed");
                        return;
                    }
                    Ok(Ok(Request::Line(line))) => handle(line.trim(), &shared, &settings, &report),
                    Ok(Ok(Request::Bad(why))) => error_reply(&why),
                };
                let _ = tokio::time::timeout(
                    CONTROL_IDLE_TIMEOUT,
                    w.write_all(format!("{reply}\n").as_bytes()),
                )
                .await;
            });
        }
    }
}

/// One control request as read.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// A line of UTF-8 (without its newline).
    Line(String),
    /// Not a request: why.
    Bad(String),
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`].
async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut r = BufReader::new(r.take(MAX_REQUEST_BYTES as u64 + 1));
    r.read_until(b'\n', &mut buf).await?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Ok(Request::Bad(format!(
            "request longer than {MAX_REQUEST_BYTES} bytes"
        )));
    }
    Ok(match String::from_utf8(buf) {
        Ok(line) => Request::Line(line),
        Err(_) => Request::Bad("request is not UTF-8 text".into()),
    })
}

/// A JSON error reply.
fn error_reply(why: &str) -> String {
    serde_json::json!({ "ok": false, "error": why }).to_string()
}

fn handle(
    req: &str,
    shared: &Arc<Shared>,
    settings: &Arc<CopierSettings>,
    report: &Arc<Report>,
) -> String {
    match ControlRequest::parse(req) {
        Ok(ControlRequest::Status) => {
            serde_json::to_string(&status(shared, settings, report)).expect("status serialises")
        }
        Ok(ControlRequest::Pause) => {
            shared
                .engine
                .lock()
                .expect("engine lock")
                .set_background_paused(true);
            r#"{"ok":true,"background":"paused"}"#.into()
        }
        Ok(ControlRequest::Resume) => {
            shared
                .engine
                .lock()
                .expect("engine lock")
                .set_background_paused(false);
            shared.changed.notify_waiters();
            r#"{"ok":true,"background":"running"}"#.into()
        }
        Ok(ControlRequest::Rate(v)) => {
            settings.rate_limit.store(v, Ordering::Relaxed);
            format!(r#"{{"ok":true,"rate_limit_bytes_per_sec":{v}}}"#)
        }
        Err(ControlParseError::Unknown(_)) => r#"{"ok":false,"error":"unknown request"}"#.into(),
        Err(e) => error_reply(&e.to_string()),
    }
}

fn status(shared: &Arc<Shared>, settings: &Arc<CopierSettings>, report: &Arc<Report>) -> Status {
    let e = shared.engine.lock().expect("engine lock");
    let geo = e.geometry();
    let c = e.counters().clone();
    let client = shared.client_now();
    let stats = client.as_ref().map(|c| c.stats());
    let verify = report.verify.lock().expect("verify lock").clone();
    let (phase, error) = match e.phase() {
        // Verified in an earlier run: complete without the manifest.
        Phase::Copying if verify.state == "ok" && e.present_bytes() == geo.disk_size => {
            ("complete".to_string(), None)
        }
        Phase::Copying => ("copying".to_string(), None),
        Phase::Complete => ("complete".to_string(), None),
        Phase::Error(m) => ("error".to_string(), Some(m)),
    };
    let stopped = error.is_some();
    let rate = report.rate.last_rate.load(Ordering::Relaxed);
    let remaining = geo.disk_size - e.present_bytes();
    let eta = if remaining == 0 {
        Some(0)
    } else if rate > 0 {
        Some(remaining.div_ceil(rate))
    } else {
        None
    };
    let guest_written_chunks = e.guest_chunk_count();
    Status {
        phase,
        error,
        total_bytes: geo.disk_size,
        present_bytes: e.present_bytes(),
        source_data_bytes: e.manifest().map_or(0, |m| m.data_bytes()),
        skipped_zero_bytes: e.manifest().map_or(0, |m| geo.disk_size - m.data_bytes()),
        fetched_on_demand_bytes: c.fetched_on_demand,
        fetched_background_bytes: c.fetched_background,
        rejected_corrupt_bytes: c.rejected_corrupt,
        discarded_guest_won_bytes: c.discarded_guest_won,
        duplicate_bytes: c.duplicate,
        present_at_start_bytes: report.present_at_start,
        wire_rx_bytes: stats.map_or(0, |s| s.wire_rx_bytes),
        wire_tx_bytes: stats.map_or(0, |s| s.wire_tx_bytes),
        rate_bytes_per_sec: rate,
        eta_seconds: eta,
        // A migration stopped by an error asks nothing more of the source
        // (a changed source left the client "reconnecting" for good).
        source_state: if verify.state == "ok" {
            "released"
        } else if stopped {
            "stopped"
        } else {
            match stats.map(|s| s.state) {
                // A resumed pull serves before it has reached the source.
                None => "connecting",
                Some(ConnState::Connected) => "connected",
                Some(ConnState::Reconnecting) => "reconnecting",
            }
        }
        .to_string(),
        reconnects: stats.map_or(0, |s| s.reconnects),
        hedged_reads: stats.map_or(0, |s| s.hedged_reads),
        source_lost_ppm: stats.map_or(0, |s| s.source_lost_ppm),
        source_sent_packets: stats.map_or(0, |s| s.source_sent_packets),
        background: if e.background_paused() {
            "paused"
        } else {
            "running"
        }
        .to_string(),
        rate_limit_bytes_per_sec: settings.rate_limit.load(Ordering::Relaxed),
        verified: if verify.state.is_empty() {
            "pending".into()
        } else {
            verify.state
        },
        verified_chunks: verify.chunks_checked,
        verify_refetched_chunks: verify.refetched,
        guest_written_chunks,
        disk_blake3: verify.disk_blake3,
        elapsed_seconds: report.started.elapsed().as_secs_f64(),
        nbd_uri: report.nbd.as_ref().map(|(uri, _)| uri.clone()),
        nbd_tls: report.nbd.as_ref().is_some_and(|(_, tls)| *tls),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_wire_bytes_once_the_compression_is_known() {
        // 200 Mbit/s x 50 ms = 1.25 MB; requests of 1 MiB.
        let w = Window::Wire {
            bdp: 1.25e6,
            request_bytes: 1048576.0,
        };
        // Nothing seen yet, or incompressible data: 4 x BDP uncompressed.
        assert_eq!(w.requests(0, 0), 5);
        assert_eq!(w.requests(100 << 20, 105 << 20), 5);
        // Too little seen to trust the ratio.
        assert_eq!(w.requests(4 << 20, 1 << 20), 5);
        // 2.6:1 on the wire: 2.6 times as many requests.
        assert_eq!(w.requests(260 << 20, 100 << 20), 13);
        // Bounded either way.
        assert_eq!(w.requests(1 << 40, 1), 77);
        let long = Window::Wire {
            bdp: 125e6,
            request_bytes: 1048576.0,
        };
        assert_eq!(long.requests(0, 0), 128);
        let short = Window::Wire {
            bdp: 1e3,
            request_bytes: 1048576.0,
        };
        assert_eq!(short.requests(0, 0), 4);
        assert_eq!(Window::Fixed(7).requests(1 << 30, 1), 7);
    }

    /// A copy at `rate` over a link that goes down from 10 s to 30 s:
    /// requests sent while it is down are answered when it is back. Returns
    /// the bytes answered within `d` seconds of it coming back, for each
    /// `d` of 1..=5, and those answered in the first 10 s.
    fn outage(rate: u64, rtt: Duration, request: u64) -> (Vec<u64>, u64) {
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let (down, up) = (at(10.0), at(30.0));
        let mut throttle = Throttle::default();
        // (answered at, bytes)
        let mut flying: Vec<(Instant, u64)> = Vec::new();
        let mut answered: Vec<(Instant, u64)> = Vec::new();
        let step = Duration::from_millis(5);
        let mut now = t0;
        while now < at(40.0) {
            let (done, still): (Vec<_>, Vec<_>) = flying.iter().partition(|(t, _)| *t <= now);
            answered.extend(done);
            flying = still;
            let in_flight: u64 = flying.iter().map(|(_, b)| b).sum();
            if throttle.gate(now, rate, rtt, in_flight, request) == Gate::Go {
                throttle.sent(now, rate, request);
                let due = now + rtt;
                let due = if (down..up).contains(&now) || (down..up).contains(&due) {
                    up + rtt
                } else {
                    due
                };
                flying.push((due, request));
            }
            now += step;
        }
        let within = |from: Instant, to: Instant| -> u64 {
            answered
                .iter()
                .filter(|(t, _)| (from..to).contains(t))
                .map(|(_, b)| b)
                .sum()
        };
        let after = (1..=5)
            .map(|d| within(up, up + Duration::from_secs(d)))
            .collect();
        (after, within(t0, down))
    }

    #[test]
    fn the_rate_limit_banks_nothing_while_the_link_is_down() {
        let request = 16 * 65536;
        for (rate, rtt_ms) in [(1_500_000, 100), (2_000_000, 50), (20_000_000, 150)] {
            let rtt = Duration::from_millis(rtt_ms);
            let (after, before) = outage(rate, rtt, request);
            // After the outage: the rate, plus what was in flight (the
            // bound, at least a request) and one request more.
            let burst = Throttle::in_flight_bound(rate, rtt).max(request) + request;
            for (d, got) in (1..=5u64).zip(after) {
                assert!(
                    got <= rate * d + burst,
                    "{rate} B/s, {rtt_ms} ms: {got} bytes within {d} s of the reconnect (at most {} allowed)",
                    rate * d + burst
                );
            }
            // And the limit does not slow the copy below its rate.
            assert!(
                before as f64 >= 0.9 * rate as f64 * 10.0 - request as f64,
                "{rate} B/s, {rtt_ms} ms: only {before} bytes in 10 s"
            );
        }
        // Unlimited: no gate at all.
        let t = Throttle::default();
        assert_eq!(
            t.gate(
                Instant::now(),
                0,
                Duration::from_millis(100),
                1 << 40,
                request
            ),
            Gate::Go
        );
    }

    /// The source can buffer only what the destination's connection
    /// receive window credits, for all streams together: what the copier
    /// keeps outstanding on the wire, plus a hedged 1 MiB guest read (three
    /// copies), must fit in it, less the eighth by which quinn lets the
    /// credit it has sent lag behind. Else an on-demand answer waits for
    /// the background answers ahead of it to be read.
    #[test]
    fn the_background_window_leaves_flow_control_credit_for_on_demand_reads() {
        let request = 16 * u64::from(ferry_core::geometry::DEFAULT_CHUNK_SIZE);
        let on_demand = u64::from(ferry_transport::path::MAX_COPIES) * (1 << 20);
        for (mbit, rtt_ms) in [
            (1, 1),
            (10, 10),
            (200, 50),
            (200, 150),
            (1000, 100),
            (10_000, 300),
        ] {
            let tuning =
                ferry_transport::Tuning::for_link(mbit * 1_000_000, Duration::from_millis(rtt_ms));
            let credit = tuning.receive_window - tuning.receive_window / 8;
            let window = Window::wire(mbit, rtt_ms, request);
            for ratio in [1.0, 2.6, 16.0] {
                let fetched = 1u64 << 30;
                let wire = (fetched as f64 / ratio) as u64;
                let outstanding =
                    (window.requests(fetched, wire) as f64 * request as f64 / ratio) as u64;
                assert!(
                    outstanding + on_demand <= credit,
                    "{mbit} Mbit/s, {rtt_ms} ms, {ratio}:1: {outstanding} B outstanding + \
                     {on_demand} B on demand > {credit} B of credit"
                );
            }
        }
    }
}
