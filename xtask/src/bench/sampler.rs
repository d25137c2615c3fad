//! Copy progress over time: a background thread that reads the link
//! forwarder's cumulative `src_to_dst.forwarded_bytes` at a fixed period
//! while one run is in progress, as (seconds since the run's t0, bytes
//! since the run started).
//!
//! [`ProgressSampler`] is a guard: [`ProgressSampler::finish`] stops the
//! thread and hands back the samples; dropping it (an early return on an
//! error path) stops and joins the thread too, so no sampler outlives its
//! run.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::wan::{counter, StatsHandle};

/// How often the forwarder's counters are read.
pub(super) const PERIOD: Duration = Duration::from_millis(200);

/// One sample: seconds since t0, bytes forwarded source → destination
/// since the run started.
pub(super) type Sample = (f64, u64);

/// The running sampler thread of one run.
pub(super) struct ProgressSampler {
    /// Dropping the sender wakes the thread at once and stops it.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl ProgressSampler {
    /// Starts sampling `stats` every `period`, counting bytes from `base`
    /// (the counter's value at the run's start) and time from `t0`.
    pub(super) fn start(
        stats: StatsHandle,
        base: u64,
        t0: Instant,
        period: Duration,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || {
                let mut out = Vec::new();
                let mut next = Instant::now();
                loop {
                    if let Some(s) = sample(&stats, base, t0) {
                        out.push(s);
                    }
                    next += period;
                    let wait = next.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Told to stop, or the guard is gone.
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return out,
                    }
                }
            })?;
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns its samples, in time order.
    pub(super) fn finish(mut self) -> Vec<Sample> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Vec<Sample> {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(samples)) => samples,
            Some(Err(_)) => {
                eprintln!("bench: the progress sampler panicked; no progress series for this run");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for ProgressSampler {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// One reading, timed at the middle of the control-socket round trip
/// (the forwarder reads its counters somewhere in between). A failed
/// reading is skipped: the series just has a gap there.
fn sample(stats: &StatsHandle, base: u64, t0: Instant) -> Option<Sample> {
    let asked = t0.elapsed().as_secs_f64();
    let v = stats.stats().ok()?;
    let answered = t0.elapsed().as_secs_f64();
    let bytes = counter(&v, "src_to_dst", "forwarded_bytes").saturating_sub(base);
    Some(((asked + answered) / 2.0, bytes))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake forwarder: answers every `stats` with 1000 more bytes.
    fn fake_forwarder(path: &std::path::Path) {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut n = 5000u64;
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                n += 1000;
                let _ = writeln!(&conn, r#"{{"src_to_dst":{{"forwarded_bytes":{n}}}}}"#);
            }
        });
    }

    #[test]
    fn samples_until_finished() {
        let path = std::env::temp_dir().join(format!("bench-sampler-{}.sock", std::process::id()));
        fake_forwarder(&path);
        let t0 = Instant::now();
        let s =
            ProgressSampler::start(StatsHandle::at(path.clone()), 5000, t0, PERIOD / 20).unwrap();
        std::thread::sleep(PERIOD);
        let v = s.finish();
        let _ = std::fs::remove_file(&path);
        assert!(v.len() >= 5, "{v:?}");
        assert_eq!(v[0].1, 1000);
        assert!(
            v.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "{v:?}"
        );
    }

    #[test]
    fn a_dropped_sampler_stops_at_once() {
        // No forwarder behind this socket: every reading fails (skipped).
        let path = std::env::temp_dir().join("no-such-bench-forwarder.sock");
        let t0 = Instant::now();
        let s =
            ProgressSampler::start(StatsHandle::at(path), 0, t0, Duration::from_secs(60)).unwrap();
        drop(s);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
