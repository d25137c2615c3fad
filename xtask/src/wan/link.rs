//! The link model: one direction of an emulated WAN link, as a sans-IO
//! state machine. The caller offers each packet with the current time and
//! gets back when to deliver it, or why it was dropped; it never reads a
//! clock or touches a socket, so it is tested here with simulated time.
//!
//! What it models, in the order a packet meets it:
//! 1. a *cut*: while the link is cut every packet is dropped;
//! 2. a bottleneck of `rate` bits/s with a FIFO queue holding at most
//!    `queue` worth of serialisation time (tail drop when full; a packet
//!    arriving at an empty queue is always admitted);
//! 3. loss on the wire after the bottleneck (the lost packet used its slot
//!    of link time): independent random loss with probability `loss`, and
//!    bursty loss from a two-state Gilbert-Elliott chain whose long-run loss
//!    rate is `burst_loss` and whose mean burst is `burst_len` packets;
//! 4. one-way propagation delay plus jitter uniform in `±jitter`, clamped so
//!    that no packet is delivered before the one offered ahead of it (jitter
//!    without reordering), or with `reorder` each packet's own (packets
//!    closer together than the jitter overtake each other, as with netem's
//!    jitter).

use std::time::Duration;

/// Parameters of one direction of the link.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LinkConfig {
    /// Bottleneck rate in bits per second; 0 means unlimited.
    pub(crate) rate_bps: u64,
    /// One-way propagation delay.
    pub(crate) delay: Duration,
    /// Most serialisation time the bottleneck queue may hold.
    pub(crate) queue: Duration,
    /// Independent random loss probability per packet.
    pub(crate) loss: f64,
    /// Long-run loss rate of the Gilbert-Elliott (bursty) loss.
    pub(crate) burst_loss: f64,
    /// Mean length of a loss burst, in packets.
    pub(crate) burst_len: f64,
    /// Jitter amplitude: each packet's delay varies by up to ± this much.
    pub(crate) jitter: Duration,
    /// Jitter may reorder packets (each keeps its own delay).
    pub(crate) reorder: bool,
    /// Seed of the model's random numbers.
    pub(crate) seed: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rate_bps: 0,
            delay: Duration::ZERO,
            queue: Duration::from_millis(50),
            loss: 0.0,
            burst_loss: 0.0,
            burst_len: 4.0,
            jitter: Duration::ZERO,
            reorder: false,
            seed: 1,
        }
    }
}

/// What happens to an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it at this time (same clock as `now`).
    Deliver(Duration),
    /// Tail-dropped: the bottleneck queue was full.
    DropQueue,
    /// Lost on the wire (random or bursty loss).
    DropLoss,
    /// The link is cut.
    DropCut,
}

/// Counters of one direction (packets and bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Packets offered.
    pub(crate) offered_pkts: u64,
    /// Bytes offered.
    pub(crate) offered_bytes: u64,
    /// Packets given a delivery time.
    pub(crate) passed_pkts: u64,
    /// Bytes given a delivery time.
    pub(crate) passed_bytes: u64,
    /// Packets tail-dropped at the queue.
    pub(crate) drop_queue_pkts: u64,
    /// Bytes tail-dropped at the queue.
    pub(crate) drop_queue_bytes: u64,
    /// Packets lost to random loss.
    pub(crate) drop_random_pkts: u64,
    /// Packets lost to bursty loss.
    pub(crate) drop_burst_pkts: u64,
    /// Bytes lost to random or bursty loss.
    pub(crate) drop_loss_bytes: u64,
    /// Packets dropped while the link was cut.
    pub(crate) drop_cut_pkts: u64,
    /// Largest queueing delay seen, in nanoseconds.
    pub(crate) max_queue_ns: u64,
}

/// A small deterministic PRNG (SplitMix64): enough for loss and jitter, and
/// reproducible from the seed.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of the link.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    cfg: LinkConfig,
    /// When the bottleneck finishes sending everything admitted so far.
    tx_free: Duration,
    /// Delivery time of the last packet passed (no reordering).
    last_deliver: Duration,
    /// Gilbert-Elliott state: true while in the lossy state.
    ge_bad: bool,
    /// P(good -> bad) and P(bad -> good) per packet.
    ge_p: f64,
    ge_r: f64,
    /// The link is cut until this time.
    cut_until: Duration,
    rng: Rng,
    counters: Counters,
}

impl Link {
    /// A link with this configuration, idle at time zero.
    pub(crate) fn new(cfg: LinkConfig) -> Self {
        let (ge_p, ge_r) = if cfg.burst_loss > 0.0 {
            let f = cfg.burst_loss.min(0.99);
            let r = 1.0 / cfg.burst_len.max(1.0);
            // Stationary P(bad) = p / (p + r) = f.
            (f * r / (1.0 - f), r)
        } else {
            (0.0, 1.0)
        };
        let rng = Rng(cfg.seed ^ 0x5eed_f0e1_d00d_cafe);
        Self {
            cfg,
            tx_free: Duration::ZERO,
            last_deliver: Duration::ZERO,
            ge_bad: false,
            ge_p,
            ge_r,
            cut_until: Duration::ZERO,
            rng,
            counters: Counters::default(),
        }
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// The counters so far.
    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// Cuts the link from `now` for `dur` (extends a running cut).
    pub(crate) fn cut(&mut self, now: Duration, dur: Duration) {
        self.cut_until = self.cut_until.max(now + dur);
    }

    /// Whether the link is cut at `now`.
    pub(crate) fn is_cut(&self, now: Duration) -> bool {
        now < self.cut_until
    }

    /// Time to serialise `len` bytes at the bottleneck rate.
    fn serialise(&self, len: usize) -> Duration {
        if self.cfg.rate_bps == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / self.cfg.rate_bps)
    }

    /// Offers a packet of `len` bytes arriving at `now`. Times must not go
    /// backwards between calls.
    pub(crate) fn offer(&mut self, now: Duration, len: usize) -> Verdict {
        let c = &mut self.counters;
        c.offered_pkts += 1;
        c.offered_bytes += len as u64;
        if now < self.cut_until {
            self.counters.drop_cut_pkts += 1;
            return Verdict::DropCut;
        }
        let ser = self.serialise(len);
        let backlog = self.tx_free.saturating_sub(now);
        if !backlog.is_zero() && backlog + ser > self.cfg.queue.max(ser) {
            self.counters.drop_queue_pkts += 1;
            self.counters.drop_queue_bytes += len as u64;
            return Verdict::DropQueue;
        }
        self.counters.max_queue_ns = self.counters.max_queue_ns.max(backlog.as_nanos() as u64);
        let depart = now.max(self.tx_free) + ser;
        self.tx_free = depart;

        // Loss on the wire, after the bottleneck.
        if self.cfg.burst_loss > 0.0 {
            let u = self.rng.unit();
            self.ge_bad = if self.ge_bad {
                u >= self.ge_r
            } else {
                u < self.ge_p
            };
            if self.ge_bad {
                self.counters.drop_burst_pkts += 1;
                self.counters.drop_loss_bytes += len as u64;
                return Verdict::DropLoss;
            }
        }
        if self.cfg.loss > 0.0 && self.rng.unit() < self.cfg.loss {
            self.counters.drop_random_pkts += 1;
            self.counters.drop_loss_bytes += len as u64;
            return Verdict::DropLoss;
        }

        let mut delay = self.cfg.delay;
        if !self.cfg.jitter.is_zero() {
            let j = self.cfg.jitter.as_nanos() as f64;
            let offset = (self.rng.unit() * 2.0 - 1.0) * j;
            let d = (delay.as_nanos() as f64 + offset).max(0.0);
            delay = Duration::from_nanos(d as u64);
        }
        let at = if self.cfg.reorder {
            depart + delay
        } else {
            (depart + delay).max(self.last_deliver)
        };
        self.last_deliver = self.last_deliver.max(at);
        self.counters.passed_pkts += 1;
        self.counters.passed_bytes += len as u64;
        Verdict::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn delay_only() {
        let mut l = Link::new(LinkConfig {
            delay: ms(25),
            ..Default::default()
        });
        assert_eq!(l.offer(ms(0), 1500), Verdict::Deliver(ms(25)));
        assert_eq!(l.offer(ms(3), 1500), Verdict::Deliver(ms(28)));
        assert_eq!(l.counters().passed_bytes, 3000);
    }

    #[test]
    fn rate_spaces_packets_by_serialisation_time() {
        // 12 Mbit/s: a 1500-byte packet takes 1 ms.
        let mut l = Link::new(LinkConfig {
            rate_bps: 12_000_000,
            delay: ms(10),
            queue: ms(100),
            ..Default::default()
        });
        for i in 0..10 {
            assert_eq!(l.offer(ms(0), 1500), Verdict::Deliver(ms(11 + i)));
        }
        // After the queue drained the link is idle again.
        assert_eq!(l.offer(ms(50), 1500), Verdict::Deliver(ms(61)));
    }

    #[test]
    fn long_run_rate_matches_configuration() {
        // Offer 2x the link rate for 10 simulated seconds.
        let mut l = Link::new(LinkConfig {
            rate_bps: 100_000_000,
            delay: ms(20),
            queue: ms(20),
            ..Default::default()
        });
        let mut last = Duration::ZERO;
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(10) {
            if let Verdict::Deliver(at) = l.offer(t, 1250) {
                assert!(at >= last);
                last = at;
            }
            t += us(50); // 1250 B / 50 us = 200 Mbit/s offered
        }
        let c = l.counters();
        let mbit = c.passed_bytes as f64 * 8.0 / last.saturating_sub(ms(20)).as_secs_f64() / 1e6;
        assert!((mbit - 100.0).abs() < 1.0, "{mbit} Mbit/s");
        // About half was tail-dropped, and the queue never exceeded 20 ms.
        assert!(c.drop_queue_pkts > c.offered_pkts * 45 / 100, "{c:?}");
        assert!(c.max_queue_ns <= 20_000_000, "{c:?}");
    }

    #[test]
    fn queue_bound_in_time() {
        // 8 Mbit/s: 1000 bytes = 1 ms. Queue 5 ms (counting the packet
        // being sent): 5 packets of the burst fit, the rest are dropped.
        let mut l = Link::new(LinkConfig {
            rate_bps: 8_000_000,
            queue: ms(5),
            ..Default::default()
        });
        let v: Vec<Verdict> = (0..10).map(|_| l.offer(ms(0), 1000)).collect();
        let passed = v
            .iter()
            .filter(|x| matches!(x, Verdict::Deliver(_)))
            .count();
        assert_eq!(passed, 5, "{v:?}");
        assert_eq!(l.counters().drop_queue_pkts, 5);
        // A huge packet on an empty link is never dropped by the queue.
        assert!(matches!(l.offer(ms(100), 64_000), Verdict::Deliver(_)));
    }

    #[test]
    fn random_loss_rate() {
        let mut l = Link::new(LinkConfig {
            loss: 0.01,
            seed: 7,
            ..Default::default()
        });
        let n = 200_000;
        for i in 0..n {
            l.offer(us(i), 100);
        }
        let lost = l.counters().drop_random_pkts as f64 / n as f64;
        assert!((lost - 0.01).abs() < 0.001, "{lost}");
    }

    #[test]
    fn burst_loss_rate_and_burst_length() {
        let mut l = Link::new(LinkConfig {
            burst_loss: 0.02,
            burst_len: 5.0,
            seed: 3,
            ..Default::default()
        });
        let n = 500_000u64;
        let mut bursts = 0u64;
        let mut prev_lost = false;
        for i in 0..n {
            let lost = l.offer(us(i), 100) == Verdict::DropLoss;
            if lost && !prev_lost {
                bursts += 1;
            }
            prev_lost = lost;
        }
        let c = l.counters();
        let rate = c.drop_burst_pkts as f64 / n as f64;
        assert!((rate - 0.02).abs() < 0.003, "{rate}");
        let mean_burst = c.drop_burst_pkts as f64 / bursts as f64;
        assert!((mean_burst - 5.0).abs() < 0.5, "{mean_burst}");
    }

    #[test]
    fn jitter_spreads_delay_within_bounds() {
        // Packets far apart (more than the jitter range): the delay is
        // 20 ms ± 5 ms, uniform.
        let mut l = Link::new(LinkConfig {
            delay: ms(20),
            jitter: ms(5),
            seed: 11,
            ..Default::default()
        });
        let mut spread = (Duration::MAX, Duration::ZERO);
        let mut sum = 0.0;
        let n = 5_000u64;
        for i in 0..n {
            let now = ms(i * 20);
            let Verdict::Deliver(at) = l.offer(now, 500) else {
                panic!("no loss configured");
            };
            let d = at - now;
            sum += d.as_secs_f64();
            spread = (spread.0.min(d), spread.1.max(d));
        }
        assert!(spread.0 >= ms(15) && spread.0 < ms(16), "{spread:?}");
        assert!(spread.1 <= ms(25) && spread.1 > ms(24), "{spread:?}");
        let mean = sum / n as f64;
        assert!((mean - 0.020).abs() < 0.0003, "{mean}");
    }

    #[test]
    fn jitter_never_reorders() {
        // Packets 100 us apart with ±5 ms jitter: delivered in order, and
        // never later than the largest delay allows.
        let mut l = Link::new(LinkConfig {
            delay: ms(20),
            jitter: ms(5),
            seed: 12,
            ..Default::default()
        });
        let mut last = Duration::ZERO;
        for i in 0..10_000u64 {
            let now = us(i * 100);
            let Verdict::Deliver(at) = l.offer(now, 500) else {
                panic!("no loss configured");
            };
            assert!(at >= last, "reordered");
            assert!(at - now <= ms(25));
            last = at;
        }
    }

    #[test]
    fn reordering_jitter_lets_packets_overtake() {
        // The same stream with `reorder`: many packets overtake the one
        // offered before them, each still within its own delay's bounds.
        let mut l = Link::new(LinkConfig {
            delay: ms(20),
            jitter: ms(5),
            reorder: true,
            seed: 12,
            ..Default::default()
        });
        let mut last = Duration::ZERO;
        let mut overtaken = 0;
        for i in 0..10_000u64 {
            let now = us(i * 100);
            let Verdict::Deliver(at) = l.offer(now, 500) else {
                panic!("no loss configured");
            };
            assert!(at - now >= ms(15) && at - now <= ms(25));
            if at < last {
                overtaken += 1;
            }
            last = at;
        }
        assert!(overtaken > 1_000, "{overtaken}");
    }

    #[test]
    fn cut_drops_for_its_duration() {
        let mut l = Link::new(LinkConfig {
            delay: ms(1),
            ..Default::default()
        });
        assert!(matches!(l.offer(ms(5), 100), Verdict::Deliver(_)));
        l.cut(ms(10), ms(100));
        assert_eq!(l.offer(ms(10), 100), Verdict::DropCut);
        assert!(l.is_cut(ms(109)));
        assert_eq!(l.offer(ms(109), 100), Verdict::DropCut);
        assert!(matches!(l.offer(ms(110), 100), Verdict::Deliver(_)));
        assert_eq!(l.counters().drop_cut_pkts, 2);
    }

    #[test]
    fn same_seed_same_losses() {
        let cfg = LinkConfig {
            loss: 0.1,
            burst_loss: 0.05,
            jitter: ms(2),
            delay: ms(5),
            seed: 42,
            ..Default::default()
        };
        let run = |cfg: &LinkConfig| {
            let mut l = Link::new(cfg.clone());
            (0..1000)
                .map(|i| l.offer(us(i * 10), 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&cfg), run(&cfg));
    }
}
