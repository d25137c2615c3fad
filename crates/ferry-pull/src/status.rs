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
    /// The disk's name in a pull of several disks (`--disk NAME=PATH`);
    /// set by the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A pull of several disks: each disk's status; the other fields are
    /// then those of all of them together ([`totals`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Status>,
}

/// The status of a pull of several disks: byte counts and rates summed,
/// the phase and the verification the least advanced of any disk's
/// ("error" and "failed…" first), the ETA the longest, the source state
/// the first disk's that is not "connected"; `disks` holds each disk's.
pub fn totals(disks: Vec<Status>) -> Status {
    let mut t = Status {
        phase: "complete".into(),
        verified: "ok".into(),
        source_state: "connected".into(),
        background: "running".into(),
        ..Status::default()
    };
    let phase_rank = |p: &str| match p {
        "error" => 0,
        "copying" => 1,
        _ => 2,
    };
    let verify_rank = |v: &str| match v {
        v if v.starts_with("failed") => 0,
        "pending" => 1,
        "running" => 2,
        "refetching" => 3,
        _ => 4,
    };
    for d in &disks {
        if phase_rank(&d.phase) < phase_rank(&t.phase) {
            t.phase = d.phase.clone();
        }
        if t.error.is_none() {
            if let Some(e) = &d.error {
                t.error = Some(format!("disk {}: {e}", d.name.as_deref().unwrap_or("?")));
            }
        }
        if verify_rank(&d.verified) < verify_rank(&t.verified) {
            t.verified = d.verified.clone();
        }
        if t.source_state == "connected" && d.source_state != "connected" {
            t.source_state = d.source_state.clone();
        }
        if d.background == "paused" {
            t.background = "paused".into();
        }
        t.total_bytes += d.total_bytes;
        t.present_bytes += d.present_bytes;
        t.source_data_bytes += d.source_data_bytes;
        t.skipped_zero_bytes += d.skipped_zero_bytes;
        t.fetched_on_demand_bytes += d.fetched_on_demand_bytes;
        t.fetched_background_bytes += d.fetched_background_bytes;
        t.rejected_corrupt_bytes += d.rejected_corrupt_bytes;
        t.discarded_guest_won_bytes += d.discarded_guest_won_bytes;
        t.duplicate_bytes += d.duplicate_bytes;
        t.filled_local_bytes += d.filled_local_bytes;
        t.local_stale_chunks += d.local_stale_chunks;
        t.present_at_start_bytes += d.present_at_start_bytes;
        t.wire_rx_bytes += d.wire_rx_bytes;
        t.wire_tx_bytes += d.wire_tx_bytes;
        t.rate_bytes_per_sec += d.rate_bytes_per_sec;
        t.eta_seconds = match (t.eta_seconds, d.eta_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        t.reconnects += d.reconnects;
        t.hedged_reads += d.hedged_reads;
        t.source_lost_ppm = t.source_lost_ppm.max(d.source_lost_ppm);
        t.source_sent_packets = t.source_sent_packets.saturating_add(d.source_sent_packets);
        t.rate_limit_bytes_per_sec = d.rate_limit_bytes_per_sec;
        t.verified_chunks += d.verified_chunks;
        t.verify_refetched_chunks += d.verify_refetched_chunks;
        t.guest_written_chunks += d.guest_written_chunks;
        t.elapsed_seconds = t.elapsed_seconds.max(d.elapsed_seconds);
    }
    // Committed only when every disk is.
    t.committed = !disks.is_empty() && disks.iter().all(|d| d.committed);
    if t.phase == "complete" && disks.iter().any(|d| d.phase != "complete") {
        t.phase = "copying".into();
    }
    t.disks = disks;
    t
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
        name: None,
        disks: Vec::new(),
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

#[cfg(test)]
mod totals_tests {
    use super::*;

    fn disk(name: &str, phase: &str, verified: &str, present: u64, total: u64) -> Status {
        Status {
            name: Some(name.into()),
            phase: phase.into(),
            verified: verified.into(),
            present_bytes: present,
            total_bytes: total,
            rate_bytes_per_sec: present / 10,
            source_state: "connected".into(),
            background: "running".into(),
            ..Status::default()
        }
    }

    /// Sums and the least advanced disk: complete and verified only when
    /// every disk is; one error is the pull's error.
    #[test]
    fn the_totals_wait_for_every_disk() {
        let t = totals(vec![
            disk("a", "complete", "ok", 100, 100),
            disk("b", "copying", "pending", 30, 200),
        ]);
        assert_eq!((t.present_bytes, t.total_bytes), (130, 300));
        assert_eq!(t.rate_bytes_per_sec, 13);
        assert_eq!(
            (t.phase.as_str(), t.verified.as_str()),
            ("copying", "pending")
        );
        assert_eq!(t.disks.len(), 2);
        let t = totals(vec![
            disk("a", "complete", "ok", 100, 100),
            disk("b", "complete", "ok", 200, 200),
        ]);
        assert_eq!((t.phase.as_str(), t.verified.as_str()), ("complete", "ok"));
        let mut bad = disk("b", "error", "pending", 1, 200);
        bad.error = Some("source changed".into());
        let t = totals(vec![disk("a", "complete", "ok", 100, 100), bad]);
        assert_eq!(t.phase, "error");
        assert_eq!(t.error.as_deref(), Some("disk b: source changed"));
    }
}
