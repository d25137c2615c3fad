//! A UDP socket for quinn whose receive wake-ups are moderated, as a
//! network card moderates its interrupts.
//!
//! On a paced link every datagram arrives alone: at 200 Mbit/s one every
//! 60 µs. quinn's tokio socket is registered with the runtime's epoll, so
//! each arrival woke a thread, ran quinn's receive loop for one datagram,
//! woke the connection's task and the reader's, and went back to sleep.
//! Measured on the emulated WAN (`perf stat` on `ferry pull`, random data
//! at 200 Mbit/s and 50 ms): 17 800 context switches a second, one per
//! datagram, and 30 µs of CPU per datagram, against 8 µs when the same
//! transfer ran unpaced on loopback, where datagrams come in bursts. The
//! sender also got an epoll edge each time the kernel freed a sent
//! datagram (the socket became writable).
//!
//! Here the socket is in no epoll set. A watcher thread `ppoll`s it only
//! while quinn waits to receive (or, rarely, to send), and after waking
//! the receiver it lets the next wake come no sooner than the moderation
//! window later (at most 1 ms, a fiftieth of the link's RTT; see
//! [`crate::tuning::Tuning::recv_moderation`]). While datagrams stream in,
//! quinn then takes them in batches, one wake a window; a datagram that
//! comes after a quiet spell longer than the window (an on-demand answer
//! on an idle link) wakes it at once. The kernel queues what arrives
//! meanwhile (the socket's buffer holds far more than a window at the
//! link's rate), so nothing is lost, and the added delay is within the
//! window: below the congestion controller's delay target (at least
//! 5 ms) and what ACK timing notices.
//!
//! After this change (`scripts/wan-cpu.sh`, 512 MiB, 3 runs each, medians)
//! `ferry pull` took 7.45 CPU seconds instead of 9.99 and switched context
//! 114 000 times in 10 s instead of 180 000; `ferry serve` 6.70 instead of
//! 6.92 seconds.
//!
//! Sends and receives go through [`quinn::udp::UdpSocketState`], as with
//! quinn's own socket: segmentation offload, ECN and the rest unchanged.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Who waits for the socket, shared by quinn's side and the watcher.
#[derive(Default)]
struct Waiters {
    /// The endpoint's receive task, once a receive found nothing.
    reader: Option<Waker>,
    /// Connection tasks whose send would have blocked.
    writers: Vec<Waker>,
    /// The watcher is in its moderation wait and looks at `reader` when
    /// the window ends, so arming the reader need not kick it.
    moderating: bool,
    /// The socket was dropped: the watcher exits.
    shutdown: bool,
}

/// State shared with the watcher thread.
struct Gate {
    io: UdpSocket,
    waiters: Mutex<Waiters>,
    /// Kicks the watcher out of its `ppoll` when a waiter arms.
    kick: EventFd,
    /// The receiver's wake-ups so far.
    wakes: AtomicU64,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding this lock leaves the waiters consistent
        // (each field is written whole), so a poisoned lock is used as is.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the waiters to wake: the reader if `read`, the writers if
    /// `write`.
    fn take(&self, read: bool, write: bool) -> (Option<Waker>, Vec<Waker>) {
        let mut w = self.lock();
        let reader = if read { w.reader.take() } else { None };
        let writers = if write {
            std::mem::take(&mut w.writers)
        } else {
            Vec::new()
        };
        (reader, writers)
    }

    fn kick(&self) {
        // Only fails if the counter would overflow, i.e. it already holds
        // a kick the watcher has not read: nothing is lost.
        let _ = self.kick.write(1);
    }
}

/// A UDP socket for a quinn endpoint, with moderated receive wake-ups.
pub(crate) struct ModeratedSocket {
    gate: Arc<Gate>,
    state: UdpSocketState,
}

impl fmt::Debug for ModeratedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModeratedSocket")
            .field("local", &self.gate.io.local_addr().ok())
            .field("wakes", &self.gate.wakes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ModeratedSocket {
    /// Takes a bound, non-blocking `io` and starts its watcher thread,
    /// which lets the receiver be woken at most once per `window` while
    /// datagrams keep coming (zero: at every arrival).
    pub(crate) fn new(io: UdpSocket, window: Duration) -> io::Result<ModeratedSocket> {
        let state = UdpSocketState::new((&io).into())?;
        let kick = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let gate = Arc::new(Gate {
            io,
            waiters: Mutex::new(Waiters::default()),
            kick,
            wakes: AtomicU64::new(0),
        });
        let g = gate.clone();
        std::thread::Builder::new()
            .name("ferry-udp-watch".into())
            .spawn(move || watch(&g, window))?;
        Ok(ModeratedSocket { gate, state })
    }

    /// How many times the receiver was woken: the batches it took.
    #[cfg(test)]
    pub(crate) fn wakes(&self) -> u64 {
        self.gate.wakes.load(Ordering::Relaxed)
    }
}

impl Drop for ModeratedSocket {
    fn drop(&mut self) {
        self.gate.lock().shutdown = true;
        self.gate.kick();
    }
}

/// The watcher: waits on the socket for whoever waits, and holds the
/// receiver's next wake until `window` after its last one.
fn watch(gate: &Gate, window: Duration) {
    let mut last_read_wake: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let hold_until = last_read_wake
            .map(|t| t + window)
            .filter(|until| *until > now);
        let (read, write) = {
            let mut w = gate.lock();
            if w.shutdown {
                return;
            }
            w.moderating = hold_until.is_some();
            (w.reader.is_some(), !w.writers.is_empty())
        };
        let mut events = PollFlags::empty();
        if read && hold_until.is_none() {
            events |= PollFlags::POLLIN;
        }
        if write {
            events |= PollFlags::POLLOUT;
        }
        let timeout = hold_until.map(|until| TimeSpec::from_duration(until - now));
        let mut fds = [
            PollFd::new(gate.io.as_fd(), events),
            PollFd::new(gate.kick.as_fd(), PollFlags::POLLIN),
        ];
        match ppoll(&mut fds, timeout, None) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                // Cannot wait any more: wake everyone for good, so quinn
                // sees the socket's state itself instead of hanging.
                tracing::error!(error = %e, "UDP watcher cannot poll; waking every waiter");
                let (reader, writers) = gate.take(true, true);
                reader.into_iter().chain(writers).for_each(Waker::wake);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let sock = fds[0].revents().unwrap_or(PollFlags::empty());
        if fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            let _ = gate.kick.read();
        }
        let failed = sock.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL);
        if failed {
            // A pending socket error (e.g. from ICMP) is reported to
            // every poll until read; hand it to quinn's next receive.
            if let Ok(Some(e)) = gate.io.take_error() {
                tracing::debug!(error = %e, "UDP socket error");
            }
        }
        let readable = sock.contains(PollFlags::POLLIN) || (failed && read);
        let writable = sock.contains(PollFlags::POLLOUT) || (failed && write);
        let (reader, writers) = gate.take(readable, writable);
        if reader.is_some() {
            last_read_wake = Some(Instant::now());
            gate.wakes.fetch_add(1, Ordering::Relaxed);
        }
        reader.into_iter().chain(writers).for_each(Waker::wake);
    }
}

impl AsyncUdpSocket for ModeratedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritePoller {
            gate: self.gate.clone(),
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.state.send((&self.gate.io).into(), transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        match self.state.recv((&self.gate.io).into(), bufs, meta) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            res => return Poll::Ready(res),
        }
        let kick = {
            let mut w = self.gate.lock();
            w.reader = Some(cx.waker().clone());
            !w.moderating
        };
        if kick {
            self.gate.kick();
        }
        // The watcher's poll is level-triggered: a datagram that came
        // after the receive above is seen there.
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.gate.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Waits, for one connection, until the socket may take a send again.
struct WritePoller {
    gate: Arc<Gate>,
}

impl fmt::Debug for WritePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritePoller").finish_non_exhaustive()
    }
}

impl UdpPoller for WritePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let mut now = [PollFd::new(self.gate.io.as_fd(), PollFlags::POLLOUT)];
        if let Ok(n) = nix::poll::poll(&mut now, nix::poll::PollTimeout::ZERO) {
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        {
            let mut w = self.gate.lock();
            if !w.writers.iter().any(|x| x.will_wake(cx.waker())) {
                w.writers.push(cx.waker().clone());
            }
        }
        self.gate.kick();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Receives `count` datagrams through `sock` as quinn's endpoint does
    /// (receive until nothing is left, then wait to be woken).
    async fn receive(sock: &ModeratedSocket, count: usize) -> usize {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < count {
            let mut metas = [RecvMeta::default(); 1];
            let mut bufs = [IoSliceMut::new(&mut buf)];
            let n = poll_fn(|cx| sock.poll_recv(cx, &mut bufs, &mut metas))
                .await
                .expect("receive");
            got += metas[..n]
                .iter()
                .map(|m| m.len.div_ceil(m.stride.max(1)))
                .sum::<usize>();
        }
        got
    }

    fn pair(window: Duration) -> (ModeratedSocket, UdpSocket) {
        // A receive buffer that holds the whole stream, as ferry's own
        // sockets have: with the default (~200 KiB) a receiver starved of
        // CPU (a loaded machine, `nice -n 19`) lost datagrams to the
        // kernel and the test waited for them in vain.
        let io = crate::net::udp_socket("127.0.0.1:0".parse().unwrap(), 4 << 20).unwrap();
        io.set_nonblocking(true).unwrap();
        let to = io.local_addr().unwrap();
        let sock = ModeratedSocket::new(io, window).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(to).unwrap();
        (sock, tx)
    }

    /// Sends `count` datagrams `gap` apart on a thread.
    fn stream(tx: UdpSocket, count: usize, gap: Duration) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..count {
                // Paced against the start, so a late wake-up of this
                // thread does not stretch the whole stream.
                let at = start + gap * i as u32;
                if let Some(d) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                tx.send(&[i as u8; 1200]).unwrap();
            }
        })
    }

    /// Streams 400 datagrams 250 µs apart (100 ms) through a socket with
    /// `window`, checks every one arrives, and returns the receiver's
    /// wake-ups.
    async fn wakes_for_a_stream(window: Duration) -> u64 {
        let (sock, tx) = pair(window);
        let sender = stream(tx, 400, Duration::from_micros(250));
        let got = tokio::time::timeout(Duration::from_secs(20), receive(&sock, 400))
            .await
            .expect("every datagram arrives");
        sender.join().unwrap();
        assert_eq!(got, 400);
        sock.wakes()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_of_datagrams_is_taken_in_batches_one_wake_a_window() {
        // With a 10 ms window the receiver is woken about 10 times for the
        // 100 ms stream; woken at every arrival it would be about 400.
        let wakes = wakes_for_a_stream(Duration::from_millis(10)).await;
        // A stalled sender thread splits the stream into quiet spells,
        // each of which may start a batch early: leave room for that.
        assert!(wakes <= 40, "{wakes} wakes for 400 datagrams over 100 ms");
        assert!(wakes >= 2, "{wakes} wakes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_window_every_arrival_wakes_the_receiver() {
        // The same stream with no window: the count above is the window's
        // doing, not an artefact of how the test receives.
        let wakes = wakes_for_a_stream(Duration::ZERO).await;
        assert!(wakes > 100, "{wakes} wakes for 400 datagrams");
    }

    /// Sends one datagram on `tx` 50 ms after a receive has begun waiting
    /// for it, and returns how long it took from the send to its receipt.
    /// The receive runs in a task of its own, so it is polled only when
    /// woken.
    async fn one_after_the_receive_waits(sock: &Arc<ModeratedSocket>, tx: &UdpSocket) -> Duration {
        let s = sock.clone();
        let task = tokio::spawn(async move { receive(&s, 1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = Instant::now();
        tx.send(&[7u8; 100]).unwrap();
        task.await.unwrap();
        sent.elapsed()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_datagram_after_a_quiet_spell_wakes_the_receiver_at_once() {
        // A 1 s window: a datagram after a quiet spell longer than that
        // must not wait for it; one within it waits out its rest.
        let (sock, tx) = pair(Duration::from_secs(1));
        let sock = Arc::new(sock);
        one_after_the_receive_waits(&sock, &tx).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let quiet = one_after_the_receive_waits(&sock, &tx).await;
        assert!(quiet < Duration::from_millis(500), "waited {quiet:?}");
        // Within the window of that wake: held until the window ends.
        let held = one_after_the_receive_waits(&sock, &tx).await;
        assert!(held >= Duration::from_millis(500), "waited only {held:?}");
        assert_eq!(sock.wakes(), 3);
    }

    #[tokio::test]
    async fn the_watcher_exits_when_the_socket_is_dropped() {
        let (sock, _tx) = pair(Duration::from_millis(1));
        let gate = Arc::downgrade(&sock.gate);
        drop(sock);
        // The watcher holds the last strong reference until it exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the watcher did not exit");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
