//! One ublk queue: its thread, one task per tag, and the hand-off of each
//! request to the device's tokio runtime.
//!
//! The queue thread runs libublk's single-threaded executor over the queue's
//! io_uring. A request is decoded there, its device call is spawned on the
//! tokio runtime, and the tag's task awaits a oneshot receiver. The tokio side
//! sends the result and then bumps an eventfd that the queue's ring polls, so
//! a thread blocked in `io_uring_enter` wakes up and runs the task; the queue
//! thread itself never waits on the device.

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
