//! Packet loss on the path, and hedged on-demand reads.
//!
//! Over a lossy link an on-demand answer (one 64 KiB chunk: about 47
//! datagrams) that loses a datagram waits for its retransmission: about one
//! more RTT, detected by the packets after it or by a timer. At 0.1% random
//! loss that is 1 answer in 22, so the guest's p99 read latency is that of
//! a retransmitted answer (measured: 107 ms at 50 ms RTT, against 94 ms
//! without loss).
//!
//! Only the source knows how many of its packets are lost (the receiver of
//! data sees no count of what never arrived). It measures the share of lost
//! packets over the last few seconds ([`LossWindow`]) and reports it on the
//! Welcome stream every [`crate::wire::PATH_REPORT_INTERVAL_MS`]. From that
//! share the destination *hedges* each on-demand read ([`copies`]): it
//! sends the request two or three times, on separate streams, 1 ms apart
//! (so in separate datagrams), takes the first complete answer and stops
//! the others (a hedged request, as in Dean and Barroso, "The Tail at
//! Scale"). It sends the fewest copies whose answers all lose a datagram
//! at most 1 time in 1000 ([`SLOW_SHARE`]). The cost is the extra answers'
//! bytes, for on-demand reads only, and only on a lossy path, or while the
//! source has sent too few packets to tell ([`TRUSTED_PACKETS`]): a new
//! connection hedges until then.
//!
//! *Decisions.* Hedging while young: without it the first second of a copy
//! over a lossy link was unhedged (the estimate still 0) and its misses
//! were the p99 (measured: 111 and 113 ms at 50 ms RTT and 0.1% loss,
//! t = 0.3–0.5 s, against 68–83 ms for the hedged ones); on a clean path it
//! costs one duplicate 64 KiB answer per guest read during that first
//! second. Three copies: with two, both answers lose a datagram 1 time in
//! 500 at 0.1% loss, and per-read traces of the slow misses (96 ms from the
//! source writing both answers to the first arriving, against ~30 ms) were
//! exactly that; 1 to 3 of 60 misses per run, so the p99 was 105–141 ms.
//! With three copies sent 1 ms apart: 145 misses, the slowest 88 ms (see
//! BENCHMARKS.md).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// Packets the source must have sent on a connection before a loss
/// estimate of zero is believed: with no loss seen in n packets, the loss
/// rate is below 3/n (95% confidence), and 3/15 000 = 200 ppm is where a
/// 64 KiB answer loses a datagram 1 time in 100, and two copies both
/// lose one 1 time in 10 000 ([`copies`]). About 1 s at 200 Mbit/s.
pub const TRUSTED_PACKETS: u32 = 15_000;

/// The latest `Path` report of the source, shared by a client's tasks:
/// the loss estimate's two fields in one atomic, so a reader never mixes
/// two reports; and the bytes the source declared lost, over every
/// connection.
#[derive(Debug, Default)]
pub struct PathReports {
    latest: AtomicU64,
    /// Lost bytes of the current connection's last report.
    lost_bytes: AtomicU64,
    /// Lost bytes of the connections before it.
    earlier_lost_bytes: AtomicU64,
}

impl PathReports {
    /// Keeps a report.
    pub fn store(&self, lost_ppm: u32, sent_packets: u32, lost_bytes: u64) {
        let v = (u64::from(lost_ppm) << 32) | u64::from(sent_packets);
        self.latest.store(v, Ordering::Relaxed);
        self.lost_bytes.fetch_max(lost_bytes, Ordering::Relaxed);
    }

    /// A new connection: nothing known of it yet; the old one's lost
    /// bytes are kept in the total.
    pub fn new_connection(&self) {
        self.latest.store(0, Ordering::Relaxed);
        let old = self.lost_bytes.swap(0, Ordering::Relaxed);
        self.earlier_lost_bytes.fetch_add(old, Ordering::Relaxed);
    }

    /// Bytes the source declared lost (and sent again), every connection
    /// together, as of its last reports.
    pub fn lost_bytes(&self) -> u64 {
        self.earlier_lost_bytes.load(Ordering::Relaxed) + self.lost_bytes.load(Ordering::Relaxed)
    }

    /// The latest report: (lost packets per million, packets sent).
    pub fn load(&self) -> (u32, u32) {
        let v = self.latest.load(Ordering::Relaxed);
        ((v >> 32) as u32, v as u32)
    }
}

/// Smallest number of sent packets an estimate is made from; with fewer,
/// the previous estimate stands.
pub const MIN_PACKETS: u64 = 200;

/// The source's estimate of its packet loss over the last `len` reports.
#[derive(Debug, Clone)]
pub struct LossWindow {
    /// (sent, lost) packet counters at each of the last reports.
    snapshots: VecDeque<(u64, u64)>,
    len: usize,
    last_ppm: u32,
}

impl LossWindow {
    /// A window spanning `len` reports (at least 2).
    pub fn new(len: usize) -> Self {
        Self {
            snapshots: VecDeque::with_capacity(len.max(2)),
            len: len.max(2),
            last_ppm: 0,
        }
    }

    /// Takes the connection's cumulative counters and returns the lost
    /// packets per million sent over the window (the previous estimate if
    /// fewer than [`MIN_PACKETS`] were sent in it).
    pub fn update(&mut self, sent: u64, lost: u64) -> u32 {
        if self.snapshots.len() == self.len {
            self.snapshots.pop_front();
        }
        self.snapshots.push_back((sent, lost));
        let (s0, l0) = self.snapshots.front().copied().unwrap_or((sent, lost));
        let sent_in = sent.saturating_sub(s0);
        let lost_in = lost.saturating_sub(l0);
        if sent_in >= MIN_PACKETS {
            self.last_ppm = (lost_in.saturating_mul(1_000_000) / sent_in).min(1_000_000) as u32;
        }
        self.last_ppm
    }
}

/// Payload bytes of one datagram, a little under what 1472-byte datagrams
/// carry after QUIC's headers (so the count errs towards more packets).
const PAYLOAD_PER_PACKET: u64 = 1400;

/// Most copies of one on-demand request ([`copies`]).
pub const MAX_COPIES: u32 = 3;

/// Share of on-demand reads allowed to wait for a retransmission: one in a
/// thousand, a tenth of what the p99 stands on, so a run's p99 is that of
/// the reads loss did not touch.
pub const SLOW_SHARE: f64 = 1e-3;

/// How many copies of an on-demand request whose answer is `answer_bytes`
/// long to send, on a path losing `lost_ppm` packets per million, by a
/// source that has sent `sent_packets` on the connection: the fewest
/// (at most [`MAX_COPIES`]) whose answers all lose a datagram at most
/// [`SLOW_SHARE`] of the time; at least 2 while fewer than
/// [`TRUSTED_PACKETS`] were sent to tell. 1 means not hedged.
pub fn copies(lost_ppm: u32, sent_packets: u32, answer_bytes: u64) -> u32 {
    let packets = answer_bytes.div_ceil(PAYLOAD_PER_PACKET).max(1);
    let loss = f64::from(lost_ppm.min(1_000_000)) / 1e6;
    // Chance that one answer loses at least one of its datagrams.
    let hit = 1.0 - (1.0 - loss).powf(packets as f64);
    let mut n = 1;
    while n < MAX_COPIES && hit.powi(n as i32) > SLOW_SHARE {
        n += 1;
    }
    if sent_packets < TRUSTED_PACKETS {
        n = n.max(2);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_measures_recent_loss_only() {
        let mut w = LossWindow::new(4);
        assert_eq!(w.update(0, 0), 0);
        // 0.1% of 10 000 packets.
        assert_eq!(w.update(10_000, 10), 1000);
        assert_eq!(w.update(20_000, 20), 1000);
        // Loss stops; after the window has passed the estimate is zero.
        w.update(30_000, 20);
        w.update(40_000, 20);
        w.update(50_000, 20);
        assert_eq!(w.update(60_000, 20), 0);
    }

    #[test]
    fn too_few_packets_keep_the_last_estimate() {
        let mut w = LossWindow::new(2);
        w.update(0, 0);
        assert_eq!(w.update(1000, 5), 5000);
        // 50 packets, one lost, would read as 2%: not enough to judge.
        assert_eq!(w.update(1050, 6), 5000);
    }

    #[test]
    fn copies_keep_slow_reads_under_one_in_a_thousand() {
        let chunk = 64 * 1024;
        let known = TRUSTED_PACKETS;
        // A path known to be clean never hedges.
        assert_eq!(copies(0, known, chunk), 1);
        assert_eq!(copies(0, u32::MAX, chunk), 1);
        // 10 ppm: a 64 KiB answer (47 datagrams) loses one 0.05% of the
        // time, within the share.
        assert_eq!(copies(10, known, chunk), 1);
        // 0.01%: 0.5% alone, 0.002% for two.
        assert_eq!(copies(100, known, chunk), 2);
        // 0.1% random loss: 4.6% alone, 0.2% for two, 0.01% for three.
        assert_eq!(copies(1000, known, chunk), 3);
        // Never more than three, however bad the path.
        assert_eq!(copies(1_000_000, known, chunk), MAX_COPIES);
        assert_eq!(copies(u32::MAX, known, chunk), MAX_COPIES);
        // Small answers need more loss.
        assert_eq!(copies(1000, known, 4096), 2);
        assert_eq!(copies(200, known, 4096), 1);
    }

    #[test]
    fn a_young_connection_hedges_until_its_estimate_can_be_believed() {
        // No loss seen yet says little after a few packets.
        assert_eq!(copies(0, 0, 65536), 2);
        assert_eq!(copies(0, TRUSTED_PACKETS - 1, 65536), 2);
        assert_eq!(copies(0, TRUSTED_PACKETS, 65536), 1);
        // Loss already seen counts while young too.
        assert_eq!(copies(1000, 100, 65536), 3);
        // Young, two copies cover what no loss in that many packets
        // bounds the rate to (3/n at 95%).
        let bound_ppm = 3_000_000 / TRUSTED_PACKETS;
        assert_eq!(copies(bound_ppm, TRUSTED_PACKETS - 1, 65536), 2);
        let r = PathReports::default();
        assert_eq!(r.load(), (0, 0));
        r.store(7, 9, 100);
        assert_eq!(r.load(), (7, 9));
        // Lost bytes add up over connections; a late, older report of a
        // connection never lowers them.
        r.store(7, 10, 300);
        r.store(7, 10, 200);
        assert_eq!(r.lost_bytes(), 300);
        r.new_connection();
        assert_eq!(r.load(), (0, 0));
        r.store(1, 5, 50);
        assert_eq!(r.lost_bytes(), 350);
    }
}
