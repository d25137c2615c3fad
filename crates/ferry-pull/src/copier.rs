//! The background copier (paced, windowed fetches of every absent chunk,
//! then verification) and the periodic sync of a pull.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::engine::FetchKind;
use ferry_core::Phase;

use crate::disk::{BlockMap, Disk};
use crate::fetcher::Fetcher;
use crate::shell::Shell;
use crate::status::Report;
use crate::verify::verify;

/// Settings of the background copier that can change while running.
#[derive(Debug)]
pub struct CopierSettings {
    /// Bytes per second (0: unlimited), `--rate` and `ferry background rate=`.
    pub rate_limit: AtomicU64,
    /// Chunks per background request (`--batch-chunks`).
    pub batch_chunks: u64,
    /// Background requests in flight (`--window`), counted in bytes as
    /// that many full requests ([`window_has_room`]).
    pub window: Window,
    /// Unsynced bytes that start a sync round (`--sync-bytes`).
    pub sync_bytes: u64,
    /// The link's round-trip time (`--link-rtt-ms`), for the rate limit.
    pub link_rtt: Duration,
    /// The pacing and the bytes in flight of every copier run with these
    /// settings: the disks of one pull share one rate limit and one
    /// window (docs/decisions/many-disks-one-budget.md).
    pub budget: Budget,
}

/// The background budget of a pull, shared by the copiers of all its
/// disks: one pacer at the rate limit (each request reserves the next
/// slot, so two disks together get the rate, in turns), the background
/// bytes in flight of all of them (bounded together, see
/// [`Throttle::in_flight_bound`]), and how many copiers run, so the
/// window is shared out among them.
#[derive(Debug, Default)]
pub struct Budget {
    throttle: Mutex<Throttle>,
    in_flight_bytes: AtomicU64,
    copiers: AtomicUsize,
}

impl Budget {
    /// Reserves the next slot at `rate` bytes per second (0: unlimited)
    /// for a request of `bytes` asked at `now`: returns when it may go
    /// (`now` or later). The slot after it is due `bytes / rate` later,
    /// whichever copier asks for it.
    pub fn reserve(&self, now: Instant, rate: u64, bytes: u64) -> Instant {
        let mut t = self.throttle.lock().expect("budget lock");
        let at = match t.gate(now, rate, Duration::ZERO, 0, bytes) {
            Gate::Until(at) => at,
            Gate::Go | Gate::Answers => now,
        };
        t.sent(now, rate, bytes);
        at
    }

    /// Background bytes in flight, all copiers together.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes.load(Ordering::Relaxed)
    }

    /// Copiers running now.
    pub fn copiers(&self) -> usize {
        self.copiers.load(Ordering::Relaxed)
    }

    /// The share of a window of `window` requests of one of the copiers
    /// running now (at least one request).
    pub fn share(&self, window: usize) -> usize {
        (window / self.copiers().max(1)).max(1)
    }

    fn enter(&self) -> CopierSlot<'_> {
        self.copiers.fetch_add(1, Ordering::Relaxed);
        CopierSlot(self)
    }
}

/// A running copier, counted in [`Budget::copiers`] until dropped.
struct CopierSlot<'a>(&'a Budget);

impl Drop for CopierSlot<'_> {
    fn drop(&mut self) {
        self.0.copiers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Verification rounds: after a failed one, the mismatching chunks are
/// fetched again and the disk verified again, at most this many times in
/// all; a mismatch that survives a fresh fetch is reported as failed.
const MAX_VERIFY_ROUNDS: u32 = 3;

/// Fetches the manifest (while the disk is already served) and hands it to
/// the engine, which starts the background copy.
pub async fn fetch_manifest<F: Fetcher, D: Disk, M: BlockMap>(shared: Arc<Shell<F, D, M>>) {
    let client = shared.client().await;
    let t0 = Instant::now();
    match client.manifest().await {
        Ok(m) => {
            tracing::info!(
                data_bytes = m.data_bytes(),
                ms = t0.elapsed().as_millis() as u64,
                "manifest received; background copy can start"
            );
            shared.set_manifest(Ok(m));
        }
        Err(e) => shared.set_manifest(Err(ferry_core::Failure::NoManifest(e.to_string()))),
    }
}

/// Background requests in flight at the start of the copy (see
/// `run_copier`).
const RAMP_START: usize = 4;

/// How many background requests may be in flight.
#[derive(Debug, Clone, Copy)]
pub enum Window {
    /// As many as the operator said (`--window`).
    Fixed(usize),
    /// Enough for four times the link's bandwidth-delay product (`bdp`,
    /// bytes) *on the wire*, from the compression the copy has seen so
    /// far; `request_bytes` is a request's uncompressed size. A window
    /// counted in uncompressed bytes left a link idle where the source's
    /// data compresses: measured on the ext4 image at 200 Mbit/s and
    /// 50 ms, 5 requests of 1 MiB (2.6:1, so 1.6 BDP on the wire) filled
    /// 78% of the link and the copy took 15.1 s; 12 requests, 12.5 s.
    Wire {
        /// The link's bandwidth-delay product, bytes.
        bdp: f64,
        /// A request's uncompressed size, bytes.
        request_bytes: f64,
    },
}

/// Uncompressed bytes fetched after which their compression ratio is
/// trusted (before that, data counts as incompressible).
const RATIO_AFTER_BYTES: u64 = 8 << 20;

impl Window {
    /// The window of a copy over a link whose bandwidth-delay product is
    /// `bdp` bytes, with requests of `request_bytes`.
    pub fn wire(bdp: u64, request_bytes: u64) -> Window {
        Window::Wire {
            bdp: bdp as f64,
            request_bytes: request_bytes as f64,
        }
    }

    /// Requests allowed in flight after `fetched` uncompressed bytes came
    /// in over `wire` bytes of UDP payload.
    pub fn requests(self, fetched: u64, wire: u64) -> usize {
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

/// Background requests in flight at most, however small: each is a QUIC
/// stream, and the source allows 256 at once (on-demand reads need some).
pub const MAX_BACKGROUND_REQUESTS: usize = 128;

/// Whether a background request of up to `largest` bytes may go while
/// `in_flight` requests holding `in_flight_bytes` are out, under a window
/// of `window` requests. The window is counted in bytes, as that many
/// full requests: requests made smaller by what is already here (a live
/// source's changed chunks, data between holes) must not leave the link
/// idle. Measured before this, counting requests: a pre-copy whose
/// source was written at 4 MB/s fetched at about 12 MB/s against 20 MB/s
/// idle on a 25 MB/s link, its requests one changed chunk each.
pub fn window_has_room(
    in_flight: usize,
    in_flight_bytes: u64,
    window: usize,
    largest: u64,
) -> bool {
    in_flight < MAX_BACKGROUND_REQUESTS && in_flight_bytes + largest <= window as u64 * largest
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
pub struct Throttle {
    /// When the next request is due.
    next: Option<Instant>,
}

/// What [`Throttle::gate`] says of the next background request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
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
    pub fn in_flight_bound(rate: u64, rtt: Duration) -> u64 {
        if rate == 0 {
            return 0;
        }
        (rate as f64 * (2.0 * rtt.as_secs_f64() + IN_FLIGHT_SLACK_SECS)) as u64
    }

    /// Whether a request of `bytes` may go out at `now` at `rate` bytes
    /// per second (0: unlimited), with `in_flight` bytes of background
    /// requests not yet answered.
    pub fn gate(&self, now: Instant, rate: u64, rtt: Duration, in_flight: u64, bytes: u64) -> Gate {
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
    pub fn sent(&mut self, now: Instant, rate: u64, bytes: u64) {
        if rate == 0 {
            self.next = None;
            return;
        }
        let from = self.next.map_or(now, |t| t.max(now));
        self.next = Some(from + Duration::from_secs_f64(bytes as f64 / rate as f64));
    }
}

/// Fetches every absent data chunk, paced and windowed, then verifies.
pub async fn run_copier<F: Fetcher, D: Disk, M: BlockMap>(
    shared: Arc<Shell<F, D, M>>,
    settings: Arc<CopierSettings>,
    report: Arc<Report>,
) {
    let budget = &settings.budget;
    // Counted among the copiers sharing the window while copying.
    let mut slot = None;
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
        if phase == Phase::Copying {
            slot.get_or_insert_with(|| budget.enter());
        } else {
            slot = None;
        }
        match phase {
            Phase::Complete
                if shared
                    .awaiting_switchover
                    .load(std::sync::atomic::Ordering::SeqCst) =>
            {
                // Pre-copy: every chunk is here, but the source's changes
                // go on until the switchover; verify after it.
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                continue;
            }
            Phase::Complete => {
                rounds += 1;
                if verify(&shared, &report, rounds < MAX_VERIFY_ROUNDS).await {
                    continue;
                }
                return;
            }
            Phase::Failed(e) => {
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
        let window = budget
            .share(settings.window.requests(fetched, wire))
            .min(RAMP_START + completed);
        let rate = settings.rate_limit.load(Ordering::Relaxed);
        let geo = shared.engine.lock().expect("engine lock").geometry();
        let largest = settings.batch_chunks * u64::from(geo.chunk_size);
        let in_flight_bytes = budget.in_flight_bytes();
        let answers = rate > 0
            && in_flight_bytes > 0
            && in_flight_bytes + largest > Throttle::in_flight_bound(rate, settings.link_rtt);
        let ours = shared.bg_in_flight_bytes.load(Ordering::Relaxed);
        if !window_has_room(in_flight, ours, window, largest)
            || unsynced >= settings.sync_bytes
            || answers
        {
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            continue;
        }
        let next = shared
            .engine
            .lock()
            .expect("engine lock")
            .poll_background(settings.batch_chunks);
        let Some(range) = next else {
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            continue;
        };
        let bytes: u64 = range.clone().map(|c| u64::from(geo.chunk_len(c))).sum();
        let now = Instant::now();
        let at = budget.reserve(now, rate, bytes);
        if at > now {
            tokio::time::sleep_until(at.into()).await;
        }
        shared.bg_in_flight.fetch_add(1, Ordering::Relaxed);
        shared
            .bg_in_flight_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        budget.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
        let s2 = settings.clone();
        issued += 1;
        let s = shared.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            s.clone().fetch(range, FetchKind::Background).await;
            s.bg_in_flight.fetch_sub(1, Ordering::Relaxed);
            s.bg_in_flight_bytes.fetch_sub(bytes, Ordering::Relaxed);
            s2.budget
                .in_flight_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            s.changed.notify_waiters();
        }));
    }
}

/// Persists the block map every second, or sooner when a batch of
/// `sync_bytes` is waiting; samples the progress rate.
/// `progress` gets the status every 5 s (for systemd's `STATUS=`, which
/// the binary writes in human units).
pub async fn run_syncer<F: Fetcher, D: Disk, M: BlockMap>(
    shared: Arc<Shell<F, D, M>>,
    settings: Arc<CopierSettings>,
    report: Arc<Report>,
    progress: impl Fn(&crate::Status) + Send + 'static,
) {
    // tokio's clock (the simulation pauses it; in production it is the
    // monotonic clock).
    let mut last_sync = tokio::time::Instant::now();
    let mut last_status = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (unsynced, present) = {
            let e = shared.engine.lock().expect("engine lock");
            (e.unsynced_bytes(), e.present_bytes())
        };
        report.rate.sample(Instant::now(), present);
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = tokio::time::Instant::now();
            progress(&crate::status::snapshot(&shared, &settings, &report));
        }
        if unsynced > 0
            && (unsynced >= settings.sync_bytes || last_sync.elapsed() >= Duration::from_secs(1))
        {
            if let Err(e) = shared.sync().await {
                tracing::error!(error = %e, "periodic sync failed; will retry");
            }
            last_sync = tokio::time::Instant::now();
            shared.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two disks' copiers, each asking for its next request as soon as
    /// its last one went out, for 10 s of one budget at `rate`: the bytes
    /// sent by both together, by every second, stay within the rate (plus
    /// one request), the rate is used, and each disk gets about half.
    #[test]
    fn two_disks_share_one_rate() {
        let budget = Budget::default();
        let rate = 12_500_000; // 100 Mbit/s
        let request = 1 << 20;
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(10);
        // When each copier asks next.
        let mut asks = [t0, t0];
        let mut sent: Vec<(Instant, usize)> = Vec::new();
        loop {
            let who = if asks[0] <= asks[1] { 0 } else { 1 };
            let at = budget.reserve(asks[who], rate, request);
            if at >= end {
                break;
            }
            sent.push((at, who));
            asks[who] = at;
        }
        for secs in 1..=10u64 {
            let by = t0 + Duration::from_secs(secs);
            let bytes = sent.iter().filter(|(t, _)| *t < by).count() as u64 * request;
            assert!(
                bytes <= rate * secs + request,
                "{bytes} bytes sent by both disks within {secs} s at a limit of {rate} B/s"
            );
            assert!(
                bytes + 2 * request >= rate * secs,
                "only {bytes} bytes within {secs} s at a limit of {rate} B/s"
            );
        }
        let a = sent.iter().filter(|(_, w)| *w == 0).count() as f64;
        let share = a / sent.len() as f64;
        assert!(
            (0.4..=0.6).contains(&share),
            "disk A got {share:.2} of the budget"
        );
    }

    /// Changed while running, the shared rate paces both disks' next
    /// requests at once; 0 lifts the limit for both.
    #[test]
    fn a_rate_change_applies_to_every_disk() {
        let budget = Budget::default();
        let t0 = Instant::now();
        let mb = 1_000_000;
        assert_eq!(budget.reserve(t0, mb, mb), t0);
        // The second disk's request waits a second at 1 MB/s.
        assert_eq!(budget.reserve(t0, mb, mb), t0 + Duration::from_secs(1));
        // At 10 MB/s from then on: a tenth of a second more.
        assert_eq!(budget.reserve(t0, 10 * mb, mb), t0 + Duration::from_secs(2));
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            budget.reserve(t1, 10 * mb, mb),
            t1 + Duration::from_millis(100)
        );
        // Unlimited: now.
        assert_eq!(budget.reserve(t1, 0, mb), t1);
        assert_eq!(budget.reserve(t1, 0, mb), t1);
    }

    /// The window is shared out among the copiers running.
    #[test]
    fn the_window_is_shared_among_the_disks_copying() {
        let budget = Budget::default();
        assert_eq!(budget.share(16), 16);
        let a = budget.enter();
        assert_eq!(budget.share(16), 16);
        let b = budget.enter();
        assert_eq!(budget.share(16), 8);
        assert_eq!(budget.share(1), 1);
        drop(a);
        assert_eq!(budget.share(16), 16);
        drop(b);
        assert_eq!(budget.copiers(), 0);
    }

    /// The window holds as many bytes as its full requests, whatever the
    /// requests' size, and never more than MAX_BACKGROUND_REQUESTS streams.
    #[test]
    fn the_window_is_counted_in_bytes() {
        let full = 16 * 65536;
        // Five full requests: the fifth goes, a sixth does not.
        assert!(window_has_room(4, 4 * full, 5, full));
        assert!(!window_has_room(5, 5 * full, 5, full));
        // Requests of one chunk each: 64 fit where 4 full ones do.
        assert!(window_has_room(63, 63 * 65536, 5, full));
        assert!(!window_has_room(65, 65 * 65536, 5, full));
        // Tiny requests: bounded by the stream count.
        assert!(!window_has_room(MAX_BACKGROUND_REQUESTS, 0, 1000, full));
        assert!(window_has_room(0, 0, 1, full));
    }

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
}
