//! One ublk queue: its thread, one task per tag, and the hand-off of each
//! request to the device's tokio runtime.
//!
//! The queue thread runs libublk's single-threaded executor over the queue's
//! io_uring. A request is decoded there.
//!
//! A READ first tries the device's [`BlockDevice::read_now`] straight into
//! the request's buffer, on the queue thread: for `ferry pull` with every
//! block of the range present that is one pread from local storage, and the
//! request is answered at once, with no allocation, copy or thread hop.
//!
//! Every other request (and a READ the device cannot serve at once, e.g. one
//! that must fetch) is spawned on the tokio runtime, and the tag's task
//! awaits a oneshot receiver. The tokio side sends the result and then bumps
//! an eventfd that the queue's ring polls, so a thread blocked in
//! `io_uring_enter` wakes up and runs the task; the queue thread never waits
//! on a device future.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use ferry_device::BlockDevice;
use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError as LibError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::AsRawFd;
use tokio::sync::oneshot;

use crate::errno::request_failed;
use crate::request::{Descriptor, Request};

/// Seconds without I/O after which libublk lets an idle queue release the
/// pages of its request buffers.
const IDLE_SECS: u64 = 20;

/// What every queue of one device shares.
pub(crate) struct Served<D> {
    /// The device behind the ublk device.
    pub(crate) device: Arc<D>,
    /// The runtime the device's futures run on.
    pub(crate) rt: tokio::runtime::Handle,
    /// Size of the device in bytes, read once at start.
    pub(crate) size: u64,
}

/// Serves queue `qid` of `dev` on the calling thread until the queue is
/// aborted (device stopped or deleted).
pub(crate) fn serve_queue<D: BlockDevice>(qid: u16, dev: &UblkDev, served: &Served<D>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(e) => {
            tracing::error!(queue = qid, "failed to set up the ublk queue: {e}");
            return;
        }
    };
    let wake = match EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            tracing::error!(
                queue = qid,
                "failed to create the queue's wake-up eventfd: {e}"
            );
            return;
        }
    };
    let buf_len = dev.dev_info.max_io_buf_bytes as usize;
    let exe = Rc::new(smol::LocalExecutor::new());

    let mut tags = Vec::new();
    for tag in queue.tags() {
        let queue = Rc::clone(&queue);
        let ctx = TagCtx {
            qid,
            tag,
            device: Arc::clone(&served.device),
            rt: served.rt.clone(),
            size: served.size,
            wake: Arc::clone(&wake),
        };
        tags.push(exe.spawn(async move {
            match serve_tag(&queue, &ctx, buf_len).await {
                Ok(()) | Err(LibError::QueueIsDown) => {}
                Err(e) => tracing::error!(queue = qid, tag, "ublk tag stopped: {e}"),
            }
        }));
    }
    // Never finishes on its own; dropped with the executor.
    let _waker = exe.spawn(drain_wakeups(Rc::clone(&queue), Arc::clone(&wake)));

    let run_exe = Rc::clone(&exe);
    smol::block_on(exe.run(async move {
        let run_ops = || while run_exe.try_tick() {};
        let done = || tags.iter().all(|task| task.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(IDLE_SECS), run_ops, done).await
        {
            tracing::error!(queue = qid, "ublk queue event loop failed: {e}");
        }
    }));
    tracing::debug!(queue = qid, "ublk queue finished");
}

/// Keeps a poll on the wake-up eventfd armed in the queue's ring; each time
/// it fires, clears the counter. Its only job is to end the ring wait so the
/// executor runs tasks whose device calls completed.
async fn drain_wakeups(queue: Rc<UblkQueue<'_>>, wake: Arc<EventFd>) {
    let fd = wake.as_raw_fd();
    loop {
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        let res = queue.ublk_submit_sqe(sqe).await;
        if res < 0 {
            if res != -libc::ECANCELED {
                tracing::error!(
                    queue = queue.get_qid(),
                    "polling the wake-up eventfd failed: errno {}",
                    -res
                );
            }
            return;
        }
        // EAGAIN when another wake-up already cleared it: fine.
        let _ = wake.read();
    }
}

/// One tag's view of the device.
struct TagCtx<D> {
    qid: u16,
    tag: u16,
    device: Arc<D>,
    rt: tokio::runtime::Handle,
    size: u64,
    wake: Arc<EventFd>,
}

/// Fetches and answers requests on one tag until the queue goes down.
async fn serve_tag<D: BlockDevice>(
    queue: &UblkQueue<'_>,
    ctx: &TagCtx<D>,
    buf_len: usize,
) -> Result<(), LibError> {
    let mut buf = IoBuf::<u8>::new(buf_len);
    queue
        .submit_io_prep_cmd(ctx.tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = queue.get_iod(ctx.tag);
        let desc = Descriptor {
            op_flags: iod.op_flags,
            nr_sectors: iod.nr_sectors,
            start_sector: iod.start_sector,
        };
        let res = match ctx.handle(desc, buf.as_mut_slice()).await {
            Ok(res) => res,
            Err(e) => request_failed(ctx.qid, ctx.tag, desc, &e),
        };
        queue
            .submit_io_commit_cmd(ctx.tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

impl<D: BlockDevice> TagCtx<D> {
    /// Runs one request; the result is what the driver is told (bytes
    /// transferred for READ/WRITE, 0 for the others).
    async fn handle(&self, desc: Descriptor, buf: &mut [u8]) -> io::Result<i32> {
        let device = Arc::clone(&self.device);
        match Request::decode(desc, self.size, buf.len())? {
            Request::Read { offset, len } => {
                // `decode` checked `len <= buf.len()`: the slice is exactly
                // the request.
                let dst = &mut buf[..len as usize];
                if let Some(done) = read_now(&*self.device, offset, dst) {
                    done?;
                    return Ok(len as i32);
                }
                let data = self
                    .on_runtime(async move { device.read(offset, len).await })
                    .await?;
                let dst = buf
                    .get_mut(..len as usize)
                    .filter(|d| d.len() == data.len());
                let Some(dst) = dst else {
                    return Err(io::Error::other(format!(
                        "the device returned {} bytes for a {len}-byte read",
                        data.len()
                    )));
                };
                dst.copy_from_slice(&data);
                Ok(len as i32)
            }
            Request::Write { offset, len, fua } => {
                let data = buf[..len as usize].to_vec();
                self.on_runtime(async move { device.write(offset, data, fua).await })
                    .await?;
                Ok(len as i32)
            }
            Request::Flush => {
                self.on_runtime(async move { device.flush().await }).await?;
                Ok(0)
            }
            Request::Discard { offset, len } => {
                self.on_runtime(async move { device.trim(offset, len).await })
                    .await?;
                Ok(0)
            }
            Request::WriteZeroes { offset, len, fua } => {
                self.on_runtime(async move { device.write_zeroes(offset, len, fua).await })
                    .await?;
                Ok(0)
            }
        }
    }

    /// Spawns `fut` on the device's runtime; the returned future, awaited on
    /// the queue thread, yields its output.
    fn on_runtime<T, F>(&self, fut: F) -> impl Future<Output = io::Result<T>>
    where
        T: Send + 'static,
        F: Future<Output = io::Result<T>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let completion = Completion {
            tx: Some(tx),
            wake: Arc::clone(&self.wake),
        };
        drop(self.rt.spawn(async move {
            completion.complete(fut.await);
        }));
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the device call ended without an answer (it panicked or its runtime shut down)",
                ))
            })
        }
    }
}

/// The fast path of a READ: [`BlockDevice::read_now`] straight into the
/// request's buffer, on the queue thread (no allocation, copy or thread hop).
/// `None` means the device must wait for something (for `ferry pull`: a block
/// is missing); the caller then takes the async path.
///
/// A panic in the device becomes an error for this request, as it does on
/// the async path, instead of taking the queue thread down.
fn read_now<D: BlockDevice>(device: &D, offset: u64, dst: &mut [u8]) -> Option<io::Result<()>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        device.read_now(offset, dst)
    }))
    .unwrap_or_else(|_| {
        Some(Err(io::Error::other(
            "the device's synchronous read panicked",
        )))
    })
}

/// The runtime side of one device call: delivers the result and, whether or
/// not one was delivered (panic, runtime shutdown), wakes the queue thread.
struct Completion<T> {
    tx: Option<oneshot::Sender<T>>,
    wake: Arc<EventFd>,
}

impl<T> Completion<T> {
    fn complete(mut self, value: T) {
        if let Some(tx) = self.tx.take() {
            // The receiver is gone only if the queue went away; nothing to do.
            let _ = tx.send(value);
        }
    }
}

impl<T> Drop for Completion<T> {
    fn drop(&mut self) {
        // Close the channel first, so the woken task sees the outcome.
        drop(self.tx.take());
        if let Err(e) = self.wake.write(1) {
            tracing::error!("failed to wake the ublk queue thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::request::op;

    const SIZE: u64 = 1 << 20;

    /// What the fake device's `read_now` does.
    #[derive(Clone, Copy)]
    enum Now {
        /// Fills the buffer with 0xab.
        Serve,
        /// Says "use the async read".
        Decline,
        /// Fails with ENOSPC.
        Fail,
        /// Panics.
        Panic,
    }

    struct Fake {
        now: Now,
        /// Length of every buffer `read_now` was given.
        now_lens: Mutex<Vec<usize>>,
        /// Calls of the async `read`.
        reads: AtomicUsize,
    }

    impl BlockDevice for Fake {
        fn size(&self) -> u64 {
            SIZE
        }

        fn read_now(&self, _offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
            self.now_lens.lock().unwrap().push(buf.len());
            match self.now {
                Now::Serve => {
                    buf.fill(0xab);
                    Some(Ok(()))
                }
                Now::Decline => None,
                Now::Fail => Some(Err(io::Error::from_raw_os_error(libc::ENOSPC))),
                Now::Panic => panic!("read_now panics"),
            }
        }

        async fn read(&self, _offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(vec![0xcd; len as usize])
        }

        async fn write(&self, _offset: u64, _data: Vec<u8>, _fua: bool) -> io::Result<()> {
            Ok(())
        }

        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }

        async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }

        async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs a READ of `sectors` 512-byte sectors at sector 8 against a fake
    /// device behaving as `now`, with a 64 KiB request buffer; returns the
    /// result, the buffer and the device.
    fn read(now: Now, sectors: u32) -> (io::Result<i32>, Vec<u8>, Arc<Fake>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let device = Arc::new(Fake {
            now,
            now_lens: Mutex::default(),
            reads: AtomicUsize::new(0),
        });
        let ctx = TagCtx {
            qid: 0,
            tag: 0,
            device: Arc::clone(&device),
            rt: rt.handle().clone(),
            size: SIZE,
            wake: Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap()),
        };
        let desc = Descriptor {
            op_flags: op::READ,
            nr_sectors: sectors,
            start_sector: 8,
        };
        let mut buf = vec![0u8; 64 << 10];
        let res = smol::block_on(ctx.handle(desc, &mut buf));
        (res, buf, device)
    }

    #[test]
    fn read_now_serves_into_exactly_the_request_and_skips_the_async_read() {
        let (res, buf, device) = read(Now::Serve, 8);
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(*device.now_lens.lock().unwrap(), [4096]);
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        assert!(buf[..4096].iter().all(|b| *b == 0xab));
        assert!(
            buf[4096..].iter().all(|b| *b == 0),
            "wrote past the request"
        );
    }

    #[test]
    fn declined_read_now_falls_back_to_the_async_read() {
        let (res, buf, device) = read(Now::Decline, 16);
        assert_eq!(res.unwrap(), 8192);
        assert_eq!(*device.now_lens.lock().unwrap(), [8192]);
        assert_eq!(device.reads.load(Ordering::SeqCst), 1);
        assert!(buf[..8192].iter().all(|b| *b == 0xcd));
        assert!(buf[8192..].iter().all(|b| *b == 0));
    }

    #[test]
    fn read_now_errors_keep_their_errno() {
        let (res, _, device) = read(Now::Fail, 8);
        let err = res.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        let desc = Descriptor {
            op_flags: op::READ,
            nr_sectors: 8,
            start_sector: 8,
        };
        assert_eq!(request_failed(0, 0, desc, &err), -libc::ENOSPC);
    }

    #[test]
    fn a_panicking_read_now_fails_the_request_only() {
        let (res, _, device) = read(Now::Panic, 8);
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::Other);
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
    }
}
