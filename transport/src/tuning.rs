//! QUIC tuning for a long, fat link.
//!
//! Measured on this project's machines through its emulated WAN: quinn's defaults
//! (stream window 1.25 MB) cap one stream at `window / RTT` — about
//! 170 Mbit/s at 50 ms. With the windows sized to 2–4x the bandwidth-delay
//! product (BDP) on BOTH ends, a tuned connection reached 400–440 Mbit/s on
//! an emulated 500 Mbit/s link. Both ends therefore build their
//! [`quinn::TransportConfig`] from the same [`Tuning`].

use std::sync::Arc;
use std::time::Duration;

use quinn::{AckFrequencyConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Knobs of a QUIC connection. Build one with [`Tuning::for_link`] or take
/// the [`Default`] (1 Gbit/s, 100 ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Bytes one stream may have in flight towards us: 2x BDP, so a single
    /// background stream can fill the link.
    pub stream_receive_window: u64,
    /// Bytes all streams of a connection may have in flight towards us, or
    /// buffered at the peer waiting to be sent: 8x BDP. This credit is
    /// shared by every stream and priority does not reach it: a peer that
    /// has written its whole credit cannot even buffer an on-demand answer
    /// until we have read enough to send it more (at least half an RTT
    /// later). The background copier keeps up to 4x BDP on the wire
    /// outstanding (plus one request's rounding), so this is twice that.
    /// With 4x BDP, the copier's fifth 1 MiB request at 200 Mbit/s and
    /// 50 ms (5.2 MB against 5 MB) made the source wait 16–41 ms to write
    /// on-demand answers 0.5 s into a copy (4 of 10 runs; see
    /// BENCHMARKS.md).
    pub receive_window: u64,
    /// Bytes we may have buffered unacknowledged: 8x BDP, as the peer's
    /// receive window, which already bounds what we may buffer (a full
    /// send window would block on-demand writes too); the congestion
    /// window, not this, bounds what is in flight.
    pub send_window: u64,
    /// RTT assumed before the first sample: the link's RTT (quinn's default
    /// of 333 ms makes the first round trips slow on a short link).
    pub initial_rtt: Duration,
    /// UDP socket send and receive buffer sizes requested from the kernel
    /// (it caps them at `net.core.[rw]mem_max`; 4 MiB here).
    pub socket_buffer: usize,
    /// Concurrent bidirectional streams a peer may open: bounds the
    /// requests in flight on one connection.
    pub max_concurrent_bidi_streams: u32,
    /// Interval of keep-alive pings, so an idle but healthy connection is
    /// not dropped and a dead one is noticed: a fifth of `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection with no packet from the peer for this long is dead:
    /// the client then reconnects. Six RTTs of the link, within
    /// [`MIN_IDLE_TIMEOUT`] and [`MAX_IDLE_TIMEOUT`]: a source that died
    /// is noticed in seconds (it was 10 s whatever the link, and guest
    /// I/O and `source_state` waited that long), and five keep-alives in
    /// a row, each retransmitted by quinn's probe timer, must be lost
    /// before a live one is dropped.
    pub idle_timeout: Duration,
    /// Congestion control: the loss-tolerant, delay-aware controller of
    /// [`crate::congestion`] (true), or quinn's Cubic (false).
    pub loss_tolerant: bool,
    /// Hard ceiling of the loss-tolerant controller's window: 4x BDP (at
    /// least 4 MB). Below it the controller keeps the window within 1.1x
    /// `link_rate` x the measured RTT (see [`crate::congestion`]).
    pub max_congestion_window: u64,
    /// The link's rate in bytes per second, as the operator gave it.
    pub link_rate: u64,
    /// First congestion window of the loss-tolerant controller: BDP/2,
    /// within 14720 bytes (quinn's 10 datagrams) and 1 MiB. The operator
    /// told us the link, so the first on-demand read (64 KiB) need not
    /// wait out slow start behind the manifest. quinn paces a window over
    /// the RTT, so this is also the first round's rate: half the link
    /// (with BDP/8 the first 64 KiB answer took ~17 ms at 50 ms RTT).
    pub initial_congestion_window: u64,
    /// Largest UDP payload: the link's MTU less the IPv4 and UDP headers
    /// (1472 on a 1500-byte MTU; [`Tuning::with_link_mtu`]). MTU discovery
    /// probes up to it and falls back on a smaller path.
    pub max_udp_payload: u16,
    /// While datagrams stream in, the receiver is woken at most once per
    /// this long and takes what came meanwhile in one batch (a datagram
    /// after a longer quiet spell wakes it at once; see `crate::socket`):
    /// a fiftieth of the RTT, at most 1 ms, so a batch adds less delay
    /// than the congestion controller's target (5 ms at least) or an ACK's
    /// timing notices. Zero: woken at every arrival.
    pub recv_moderation: Duration,
}

impl Default for Tuning {
    /// Sized for 1 Gbit/s at 100 ms RTT.
    fn default() -> Self {
        Tuning::for_link(1_000_000_000, Duration::from_millis(100))
    }
}

/// Shortest idle timeout ([`Tuning::idle_timeout`]): a loaded host may
/// leave a live connection's packets unread for a while (tests run at
/// nice 19 on two busy cores).
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest idle timeout ([`Tuning::idle_timeout`]).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout in RTTs of the link.
const IDLE_TIMEOUT_RTTS: u32 = 6;
/// Keep-alives per idle timeout.
const KEEP_ALIVES_PER_IDLE_TIMEOUT: u32 = 5;

const MIN_STREAM_WINDOW: u64 = 1_250_000;
/// Smallest connection windows: twice what the copier's smallest window
/// (4 requests of 1 MiB) may have outstanding.
const MIN_CONN_WINDOW: u64 = 8 * 1024 * 1024;
const MAX_WINDOW: u64 = 1 << 30;
/// Smallest hard ceiling of the loss-tolerant controller's window.
const MIN_CONGESTION_CAP: u64 = 4 * 1024 * 1024;
const MIN_INITIAL_WINDOW: u64 = 14720;
/// Largest UDP payload on a 1500-byte MTU path (IPv4).
const MAX_UDP_PAYLOAD: u16 = 1472;
/// Loss detection by time, not by count: a packet is declared lost once a
/// later one was acknowledged and it was sent more than this many RTTs
/// ago (RACK's reordering window of a quarter RTT). quinn's default also
/// declares a packet lost as soon as three later ones are acknowledged:
/// on a link that reorders (netem's jitter, several paths) that made 14% of
/// the packets "lost" on 100 Mbit/s, 80 ms, ±2 ms, and the copy crawled at
/// a fifteenth of the link (docs/decisions/loss-detection-by-time.md).
pub const LOSS_TIME_THRESHOLD: f32 = 5.0 / 4.0;
/// The packet-count threshold, so large it never decides first.
pub const LOSS_PACKET_THRESHOLD: u32 = 1 << 30;
/// IPv4 and UDP headers.
const IP_UDP_HEADERS: u32 = 28;
/// Datagrams quinn 0.11 puts in one GSO send (`MAX_TRANSMIT_SEGMENTS`).
const QUINN_GSO_SEGMENTS: usize = 10;
/// Largest UDP payload of one send, GSO included (IPv4: 65535 less the IP
/// and UDP headers).
const MAX_UDP_SEND: usize = 65_507;

/// Whether a full GSO batch of datagrams of `max_udp_payload` bytes fits in
/// one send.
fn gso_fits(max_udp_payload: u16) -> bool {
    usize::from(max_udp_payload) * QUINN_GSO_SEGMENTS <= MAX_UDP_SEND
}

/// The receiver acknowledges at least every this many packets.
pub const ACK_EVERY_PACKETS: u32 = 8;
const MAX_INITIAL_WINDOW: u64 = 1024 * 1024;
/// Longest receive moderation window ([`Tuning::recv_moderation`]).
const MAX_RECV_MODERATION: Duration = Duration::from_millis(1);

/// The bandwidth-delay product of a link, in bytes: what it holds in
/// flight. Every window sized from the link (the transport's here, the
/// copier's in the destination) starts from this one figure.
pub fn bdp_bytes(bandwidth_bits_per_sec: u64, rtt: Duration) -> u64 {
    (u128::from(bandwidth_bits_per_sec / 8) * rtt.as_micros() / 1_000_000) as u64
}

impl Tuning {
    /// Tuning for a link of `bandwidth_bits_per_sec` and round-trip time
    /// `rtt`: stream window 2x BDP, connection receive and send windows
    /// 8x BDP (never below
    /// quinn's defaults, at most 1 GiB).
    pub fn for_link(bandwidth_bits_per_sec: u64, rtt: Duration) -> Tuning {
        let bdp = bdp_bytes(bandwidth_bits_per_sec, rtt);
        let clamp = |v: u64, min: u64| v.clamp(min, MAX_WINDOW);
        let idle_timeout = rtt
            .saturating_mul(IDLE_TIMEOUT_RTTS)
            .clamp(MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT);
        Tuning {
            stream_receive_window: clamp(bdp.saturating_mul(2), MIN_STREAM_WINDOW),
            receive_window: clamp(bdp.saturating_mul(8), MIN_CONN_WINDOW),
            send_window: clamp(bdp.saturating_mul(8), MIN_CONN_WINDOW),
            initial_rtt: if rtt.is_zero() {
                Duration::from_millis(1)
            } else {
                rtt
            },
            socket_buffer: 8 * 1024 * 1024,
            max_concurrent_bidi_streams: 256,
            keep_alive: idle_timeout / KEEP_ALIVES_PER_IDLE_TIMEOUT,
            idle_timeout,
            loss_tolerant: true,
            max_congestion_window: clamp(bdp.saturating_mul(4), MIN_CONGESTION_CAP),
            link_rate: bandwidth_bits_per_sec / 8,
            initial_congestion_window: (bdp / 2).clamp(MIN_INITIAL_WINDOW, MAX_INITIAL_WINDOW),
            max_udp_payload: MAX_UDP_PAYLOAD,
            recv_moderation: (rtt / 50).min(MAX_RECV_MODERATION),
        }
    }

    /// These knobs for a link whose MTU is `mtu` bytes (1500 unless the
    /// operator knows better, e.g. 9000 on a link with jumbo frames): the
    /// largest datagram is the MTU less 28 bytes of IPv4 and UDP headers,
    /// within 1200 (QUIC's minimum) and 65527.
    pub fn with_link_mtu(mut self, mtu: u32) -> Tuning {
        self.max_udp_payload = mtu.saturating_sub(IP_UDP_HEADERS).clamp(1200, 65527) as u16;
        self
    }

    /// The quinn transport configuration of a destination (client): as
    /// [`Tuning::transport_config`], and the source may open the one
    /// unidirectional stream that carries its Welcome.
    pub fn client_transport_config(&self) -> Arc<TransportConfig> {
        self.config_with_uni_streams(1)
    }

    /// The quinn transport configuration for these knobs (a source's: the
    /// peer may open no unidirectional stream).
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        self.config_with_uni_streams(0)
    }

    fn config_with_uni_streams(&self, uni: u32) -> Arc<TransportConfig> {
        let var = |v: u64| VarInt::from_u64(v.min(MAX_WINDOW)).unwrap_or(VarInt::MAX);
        let mut t = TransportConfig::default();
        t.stream_receive_window(var(self.stream_receive_window))
            .receive_window(var(self.receive_window))
            .send_window(self.send_window)
            .initial_rtt(self.initial_rtt)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(uni))
            .keep_alive_interval(if self.keep_alive.is_zero() {
                None
            } else {
                Some(self.keep_alive)
            })
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        // Fewer bytes on the wire for the same data. Datagrams of up to
        // `max_udp_payload` (1472 bytes on a 1500-byte Ethernet MTU less IP
        // and UDP headers; MTU discovery probes up to it and falls back on
        // a smaller path) instead of quinn's 1452 cap. And the receiver acknowledges every
        // 8th packet (or after 10 ms) instead of every 2nd: about 0.5%
        // instead of 2% of the data rate in ACKs flowing back. The
        // controller keeps its RTT samples (minimum per round), and quinn
        // still acknowledges at once on reordering or loss.
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        t.packet_threshold(LOSS_PACKET_THRESHOLD)
            .time_threshold(LOSS_TIME_THRESHOLD);
        // quinn hands the kernel up to QUINN_GSO_SEGMENTS datagrams in one
        // segmentation-offload (GSO) send, and the kernel takes at most
        // 64 KiB in one; quinn counts a refused send (EMSGSIZE) as sent, so
        // every datagram of it is lost. With jumbo datagrams the batch would
        // not fit (10 x 8972 bytes): send them one by one instead.
        t.enable_segmentation_offload(gso_fits(self.max_udp_payload));
        let mut ack = AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(ACK_EVERY_PACKETS - 1))
            .max_ack_delay(Some(Duration::from_millis(10)));
        t.ack_frequency_config(Some(ack));
        if self.loss_tolerant {
            t.congestion_controller_factory(Arc::new(crate::congestion::LossTolerantConfig {
                max_window: self.max_congestion_window,
                link_rate: (self.link_rate > 0).then_some(self.link_rate as f64),
                link_rtt: self.initial_rtt,
                initial_window: self.initial_congestion_window,
                // Every window holds at least two ACK groups, so every
                // round has an RTT sample without ACK delay.
                min_window_packets: 2 * u64::from(ACK_EVERY_PACKETS),
                ..Default::default()
            }));
        }
        Arc::new(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bdp_is_rate_times_rtt() {
        assert_eq!(bdp_bytes(200_000_000, Duration::from_millis(50)), 1_250_000);
        assert_eq!(
            bdp_bytes(200_000_000, Duration::from_millis(150)),
            3_750_000
        );
        assert_eq!(
            bdp_bytes(10_000_000_000, Duration::from_micros(100)),
            125_000
        );
        assert_eq!(bdp_bytes(u64::MAX, Duration::from_secs(1)), u64::MAX / 8);
    }

    #[test]
    fn windows_follow_the_bdp() {
        // 1 Gbit/s x 100 ms = 12.5 MB.
        let t = Tuning::default();
        assert_eq!(t.stream_receive_window, 25_000_000);
        assert_eq!(t.receive_window, 100_000_000);
        assert_eq!(t.send_window, 100_000_000);
        assert_eq!(t.initial_rtt, Duration::from_millis(100));
        // 12.5 MB / 2 is above the cap.
        assert_eq!(t.initial_congestion_window, MAX_INITIAL_WINDOW);
        // 200 Mbit/s x 50 ms = 1.25 MB: half of it.
        let wan = Tuning::for_link(200_000_000, Duration::from_millis(50));
        assert_eq!(wan.initial_congestion_window, 625_000);
        // A tiny link keeps quinn's defaults as a floor.
        let small = Tuning::for_link(1_000_000, Duration::from_millis(1));
        assert_eq!(small.stream_receive_window, MIN_STREAM_WINDOW);
        assert_eq!(small.receive_window, MIN_CONN_WINDOW);
        assert_eq!(small.initial_congestion_window, MIN_INITIAL_WINDOW);
        // An absurd link is capped.
        let huge = Tuning::for_link(u64::MAX, Duration::from_secs(100));
        assert_eq!(huge.receive_window, MAX_WINDOW);
        let _ = huge.transport_config();
    }

    #[test]
    fn a_dead_peer_is_noticed_within_a_few_rtts_of_the_link() {
        let at = |ms| Tuning::for_link(200_000_000, Duration::from_millis(ms));
        // Short links: the floor.
        assert_eq!(at(1).idle_timeout, MIN_IDLE_TIMEOUT);
        assert_eq!(at(100).idle_timeout, MIN_IDLE_TIMEOUT);
        assert_eq!(at(100).keep_alive, Duration::from_millis(300));
        // Long ones: six RTTs, five keep-alives in each.
        assert_eq!(at(500).idle_timeout, Duration::from_secs(3));
        assert_eq!(at(500).keep_alive, Duration::from_millis(600));
        assert_eq!(at(5000).idle_timeout, MAX_IDLE_TIMEOUT);
        for t in [at(1), at(50), at(150), at(300), at(5000)] {
            assert!(t.keep_alive * KEEP_ALIVES_PER_IDLE_TIMEOUT <= t.idle_timeout);
            let _ = t.transport_config();
        }
    }

    #[test]
    fn datagrams_follow_the_link_mtu() {
        let t = Tuning::default();
        assert_eq!(t.max_udp_payload, 1472);
        assert_eq!(t.clone().with_link_mtu(9000).max_udp_payload, 8972);
        assert_eq!(t.clone().with_link_mtu(576).max_udp_payload, 1200);
        assert_eq!(t.clone().with_link_mtu(70_000).max_udp_payload, 65527);
        // GSO batches stay within one 64 KiB send, else GSO is off.
        assert!(gso_fits(t.max_udp_payload));
        assert!(gso_fits(6550));
        assert!(!gso_fits(t.with_link_mtu(9000).max_udp_payload));
    }
}
