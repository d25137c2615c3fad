//! The congestion controller's simulators, for its tests: a fluid model
//! (one ACK per round on a bottleneck of a given rate, RTT, queue and
//! random loss) and a packet-level one (datagram by datagram, with quinn's
//! pacing and a FIFO queue).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::Controller;

use super::{LossTolerant, LossTolerantConfig};

/// Drives the controller through `rounds` round trips on a simulated
/// bottleneck of `rate` bytes/s, `base_rtt`, a queue of `queue` bytes,
/// and random loss `loss`; returns the mean delivery rate of the last
/// half and the mean queueing delay seen.
pub(super) fn simulate(
    rate: f64,
    base_rtt: Duration,
    queue: u64,
    loss: f64,
    rounds: u32,
) -> (f64, Duration, f64) {
    simulate_with(rate, base_rtt, queue, loss, rounds, None).0
}

/// As [`simulate`], with the operator's `link_rate`; also returns the
/// largest window seen.
pub(super) fn simulate_with(
    rate: f64,
    base_rtt: Duration,
    queue: u64,
    loss: f64,
    rounds: u32,
    link_rate: Option<f64>,
) -> ((f64, Duration, f64), u64) {
    let t0 = Instant::now();
    let cfg = Arc::new(LossTolerantConfig {
        max_window: 64 << 20,
        link_rate,
        ..Default::default()
    });
    let mut max_seen = 0u64;
    let mut cc = LossTolerant::new(cfg, t0, 1200);
    let bdp = rate * base_rtt.as_secs_f64();
    let mut now = t0;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut delivered_late = 0.0;
    let mut delay_sum = Duration::ZERO;
    let mut queue_drops = 0.0;
    // One acknowledgement per round, carrying the round's bytes and
    // its RTT sample (`ack` is `on_ack` without quinn's RttEstimator).
    for round in 0..rounds {
        max_seen = max_seen.max(cc.window());
        let w = cc.window() as f64;
        // Bytes beyond BDP sit in the queue; beyond BDP+queue they drop.
        let queued = (w - bdp).max(0.0).min(queue as f64);
        let dropped_q = (w - bdp - queue as f64).max(0.0);
        queue_drops += dropped_q;
        let qdelay = Duration::from_secs_f64(queued / rate);
        let rtt = base_rtt + qdelay;
        let sent = w - dropped_q;
        let packets = (sent / 1200.0).max(1.0) as u64;
        let mut lost = dropped_q as u64;
        let mut acked = 0u64;
        for _ in 0..packets {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if (rng % 1_000_000) as f64 / 1e6 < loss {
                lost += 1200;
            } else {
                acked += 1200;
            }
        }
        let sent_at = now;
        now += rtt;
        let sample = now - sent_at;
        cc.round_lost += lost;
        cc.ack(now, sample, acked, false, rtt);
        if round >= rounds / 2 {
            delivered_late += acked as f64 / rtt.as_secs_f64();
            delay_sum += qdelay;
        }
    }
    let n = f64::from(rounds - rounds / 2);
    (
        (
            delivered_late / n,
            delay_sum / (rounds - rounds / 2),
            queue_drops,
        ),
        max_seen,
    )
}

/// What a packet-level run saw at the bottleneck.
pub(super) struct PacketRun {
    /// Datagrams dropped because the queue was full.
    pub(super) drops: u64,
    /// The longest the queue got, in time at the link's rate.
    pub(super) max_queue_delay: Duration,
    /// Bytes acknowledged in each second of the run.
    pub(super) per_second: Vec<u64>,
    /// The longest the queue got in each second of the run.
    pub(super) queue_per_second: Vec<Duration>,
    /// The controller's minimum RTT at the end.
    pub(super) min_rtt: Option<Duration>,
}

/// Runs the controller datagram by datagram against a bottleneck of
/// `rate` bytes/s, `base_rtt` and a FIFO queue of `queue` bytes, in
/// steps of 50 µs for `secs` seconds. The sender always has data and
/// paces as quinn's pacer does (tokens at 1.25 x the window per
/// smoothed RTT, bursts of the window x 2 ms / RTT within 10 to 256
/// datagrams); every datagram is acknowledged one base RTT after it
/// leaves the queue; a dropped one is declared lost one smoothed RTT
/// after it was sent. Unlike [`simulate`], whose rounds are fluid,
/// this shows the queue a round's bursts build within the round.
/// `bdp_cap` and `slow_start_cap_fraction` as in [`LossTolerantConfig`].
pub(super) fn packet_level(
    rate: f64,
    base_rtt: Duration,
    queue: u64,
    bdp_cap: f64,
    slow_start_cap_fraction: f64,
    secs: u32,
) -> PacketRun {
    // A 1500-byte link MTU: quinn counts UDP payloads, the link also
    // carries the IP and UDP headers.
    const MTU: u64 = 1472;
    const WIRE: f64 = 1500.0;
    let t0 = Instant::now();
    let bdp = rate * base_rtt.as_secs_f64();
    let cfg = Arc::new(LossTolerantConfig {
        max_window: 64 << 20,
        link_rate: Some(rate),
        link_rtt: base_rtt,
        // As `Tuning::for_link`: BDP/2 within 10 datagrams and 1 MiB.
        initial_window: ((bdp / 2.0) as u64).clamp(14720, 1 << 20),
        bdp_cap,
        slow_start_cap_fraction,
        ..Default::default()
    });
    let mut cc = LossTolerant::new(cfg, t0, MTU as u16);
    let dt = Duration::from_micros(50);
    let mut now = t0;
    let mut srtt = base_rtt;
    let (mut inflight, mut tokens, mut link_credit) = (0u64, 0f64, 0f64);
    let mut queued: VecDeque<Instant> = VecDeque::new();
    let mut acks: VecDeque<(Instant, Instant)> = VecDeque::new();
    let mut losses: VecDeque<(Instant, Instant)> = VecDeque::new();
    let mut run = PacketRun {
        drops: 0,
        max_queue_delay: Duration::ZERO,
        per_second: vec![0; secs as usize],
        queue_per_second: vec![Duration::ZERO; secs as usize],
        min_rtt: None,
    };
    for step in 0..u64::from(secs) * 20_000 {
        now += dt;
        let second = (step / 20_000) as usize;
        while acks.front().is_some_and(|&(at, _)| at <= now) {
            let (_, sent) = acks.pop_front().unwrap();
            inflight -= MTU;
            let sample = now - sent;
            srtt = (srtt * 7 + sample) / 8;
            cc.ack(now, sample, MTU, false, srtt);
            run.per_second[second] += MTU;
        }
        while losses.front().is_some_and(|&(at, _)| at <= now) {
            let (_, sent) = losses.pop_front().unwrap();
            inflight -= MTU;
            cc.on_congestion_event(now, sent, false, MTU);
        }
        // The link sends what its rate allows; idle time is not saved.
        link_credit += rate * dt.as_secs_f64();
        while link_credit >= WIRE {
            let Some(sent) = queued.pop_front() else {
                link_credit = link_credit.min(WIRE);
                break;
            };
            link_credit -= WIRE;
            acks.push_back((now + base_rtt, sent));
        }
        let window = cc.window();
        let burst = (window as f64 * 0.002 / srtt.as_secs_f64())
            .clamp(10.0 * MTU as f64, 256.0 * MTU as f64);
        tokens = (tokens + 1.25 * window as f64 * dt.as_secs_f64() / srtt.as_secs_f64()).min(burst);
        while inflight + MTU <= window && tokens >= MTU as f64 {
            tokens -= MTU as f64;
            inflight += MTU;
            if (queued.len() as f64 + 1.0) * WIRE <= queue as f64 {
                queued.push_back(now);
            } else {
                run.drops += 1;
                losses.push_back((now + srtt, now));
            }
        }
        let delay = Duration::from_secs_f64(queued.len() as f64 * WIRE / rate);
        run.max_queue_delay = run.max_queue_delay.max(delay);
        run.queue_per_second[second] = run.queue_per_second[second].max(delay);
    }
    run.min_rtt = cc.min_rtt;
    run
}
