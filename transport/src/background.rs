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
//! its own nice value once, at start, by [`BACKGROUND_NICE_STEP`] below
//! the nice value it inherited (the process's own), clamped at 19 (Linux
//! nice values are per thread). It never sets an absolute value: under
//! `nice -n 19` an absolute 10 would have *raised* the background work
//! above the on-demand path (as root; as another user it failed). The scheduler then runs on-demand reads, the
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

/// How many nice levels background threads run below the process (0 is
/// normal, 19 the lowest): a CPU-bound thread 10 levels lower gets about a
/// tenth of the share of the other while both want to run, and all of an
/// otherwise idle CPU.
pub(crate) const BACKGROUND_NICE_STEP: i32 = 10;

/// The lowest priority there is (the highest nice value).
const LOWEST_NICE: i32 = 19;

/// The nice value for background work of a process at nice `own`:
/// [`BACKGROUND_NICE_STEP`] levels lower, clamped at 19, and never higher
/// in priority than `own`.
pub(crate) fn background_nice(own: i32) -> i32 {
    own.saturating_add(BACKGROUND_NICE_STEP)
        .min(LOWEST_NICE)
        .max(own)
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads at [`background_nice`] of the creating thread's
/// nice value, running blocking jobs.
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
                    if let Err(e) = lower_this_threads_priority() {
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

/// Lowers the calling thread's priority to [`background_nice`] of the
/// nice value it has (inherited from the thread that started it). On
/// Linux `getpriority`/`setpriority(PRIO_PROCESS, 0, ..)` act on the
/// calling thread only.
fn lower_this_threads_priority() -> std::io::Result<()> {
    let own = rustix::process::getpriority_process(None).map_err(std::io::Error::from)?;
    let nice = background_nice(own);
    if nice == own {
        return Ok(());
    }
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
        assert_eq!(nice, (caller + BACKGROUND_NICE_STEP).min(19));
        assert!(
            nice >= caller,
            "background work above the caller's priority"
        );
        assert_eq!(name.as_deref(), Some("ferry-test-bg"));
        // The caller's own priority is untouched.
        assert_eq!(this_threads_nice(), caller);
        let sum: u64 = pool.run(|| (1..=10u64).sum()).await.unwrap();
        assert_eq!(sum, 55);
    }

    #[test]
    fn background_work_is_ten_levels_below_the_process_and_never_above_it() {
        assert_eq!(background_nice(0), 10);
        assert_eq!(background_nice(5), 15);
        assert_eq!(background_nice(9), 19);
        assert_eq!(background_nice(15), 19);
        assert_eq!(background_nice(19), 19);
        assert_eq!(background_nice(-20), -10);
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
