//! Figures only the shell sees, for `ferry pull --metrics`: how long
//! on-demand fetches take (a histogram), how long guest requests waited
//! for absent data, and how many bytes the guest wrote. Counted here with
//! atomics and read as a [`TelemetrySnapshot`]; everything else the
//! metrics show comes from [`crate::status::snapshot`], so nothing is
//! counted twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the on-demand fetch histogram's buckets, in seconds:
/// from a LAN's round trip to a slow WAN's retransmissions.
pub const ON_DEMAND_BOUNDS_SECONDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations over [`ON_DEMAND_BOUNDS_SECONDS`].
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every
    /// bound.
    buckets: [AtomicU64; ON_DEMAND_BOUNDS_SECONDS.len() + 1],
    /// The sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = ON_DEMAND_BOUNDS_SECONDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(ON_DEMAND_BOUNDS_SECONDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(ON_DEMAND_BOUNDS_SECONDS.len());
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            if i < ON_DEMAND_BOUNDS_SECONDS.len() {
                cumulative.push(total);
            }
        }
        HistogramSnapshot {
            bounds: &ON_DEMAND_BOUNDS_SECONDS,
            cumulative,
            count: total,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The buckets' upper bounds, seconds.
    pub bounds: &'static [f64],
    /// Observations at most each bound (cumulative, one per bound).
    pub cumulative: Vec<u64>,
    /// All observations (the `+Inf` bucket).
    pub count: u64,
    /// Their sum, seconds.
    pub sum_seconds: f64,
}

/// The shell's own counters (see the module documentation).
#[derive(Debug, Default)]
pub struct Telemetry {
    on_demand_fetch: Histogram,
    stall_nanos: AtomicU64,
    stalled_requests: AtomicU64,
    guest_written_bytes: AtomicU64,
}

/// What [`Telemetry`] holds, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySnapshot {
    /// On-demand fetches: from the request to the source until its last
    /// chunk arrived.
    pub on_demand_fetch: HistogramSnapshot,
    /// Time guest requests spent waiting for absent data, all together.
    pub guest_stall_seconds: f64,
    /// Guest requests that had to wait for absent data.
    pub stalled_guest_requests: u64,
    /// Bytes of guest writes, trims and write-zeroes done.
    pub guest_written_bytes: u64,
}

impl Telemetry {
    /// An on-demand fetch took `d`.
    pub(crate) fn on_demand_fetched(&self, d: Duration) {
        self.on_demand_fetch.observe(d);
    }

    /// The guest wrote (or trimmed, or zeroed) `bytes`.
    pub(crate) fn guest_wrote(&self, bytes: u64) {
        self.guest_written_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Times a guest request that started now; see [`Stall`].
    pub(crate) fn stall(&self) -> Stall<'_> {
        Stall {
            telemetry: self,
            since: Instant::now(),
            waited: false,
        }
    }

    /// The figures now.
    pub fn snapshot(&self) -> TelemetrySnapshot {
        TelemetrySnapshot {
            on_demand_fetch: self.on_demand_fetch.snapshot(),
            guest_stall_seconds: self.stall_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            stalled_guest_requests: self.stalled_requests.load(Ordering::Relaxed),
            guest_written_bytes: self.guest_written_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A guest request in progress: if it had to wait for absent data
/// ([`Stall::waiting`]), the time from its start until it ends (answered,
/// failed or dropped) counts as stall time.
pub(crate) struct Stall<'a> {
    telemetry: &'a Telemetry,
    since: Instant,
    waited: bool,
}

impl Stall<'_> {
    /// The request waits for absent data.
    pub(crate) fn waiting(&mut self) {
        self.waited = true;
    }
}

impl Drop for Stall<'_> {
    fn drop(&mut self) {
        if self.waited {
            let nanos = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let t = self.telemetry;
            t.stall_nanos.fetch_add(nanos, Ordering::Relaxed);
            t.stalled_requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_with_every_observation_counted() {
        let t = Telemetry::default();
        for ms in [0, 1, 3, 40, 40, 20_000] {
            t.on_demand_fetched(Duration::from_millis(ms));
        }
        let h = t.snapshot().on_demand_fetch;
        assert_eq!(h.count, 6);
        assert!((h.sum_seconds - 20.084).abs() < 1e-9, "{h:?}");
        // <= 1 ms: 0 and 1; <= 5 ms: + 3; <= 50 ms: + the two 40s; the
        // 20 s one only in +Inf.
        assert_eq!(h.cumulative[0], 2);
        assert_eq!(h.cumulative[2], 3);
        assert_eq!(h.cumulative[5], 5);
        assert_eq!(*h.cumulative.last().unwrap(), 5);
        assert_eq!(h.cumulative.len(), h.bounds.len());
        assert!(h.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn only_requests_that_waited_count_as_stalled() {
        let t = Telemetry::default();
        drop(t.stall());
        {
            let mut s = t.stall();
            s.waiting();
            std::thread::sleep(Duration::from_millis(5));
        }
        t.guest_wrote(4096);
        let s = t.snapshot();
        assert_eq!(s.stalled_guest_requests, 1);
        assert!(s.guest_stall_seconds >= 0.005, "{s:?}");
        assert_eq!(s.guest_written_bytes, 4096);
    }
}
