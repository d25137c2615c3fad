//! What a running pull reports (`ferry status`) and the control requests
//! it obeys (`ferry background`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ferry_core::Phase;
use serde::{Deserialize, Serialize};

use crate::copier::CopierSettings;
use crate::disk::{BlockMap, Disk};
use crate::fetcher::{ConnState, Fetcher};
use crate::shell::Shell;
use crate::verify::Verification;

/// Facts for the status report.
#[derive(Debug)]
pub struct Report {
    /// The NBD listener's URI and whether it requires TLS.
    pub nbd: Option<(String, bool)>,
    /// When this run started.
    pub started: Instant,
    /// Bytes present when it started.
    pub present_at_start: u64,
    /// The verification's outcome so far.
    pub verify: Mutex<Verification>,
    /// The progress rate.
    pub rate: RateMeter,
}

/// What `ferry status --json` prints. Field names are documented in the
/// README; keep them stable.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Status {
    /// "copying", "complete" or "error".
    pub phase: String,
    /// Why the migration stopped (phase "error").
    pub error: Option<String>,
    /// The disk's size.
    pub total_bytes: u64,
    /// Bytes present at the destination (zero chunks included).
    pub present_bytes: u64,
    /// Bytes of the source's data chunks (0 until the manifest is in).
    pub source_data_bytes: u64,
    /// Bytes of zero chunks, never fetched.
    pub skipped_zero_bytes: u64,
    /// Bytes fetched for guest requests.
    pub fetched_on_demand_bytes: u64,
    /// Bytes fetched by the background copier.
    pub fetched_background_bytes: u64,
    /// Bytes fetched but dropped for a hash mismatch.
    pub rejected_corrupt_bytes: u64,
    /// Fetched bytes not written because the guest had written them.
    pub discarded_guest_won_bytes: u64,
    #[serde(default)]
    /// Bytes fetched twice (a background fetch overtaken by an on-demand one).
    pub duplicate_bytes: u64,
    /// Bytes filled from local copies found through `--index` instead of
    /// fetched (this run).
    #[serde(default)]
    pub filled_local_bytes: u64,
    /// Chunks whose indexed local copy no longer matched the source's
    /// hash, fetched from the source instead.
    #[serde(default)]
    pub local_stale_chunks: u64,
    /// Bytes present when this run started.
    pub present_at_start_bytes: u64,
    /// Bytes received on the wire.
    pub wire_rx_bytes: u64,
    /// Bytes sent on the wire.
    pub wire_tx_bytes: u64,
    /// Progress over the last ~5 s, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Seconds until every byte is present at that rate, if known.
    pub eta_seconds: Option<u64>,
    /// "connecting", "connected", "reconnecting", "stopped" or "released".
    pub source_state: String,
    /// Successful reconnects to the source.
    pub reconnects: u64,
    /// On-demand reads sent more than once.
    pub hedged_reads: u64,
    /// The source's lost packets, per million sent.
    pub source_lost_ppm: u32,
    #[serde(default)]
    /// Packets the source sent on the current connection.
    pub source_sent_packets: u32,
    #[serde(default)]
    /// Bytes the source declared lost on the link and sent again (every
    /// connection of this run): real losses, and spurious ones where the
    /// link reorders packets or its delay jumps.
    pub source_retransmitted_bytes: u64,
    /// "running" or "paused".
    pub background: String,
    /// The background copy's rate limit (0: none).
    pub rate_limit_bytes_per_sec: u64,
    /// "pending", "running", "refetching", "ok" or "failed…".
    pub verified: String,
    /// Chunks checked against the source's hashes.
    pub verified_chunks: u64,
    /// Chunks a failed verification found differing from the source and
    /// fetched again.
    #[serde(default)]
    pub verify_refetched_chunks: u64,
    /// Chunks the guest wrote into (never compared with the source).
    pub guest_written_chunks: u64,
    /// BLAKE3 of the whole verified disk, hex.
    pub disk_blake3: Option<String>,
    /// Seconds since this run started.
    pub elapsed_seconds: f64,
    /// The NBD listener's URI (`nbds://…` with TLS); none without --nbd.
    #[serde(default)]
    pub nbd_uri: Option<String>,
    /// Whether the NBD listener requires TLS (client certificates).
    #[serde(default)]
    pub nbd_tls: bool,
    /// The destination disk (the backing file); set by the daemon.
    #[serde(default)]
    pub disk: Option<String>,
    /// Whether the migration was committed (`ferry commit`: the source is
    /// no longer needed); set by the daemon.
    #[serde(default)]
    pub committed: bool,
    /// Pre-copy from a live source (`ferry pull --precopy`): "copying"
    /// (nothing served until the switchover) or "switched"; set by the
    /// daemon.
    #[serde(default)]
    pub precopy: Option<String>,
    /// The last generation of the live source's changes applied here; set
    /// by the daemon.
    #[serde(default)]
    pub precopy_generation: Option<u64>,
    /// Freeze to serving at the switchover, in ms: from the switchover
    /// request to the frontends serving; set by the daemon.
    #[serde(default)]
    pub switchover_ms: Option<f64>,
}

/// The status report of the pull run by `shared` (what `ferry status`
/// shows).
pub fn snapshot<F: Fetcher, D: Disk, M: BlockMap>(
    shared: &Shell<F, D, M>,
    settings: &CopierSettings,
    report: &Report,
) -> Status {
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
        Phase::Failed(m) => ("error".to_string(), Some(m.to_string())),
    };
    let stopped = error.is_some();
    // Only a copy still running has a rate and an ETA: a finished or failed
    // one shows neither (the rate is averaged over ~5 s and would linger).
    let copying = phase == "copying";
    let rate = if copying {
        report.rate.last_rate.load(Ordering::Relaxed)
    } else {
        0
    };
    let remaining = geo.disk_size - e.present_bytes();
    let eta = (copying && rate > 0 && remaining > 0).then(|| remaining.div_ceil(rate));
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
        filled_local_bytes: c.filled_local,
        local_stale_chunks: c.local_stale,
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
        source_retransmitted_bytes: stats.map_or(0, |s| s.source_retransmitted_bytes),
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
        disk: None,
        committed: false,
        precopy: None,
        precopy_generation: None,
        switchover_ms: None,
    }
}

/// Holds back (`true`) or releases the background copier
/// (`ferry background pause|resume`).
pub fn set_background_paused<F: Fetcher, D: Disk, M: BlockMap>(
    shared: &Shell<F, D, M>,
    paused: bool,
) {
    shared.lock().set_background_paused(paused);
    if !paused {
        shared.changed.notify_waiters();
    }
}

/// Sets the background copy's rate limit, bytes per second (0: none).
pub fn set_rate_limit(settings: &CopierSettings, rate: u64) {
    settings.rate_limit.store(rate, Ordering::Relaxed);
}

/// Counts bytes for the rate estimate.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
    /// The rate of the last sample, bytes per second.
    pub last_rate: AtomicU64,
}

impl RateMeter {
    /// Adds a sample of a monotone byte counter; returns bytes per second
    /// over the last ~5 s.
    pub fn sample(&self, now: std::time::Instant, bytes: u64) -> u64 {
        let mut s = self.samples.lock().expect("rate lock");
        s.push_back((now, bytes));
        while s.len() > 2 && now.duration_since(s[0].0).as_secs_f64() > 5.0 {
            s.pop_front();
        }
        let (t0, b0) = s[0];
        let dt = now.duration_since(t0).as_secs_f64();
        let r = if dt > 0.2 {
            (bytes.saturating_sub(b0) as f64 / dt) as u64
        } else {
            0
        };
        self.last_rate.store(r, Ordering::Relaxed);
        r
    }
}
