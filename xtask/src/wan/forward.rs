//! The packet pump: moves packets between two endpoints (TUN devices, or
//! UDP sockets for the relay) through one [`Link`] per direction, one
//! thread per direction, holding each packet until the model's delivery
//! time. Also the control socket that reports the counters and cuts the
//! link on request.
//!
//! Protocol of the control socket (unix stream, one line each way):
//! `stats` answers the counters as one JSON object; `cut MS` cuts both
//! directions for MS milliseconds and answers `ok`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::link::{Link, LinkConfig, Verdict};
use super::sys;

/// Packets a direction may hold at once (a bound even with no rate limit).
const MAX_HELD: usize = 200_000;
/// Longest a pump sleeps, so it notices a stop request.
const TICK: Duration = Duration::from_millis(50);
/// Packets read in one go before delivering again.
const BATCH: usize = 64;

/// Where a direction reads packets from.
pub(crate) trait Rx: Send {
    /// Descriptor to poll for readability.
    fn fd(&self) -> RawFd;
    /// Reads one packet; `None` when none is ready.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}

/// Where a direction writes packets to.
pub(crate) trait Tx: Send {
    /// Writes one packet.
    fn send(&mut self, pkt: &[u8]) -> io::Result<()>;
}

fn would_block(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

impl Rx for File {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        would_block(self.read(buf))
    }
}

impl Tx for File {
    fn send(&mut self, pkt: &[u8]) -> io::Result<()> {
        self.write(pkt).map(|_| ())
    }
}

/// A UDP socket read from, remembering who sent last (the relay's client).
pub(crate) struct UdpRx {
    /// The socket.
    pub(crate) sock: UdpSocket,
    /// Where the last datagram came from, if recorded.
    pub(crate) peer: Option<Arc<Mutex<Option<SocketAddr>>>>,
}

impl Rx for UdpRx {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.sock.recv_from(buf) {
            Ok((n, from)) => {
                if let Some(p) = &self.peer {
                    *p.lock().expect("peer lock") = Some(from);
                }
                Ok(Some(n))
            }
            Err(e) => would_block(Err(e)),
        }
    }
}

/// A UDP socket written to: a connected socket, or one sending to the
/// relay's last client.
pub(crate) struct UdpTx {
    /// The socket.
    pub(crate) sock: UdpSocket,
    /// Send to this peer (else the socket must be connected).
    pub(crate) peer: Option<Arc<Mutex<Option<SocketAddr>>>>,
}

impl Tx for UdpTx {
    fn send(&mut self, pkt: &[u8]) -> io::Result<()> {
        match &self.peer {
            None => self.sock.send(pkt).map(|_| ()),
            Some(p) => {
                let to = *p.lock().expect("peer lock");
                match to {
                    Some(to) => self.sock.send_to(pkt, to).map(|_| ()),
                    None => Err(io::Error::new(io::ErrorKind::NotConnected, "no client yet")),
                }
            }
        }
    }
}

/// Counters the pump keeps beside the model's.
#[derive(Default)]
struct PumpCounters {
    forwarded_pkts: AtomicU64,
    forwarded_bytes: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
    dropped_overflow: AtomicU64,
    late_ns_max: AtomicU64,
    late_over_1ms: AtomicU64,
}

struct Dir {
    name: &'static str,
    link: Mutex<Link>,
    pump: PumpCounters,
}

/// State shared by the pumps and the control socket.
pub(crate) struct Shared {
    epoch: Instant,
    stop: AtomicBool,
    dirs: [Dir; 2],
}

impl Shared {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Cuts both directions for `dur`.
    pub(crate) fn cut(&self, dur: Duration) {
        let now = self.now();
        for d in &self.dirs {
            d.link.lock().expect("link lock").cut(now, dur);
        }
    }

    /// All counters, as JSON.
    pub(crate) fn stats(&self) -> Value {
        let now = self.now();
        let mut out = serde_json::Map::new();
        for d in &self.dirs {
            let (c, cfg, cut) = {
                let l = d.link.lock().expect("link lock");
                (l.counters(), l.config().clone(), l.is_cut(now))
            };
            let p = &d.pump;
            out.insert(
                d.name.to_string(),
                json!({
                    "forwarded_pkts": p.forwarded_pkts.load(Ordering::Relaxed),
                    "forwarded_bytes": p.forwarded_bytes.load(Ordering::Relaxed),
                    "offered_pkts": c.offered_pkts,
                    "offered_bytes": c.offered_bytes,
                    "dropped_queue_pkts": c.drop_queue_pkts,
                    "dropped_queue_bytes": c.drop_queue_bytes,
                    "dropped_loss_pkts": c.drop_random_pkts + c.drop_burst_pkts,
                    "dropped_random_loss_pkts": c.drop_random_pkts,
                    "dropped_burst_loss_pkts": c.drop_burst_pkts,
                    "dropped_loss_bytes": c.drop_loss_bytes,
                    "dropped_cut_pkts": c.drop_cut_pkts,
                    "dropped_overflow_pkts": p.dropped_overflow.load(Ordering::Relaxed),
                    "write_errors": p.write_errors.load(Ordering::Relaxed),
                    "read_errors": p.read_errors.load(Ordering::Relaxed),
                    "max_queue_ms": c.max_queue_ns as f64 / 1e6,
                    "max_late_ms": p.late_ns_max.load(Ordering::Relaxed) as f64 / 1e6,
                    "late_over_1ms_pkts": p.late_over_1ms.load(Ordering::Relaxed),
                    "cut": cut,
                    "rate_bps": cfg.rate_bps,
                    "delay_ms": cfg.delay.as_secs_f64() * 1e3,
                    "queue_ms": cfg.queue.as_secs_f64() * 1e3,
                    "loss": cfg.loss,
                    "burst_loss": cfg.burst_loss,
                    "burst_len": cfg.burst_len,
                    "jitter_ms": cfg.jitter.as_secs_f64() * 1e3,
                    "jitter_reorders": cfg.reorder,
                }),
            );
        }
        out.insert("uptime_s".into(), json!(now.as_secs_f64()));
        Value::Object(out)
    }
}

/// A running pair of pumps; stops them when dropped.
pub(crate) struct Forwarder {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// One direction's endpoints.
pub(crate) type Endpoints = (Box<dyn Rx>, Box<dyn Tx>);

impl Forwarder {
    /// Starts the pumps: `forward` moves packets from A to B through a link
    /// with `cfg_ab`, `backward` from B to A through `cfg_ba`.
    pub(crate) fn start(
        names: [&'static str; 2],
        cfg_ab: LinkConfig,
        cfg_ba: LinkConfig,
        forward: Endpoints,
        backward: Endpoints,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            dirs: [
                Dir {
                    name: names[0],
                    link: Mutex::new(Link::new(cfg_ab)),
                    pump: PumpCounters::default(),
                },
                Dir {
                    name: names[1],
                    link: Mutex::new(Link::new(cfg_ba)),
                    pump: PumpCounters::default(),
                },
            ],
        });
        let mut threads = Vec::new();
        for (i, (rx, tx)) in [forward, backward].into_iter().enumerate() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-{}", names[i]))
                    .spawn(move || pump(&s, i, rx, tx))
                    .context("cannot start a pump thread")?,
            );
        }
        Ok(Self { shared, threads })
    }

    /// The shared state (counters, cut switch).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether both pumps still run.
    pub(crate) fn running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pump(shared: &Shared, dir: usize, mut rx: Box<dyn Rx>, mut tx: Box<dyn Tx>) {
    let d = &shared.dirs[dir];
    // Keeping time matters more than anything else running here.
    let _ = sys::set_realtime(10);
    let mut held: VecDeque<(Duration, Vec<u8>)> = VecDeque::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        // Deliver what is due.
        let now = shared.now();
        while held.front().is_some_and(|(at, _)| *at <= now) {
            let (at, pkt) = held.pop_front().expect("front exists");
            let late = now.saturating_sub(at).as_nanos() as u64;
            d.pump.late_ns_max.fetch_max(late, Ordering::Relaxed);
            if late > 1_000_000 {
                d.pump.late_over_1ms.fetch_add(1, Ordering::Relaxed);
            }
            match tx.send(&pkt) {
                Ok(()) => {
                    d.pump.forwarded_pkts.fetch_add(1, Ordering::Relaxed);
                    d.pump
                        .forwarded_bytes
                        .fetch_add(pkt.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    d.pump.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if pool.len() < 4096 {
                pool.push(pkt);
            }
        }
        // Sleep until the next delivery or an arrival.
        let wait = held
            .front()
            .map(|(at, _)| at.saturating_sub(now))
            .unwrap_or(TICK)
            .min(TICK);
        if !wait.is_zero() && !sys::wait_readable(rx.fd(), wait).unwrap_or(false) {
            continue;
        }
        // Read what arrived and put it through the model.
        let mut link = d.link.lock().expect("link lock");
        for _ in 0..BATCH {
            match rx.recv(&mut buf) {
                Ok(Some(n)) => {
                    let verdict = link.offer(shared.now(), n);
                    if let Verdict::Deliver(at) = verdict {
                        if held.len() >= MAX_HELD {
                            d.pump.dropped_overflow.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let mut p = pool.pop().unwrap_or_default();
                        p.clear();
                        p.extend_from_slice(&buf[..n]);
                        // In delivery order: a reordering link's packet
                        // may be due before ones already held.
                        let pos = held
                            .iter()
                            .rposition(|(t, _)| *t <= at)
                            .map_or(0, |i| i + 1);
                        held.insert(pos, (at, p));
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    d.pump.read_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Serves the control socket at `path` until `stop` is set (or forever).
/// Returns when the listener fails.
pub(crate) fn serve_control(path: &Path, shared: Arc<Shared>, stop: &AtomicBool) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = handle_control(conn, &shared);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("control socket accept"),
        }
    }
    Ok(())
}

fn handle_control(conn: UnixStream, shared: &Shared) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut w = &conn;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => writeln!(w, "{}", shared.stats())?,
        ["cut", ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                shared.cut(Duration::from_millis(ms));
                writeln!(w, "ok")?;
            }
            Err(_) => writeln!(w, "error: bad duration")?,
        },
        _ => writeln!(w, "error: unknown command")?,
    }
    Ok(())
}

/// Sends one command to a control socket and returns the answer line.
pub(crate) fn control(path: &PathBuf, cmd: &str) -> Result<String> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the forwarder at {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    writeln!(conn, "{cmd}")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    if line.starts_with("error") {
        anyhow::bail!("forwarder: {}", line.trim());
    }
    Ok(line.trim().to_string())
}
