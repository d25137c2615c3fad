//! Threads for the source's background work, at a lower CPU priority.
//!
//! Reading and compressing the chunks of the background copy is most of
//! the source's CPU (zstd alone was 45% of it on an ext4 image). On
//! tokio's blocking pool those threads ran at the priority of everything
//! else: an on-demand answer's read waited for a CPU behind eight busy
//! compressors. Measured on the emulated WAN (2 cores shared by both ends
//! and the link), the time from a Read arriving to its first chunk being
//! encoded was 5–11 ms, and 34 and 170 ms for the two slowest misses of
//! three runs, against about 0.3 ms of work.
//!
//! [`LowPriorityPool`] runs jobs on its own threads, each of which lowers
//! its own nice value once, at start, to [`BACKGROUND_NICE`] (Linux nice
//! values are per thread). The scheduler then runs on-demand reads, the
//! QUIC driver and everything else on the host before them, and gives
//! them the CPU that is left over: the background copy still uses every
//! idle cycle. A thread lowers its priority only once and never raises it
//! again (raising needs `CAP_SYS_NICE`), so no job of normal priority ever
//! runs on these threads.
//!
//! The CPU priority does nothing for a read queued at the disk behind the
//! background copy's reads: the server bounds how many background jobs
//! read the disk at once (`BACKGROUND_DISK_READS` in `crate::server`).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// The nice value of background threads (0 is normal, 19 the lowest): a
/// CPU-bound thread at nice 10 gets about a tenth of the share of one at
/// 0 while both want to run, and all of an otherwise idle CPU.
pub(crate) const BACKGROUND_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads at [`BACKGROUND_NICE`] running blocking jobs.
/// Dropping it closes the queue: each thread finishes its current job and
/// exits. They are not joined, so a job blocked on a slow disk does not
/// hold up the drop.
pub(crate) struct LowPriorityPool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

impl std::fmt::Debug for LowPriorityPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LowPriorityPool")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl LowPriorityPool {
    /// Starts `threads` threads named `name`. A thread that cannot lower
    /// its priority logs it once and runs its jobs anyway.
    pub(crate) fn new(name: &str, threads: usize) -> std::io::Result<LowPriorityPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = threads.max(1);
        for _ in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    if let Err(e) = lower_this_threads_priority(BACKGROUND_NICE) {
                        tracing::warn!(error = %e, "cannot lower a background thread's CPU priority");
                    }
                    loop {
                        // The lock is held only while waiting for a job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job fails its caller (its result
                            // channel is dropped), not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(LowPriorityPool { jobs: tx, threads })
    }

    /// Runs `f` on one of the pool's threads and returns its result; `None`
    /// if the job panicked or the pool is shutting down.
    pub(crate) async fn run<T, F>(&self, f: F) -> Option<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// Sets the calling thread's nice value to `nice` (on Linux,
/// `setpriority(PRIO_PROCESS, 0, ..)` acts on the calling thread only).
fn lower_this_threads_priority(nice: i32) -> std::io::Result<()> {
    rustix::process::setpriority_process(None, nice).map_err(std::io::Error::from)
}

/// The calling thread's nice value.
#[cfg(test)]
fn this_threads_nice() -> i32 {
    rustix::process::getpriority_process(None).expect("getpriority")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_at_the_background_nice_value_and_return_their_result() {
        let pool = LowPriorityPool::new("ferry-test-bg", 2).unwrap();
        let caller = this_threads_nice();
        let (nice, name) = pool
            .run(|| {
                (
                    this_threads_nice(),
                    std::thread::current().name().map(str::to_string),
                )
            })
            .await
            .unwrap();
        assert_eq!(nice, BACKGROUND_NICE.max(caller));
        assert_eq!(name.as_deref(), Some("ferry-test-bg"));
        // The caller's own priority is untouched.
        assert_eq!(this_threads_nice(), caller);
        let sum: u64 = pool.run(|| (1..=10u64).sum()).await.unwrap();
        assert_eq!(sum, 55);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_caller_only() {
        let pool = LowPriorityPool::new("ferry-test-bg", 1).unwrap();
        let r: Option<()> = pool.run(|| panic!("test: this job panics")).await;
        assert!(r.is_none());
        // The pool's only thread is still there for the next job.
        assert_eq!(pool.run(|| 7).await, Some(7));
    }

    #[tokio::test]
    async fn dropping_the_pool_ends_its_threads() {
        let pool = LowPriorityPool::new("ferry-test-bg", 3).unwrap();
        let tids: Vec<i32> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(pool.run(|| nix::unistd::gettid().as_raw()).await.unwrap());
            }
            v
        };
        drop(pool);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for tid in tids {
            let path = format!("/proc/self/task/{tid}");
            while std::path::Path::new(&path).exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "thread {tid} still running after the pool was dropped"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
