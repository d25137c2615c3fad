//! One ublk queue: its thread, one task per tag, and the hand-off of each
//! request to the device's tokio runtime.
//!
//! The queue thread runs libublk's single-threaded executor over the queue's
//! io_uring. A request is decoded there.
//!
//! Request data moves one of two ways ([`DataPath`]), fixed by the flags the
//! device was created with (a recovered device keeps its creator's):
//! - *user copy* (`UBLK_F_USER_COPY`): the tags have no buffers. A READ
//!   first tries [`BlockDevice::copy_now`], which for a file-backed device
//!   is one `pwrite` from the page cache to `/dev/ublkcN` at the tag's
//!   position: the driver copies it straight into the request's pages, so
//!   each byte is copied once (as the loop device does). That happens at
//!   once when the READ's 64 KiB granules were found wholly in the page
//!   cache a moment ago (the `resident` module: a bit per granule, no
//!   system call); otherwise one `mincore` over them first, and a range of
//!   the device's file ([`BlockDevice::present_file`]) not in the page
//!   cache is read on the queue's io_uring into the tag's own buffer, then
//!   written to the char device, so that a page-cache miss stalls only its
//!   tag (target I/O as libublk's loop example does it). A device without
//!   `copy_now` is read with `read_now` into a per-queue scratch buffer,
//!   then written to the char device. A WRITE's data is `pread` from the
//!   char device into the `Vec` handed to the device.
//! - *buffers* (the driver lacks user copy, or it was turned off): each tag
//!   has an I/O buffer that the driver copies to or from the request's
//!   pages; a READ tries [`BlockDevice::read_now`] straight into it (on
//!   the queue thread, page-cache misses included).
//!
//! Both fast paths run on the queue thread: for `ferry pull` with every
//! block of the range present they need only local storage, and the request
//! is answered at once, with no allocation or thread hop.
//!
//! Every other request (and a READ the device cannot serve at once, e.g. one
//! that must fetch) is spawned on the tokio runtime, and the tag's task
//! awaits a oneshot receiver. The tokio side sends the result and then bumps
//! an eventfd that the queue's ring polls, so a thread blocked in
//! `io_uring_enter` wakes up and runs the task; the queue thread never waits
//! on a device future.
//!
//! A tag's ring-read buffer is never freed while an io_uring read may still
//! write into it: if a tag's task is dropped before it finished (the queue
//! failed), the buffer is leaked instead ([`KeepWhileBusy`]).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::BorrowedFd;
use std::rc::Rc;
use std::sync::Arc;

use ferry_device::BlockDevice;
use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkError as LibError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::AsRawFd;
use tokio::sync::oneshot;

use crate::cdev;
use crate::errno::request_failed;
use crate::request::{decode, Descriptor};
use crate::resident::{Found, Residency, EPOCH_SECS};
use crate::setup::feature;
use ferry_device::Request;

/// The fields of the kernel's I/O descriptor that serving a request needs.
fn descriptor(iod: &libublk::sys::ublksrv_io_desc) -> Descriptor {
    Descriptor {
        op_flags: iod.op_flags,
        nr_sectors: iod.nr_sectors,
        start_sector: iod.start_sector,
    }
}

/// Seconds without I/O after which libublk lets an idle queue release the
/// pages of its request buffers.
const IDLE_SECS: u64 = 20;

/// How long a granule's "in the page cache" bit lasts (see the `resident`
/// module); read by the kernel when the timeout is submitted.
static EPOCH: types::Timespec = types::Timespec::new().sec(EPOCH_SECS);

/// What every queue of one device shares.
pub(crate) struct Served<D> {
    /// The device behind the ublk device.
    pub(crate) device: Arc<D>,
    /// The runtime the device's futures run on.
    pub(crate) rt: tokio::runtime::Handle,
    /// Size of the device in bytes, read once at start.
    pub(crate) size: u64,
    /// Which granules were wholly in the page cache a moment ago.
    pub(crate) residency: Arc<Residency>,
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
    let cdev = if dev.dev_info.flags & feature::USER_COPY != 0 {
        match cdev::cdev_fd(dev) {
            Some(fd) => Some(fd),
            None => {
                tracing::error!(
                    queue = qid,
                    "the device uses UBLK_F_USER_COPY but libublk has no /dev/ublkcN descriptor"
                );
                return;
            }
        }
    } else {
        None
    };
    // Shared by the tags of this queue: only used synchronously (no await
    // while borrowed), and allocated on first use.
    let scratch = Rc::new(RefCell::new(Vec::new()));
    let exe = Rc::new(smol::LocalExecutor::new());
    // A granule's bit was set: the epoch timer of this queue must run.
    let (armed, arm) = smol::channel::bounded(1);

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
            residency: Arc::clone(&served.residency),
            armed: armed.clone(),
        };
        let scratch = Rc::clone(&scratch);
        tags.push(exe.spawn(async move {
            let served = match cdev {
                Some(cdev) => serve_tag_user_copy(&queue, &ctx, cdev, buf_len, &scratch).await,
                None => serve_tag(&queue, &ctx, buf_len).await,
            };
            match served {
                Ok(()) | Err(LibError::QueueIsDown) => {}
                Err(e) => tracing::error!(queue = qid, tag, "ublk tag stopped: {e}"),
            }
        }));
    }
    // Never finishes on its own; dropped with the executor.
    let _waker = exe.spawn(drain_wakeups(Rc::clone(&queue), Arc::clone(&wake)));
    let _epochs = exe.spawn(clear_epochs(
        Rc::clone(&queue),
        Arc::clone(&served.residency),
        arm,
    ));

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

/// Clears the residency bits [`EPOCH_SECS`] after one was set (a timeout
/// on the queue's ring, armed only while a bit may be set, so an idle
/// queue stays idle).
async fn clear_epochs(
    queue: Rc<UblkQueue<'_>>,
    residency: Arc<Residency>,
    arm: smol::channel::Receiver<()>,
) {
    while arm.recv().await.is_ok() {
        let sqe = opcode::Timeout::new(&EPOCH).build();
        let res = queue.ublk_submit_sqe(sqe).await;
        if res != -libc::ETIME {
            if res != -libc::ECANCELED {
                tracing::error!(
                    queue = queue.get_qid(),
                    "the residency epoch timeout failed: errno {}",
                    -res
                );
            }
            return;
        }
        residency.clear();
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
    residency: Arc<Residency>,
    /// Starts the queue's epoch timer ([`clear_epochs`]).
    armed: smol::channel::Sender<()>,
}

/// Fetches and answers requests on one tag, with the tag's own buffer,
/// until the queue goes down.
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
        let desc = descriptor(queue.get_iod(ctx.tag));
        let path = DataPath::Buffer(buf.as_mut_slice());
        let res = match ctx.handle(desc, path, TargetIo::Ring(queue)).await {
            Ok(res) => res,
            Err(e) => request_failed(ctx.qid, ctx.tag, desc, &e),
        };
        queue
            .submit_io_commit_cmd(ctx.tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Fetches and answers requests on one tag with `UBLK_F_USER_COPY` (no
/// buffer: data moves through `cdev`) until the queue goes down.
async fn serve_tag_user_copy<D: BlockDevice>(
    queue: &UblkQueue<'_>,
    ctx: &TagCtx<D>,
    cdev: BorrowedFd<'_>,
    max_len: usize,
    scratch: &RefCell<Vec<u8>>,
) -> Result<(), LibError> {
    let pos = UblkIOCtx::ublk_user_copy_pos(ctx.qid, ctx.tag, 0);
    // The ring reads into it: kept (leaked) if this task is dropped
    // half-way.
    let mut ring_buf = KeepWhileBusy::new(Vec::new());
    let served = async {
        queue
            .submit_io_prep_cmd(ctx.tag, BufDesc::Slice(&[]), 0, None)
            .await?;
        loop {
            let desc = descriptor(queue.get_iod(ctx.tag));
            let path = DataPath::UserCopy(UserCopy {
                cdev,
                pos,
                max_len,
                scratch,
                ring_buf: &mut ring_buf,
            });
            let res = match ctx.handle(desc, path, TargetIo::Ring(queue)).await {
                Ok(res) => res,
                Err(e) => request_failed(ctx.qid, ctx.tag, desc, &e),
            };
            queue
                .submit_io_commit_cmd(ctx.tag, BufDesc::Slice(&[]), res)
                .await?;
        }
    }
    .await;
    ring_buf.done();
    served
}

/// A tag's buffer, freed only by [`KeepWhileBusy::done`], once no ring
/// read can write into it any more; dropped otherwise (its task dropped
/// half-way), it is leaked.
struct KeepWhileBusy<T>(ManuallyDrop<T>);

impl<T> KeepWhileBusy<T> {
    fn new(value: T) -> Self {
        Self(ManuallyDrop::new(value))
    }

    /// Frees the buffer: call only when no operation on it is in flight.
    fn done(self) {
        drop(ManuallyDrop::into_inner(self.0));
    }
}

impl<T> std::ops::Deref for KeepWhileBusy<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for KeepWhileBusy<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// Where one request's data lives while it is served.
enum DataPath<'a> {
    /// The tag's I/O buffer; the driver copies it to or from the request's
    /// pages.
    Buffer(&'a mut [u8]),
    /// `UBLK_F_USER_COPY`: the request's data is read and written on the
    /// char device.
    UserCopy(UserCopy<'a>),
}

impl DataPath<'_> {
    /// The largest request this path can carry.
    fn max_len(&self) -> usize {
        match self {
            DataPath::Buffer(buf) => buf.len(),
            DataPath::UserCopy(uc) => uc.max_len,
        }
    }
}

/// The char device side of one tag under `UBLK_F_USER_COPY`.
struct UserCopy<'a> {
    /// `/dev/ublkcN` (in tests, any file).
    cdev: BorrowedFd<'a>,
    /// The tag's user-copy position: byte 0 of its request.
    pos: u64,
    /// The device's largest request.
    max_len: usize,
    /// The queue's scratch buffer for devices without `copy_now`.
    scratch: &'a RefCell<Vec<u8>>,
    /// The tag's buffer for READs on the ring, grown on first use.
    ring_buf: &'a mut Vec<u8>,
}

/// How a tag reads a range of the device's file that is not in the page
/// cache.
#[derive(Clone, Copy)]
enum TargetIo<'a> {
    /// An io_uring READ on the queue's ring: a slow read waits in the
    /// kernel while the queue serves its other tags.
    Ring(&'a UblkQueue<'a>),
    /// A plain `pread` on the calling thread, counted (unit tests: they
    /// have no queue ring).
    #[cfg(test)]
    Counted(&'a std::sync::atomic::AtomicUsize),
}

impl TargetIo<'_> {
    /// Reads `buf.len()` bytes of `fd` at `offset` into `buf`.
    async fn read_exact_at(
        self,
        fd: BorrowedFd<'_>,
        mut offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        // Outside tests `Ring` is the only variant.
        #[cfg_attr(not(test), allow(clippy::infallible_destructuring_match))]
        let queue = match self {
            TargetIo::Ring(queue) => queue,
            #[cfg(test)]
            TargetIo::Counted(n) => {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return cdev::read_exact_at(fd, buf, offset);
            }
        };
        let mut done = 0;
        // EAGAIN/EINTR are retried a few times, as libublk's loop example
        // does; a short read continues where it stopped.
        let mut retries = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            // The buffer outlives the operation: this future holds the
            // borrow until the completion arrives, and the tag's buffer is
            // leaked rather than freed if the future is dropped before
            // (`KeepWhileBusy`).
            let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), rest.as_mut_ptr(), len)
                .offset(offset)
                .build();
            match queue.ublk_submit_sqe(sqe).await {
                n if n > 0 => {
                    done += n as usize;
                    offset += n as u64;
                }
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the device's file ends at offset {offset}"),
                    ))
                }
                e if (e == -libc::EAGAIN || e == -libc::EINTR) && retries < 4 => retries += 1,
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
        Ok(())
    }
}

impl UserCopy<'_> {
    /// A READ served without the device's runtime: straight to the char
    /// device (`copy_now`) if the range was in the page cache a moment ago
    /// or is now; read on the ring into the tag's buffer, then written to
    /// the char device, if it lies in the device's file but not in the
    /// page cache; else `read_now` into the scratch buffer and from there
    /// to the char device. `None`: the device must wait (take the async
    /// path).
    async fn read_now<D: BlockDevice>(
        &mut self,
        ctx: &TagCtx<D>,
        offset: u64,
        len: usize,
        io: TargetIo<'_>,
    ) -> Option<io::Result<()>> {
        let device = &*ctx.device;
        if !ctx.residency.recent(offset, len as u64) {
            match present_file(device, offset, len as u64) {
                Some(Ok(fd)) => match ctx.residency.check(fd, offset, len as u64) {
                    Ok(Found::Resident { marked }) => {
                        if marked {
                            // Full: the timer is armed already.
                            let _ = ctx.armed.try_send(());
                        }
                    }
                    Ok(Found::NotResident) => {
                        if self.ring_buf.len() < len {
                            self.ring_buf.resize(len, 0);
                        }
                        let buf = &mut self.ring_buf[..len];
                        return Some(match io.read_exact_at(fd, offset, buf).await {
                            Ok(()) => cdev::write_all_at(self.cdev, buf, self.pos),
                            Err(e) => Err(e),
                        });
                    }
                    // Not known: copied at once, as before the ring path.
                    Err(e) => tracing::trace!("ublk: page-cache check failed: {e}"),
                },
                Some(Err(e)) => return Some(Err(e)),
                None => {}
            }
        }
        if let Some(done) = copy_now(device, offset, len, self.cdev, self.pos) {
            return Some(done);
        }
        let mut scratch = self.scratch.borrow_mut();
        if scratch.len() < len {
            scratch.resize(self.max_len.max(len), 0);
        }
        let dst = &mut scratch[..len];
        match ferry_device::read_now(device, offset, dst)? {
            Ok(()) => Some(cdev::write_all_at(self.cdev, dst, self.pos)),
            Err(e) => Some(Err(e)),
        }
    }
}

impl<D: BlockDevice> TagCtx<D> {
    /// Runs one request; the result is what the driver is told (bytes
    /// transferred for READ/WRITE, 0 for the others). `io` reads ranges of
    /// the device's file that are not in the page cache.
    async fn handle(
        &self,
        desc: Descriptor,
        mut path: DataPath<'_>,
        io: TargetIo<'_>,
    ) -> io::Result<i32> {
        let device = Arc::clone(&self.device);
        let request = decode(desc, self.size, path.max_len())?;
        match request {
            Request::Read { offset, len } => {
                let n = len as usize;
                // `decode` checked `len <= path.max_len()`: the fast paths
                // get exactly the request.
                let served = match &mut path {
                    DataPath::Buffer(buf) => {
                        ferry_device::read_now(&*self.device, offset, &mut buf[..n])
                    }
                    DataPath::UserCopy(uc) => uc.read_now(self, offset, n, io).await,
                };
                if let Some(done) = served {
                    done?;
                    return Ok(len as i32);
                }
                let data = self
                    .on_runtime(async move {
                        ferry_device::execute(&*device, request, Vec::new()).await
                    })
                    .await?;
                match path {
                    DataPath::Buffer(buf) => buf[..n].copy_from_slice(&data),
                    DataPath::UserCopy(uc) => cdev::write_all_at(uc.cdev, &data, uc.pos)?,
                }
                Ok(len as i32)
            }
            Request::Write { len, .. } => {
                let data = match path {
                    DataPath::Buffer(buf) => buf[..len as usize].to_vec(),
                    DataPath::UserCopy(uc) => {
                        let mut data = vec![0; len as usize];
                        cdev::read_exact_at(uc.cdev, &mut data, uc.pos)?;
                        data
                    }
                };
                self.on_runtime(
                    async move { ferry_device::execute(&*device, request, data).await },
                )
                .await?;
                Ok(len as i32)
            }
            Request::Flush | Request::Trim { .. } | Request::WriteZeroes { .. } => {
                self.on_runtime(async move {
                    ferry_device::execute(&*device, request, Vec::new()).await
                })
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

/// [`BlockDevice::copy_now`] to the char device, on the queue thread; a
/// panic in the device fails this request only (as in [`read_now`]).
fn copy_now<D: BlockDevice>(
    device: &D,
    offset: u64,
    len: usize,
    out: BorrowedFd<'_>,
    out_offset: u64,
) -> Option<io::Result<()>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        device.copy_now(offset, len, out, out_offset)
    }))
    .unwrap_or_else(|_| {
        Some(Err(io::Error::other(
            "the device's synchronous copy panicked",
        )))
    })
}

/// [`BlockDevice::present_file`] of a READ, on the queue thread; a panic in
/// the device fails this request only (as in [`copy_now`]).
fn present_file<D: BlockDevice>(
    device: &D,
    offset: u64,
    len: u64,
) -> Option<io::Result<BorrowedFd<'_>>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        device.present_file(offset, len)
    }))
    .map_or_else(
        |_| Some(Err(io::Error::other("the device's present_file panicked"))),
        |fd| fd.map(Ok),
    )
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
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::request::op;
    use crate::resident::Uniform;

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

    /// The byte at `at` of the fake device's file: its offset, so a read of
    /// the wrong place shows (never 0xef, what `copy_now` writes).
    fn file_byte(at: u64) -> u8 {
        (at / 512 % 200) as u8
    }

    fn file_bytes(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(file_byte).collect()
    }

    /// A file of `SIZE` bytes holding `file_byte`.
    fn device_file() -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..SIZE).map(file_byte).collect();
        f.write_all_at(&data, 0).unwrap();
        f
    }

    struct Fake {
        now: Now,
        /// Whether `copy_now` serves (writing 0xef), or declines.
        copy: bool,
        /// The file `present_file` hands out, if the device has one.
        file: Option<std::fs::File>,
        /// Whether `present_file` panics.
        file_panics: bool,
        /// (offset, len) of every `present_file` call that gave the file.
        files: Mutex<Vec<(u64, u64)>>,
        /// Reads of the file on the "ring" (`TargetIo::Counted`).
        ring_reads: AtomicUsize,
        /// Length of every buffer `read_now` was given.
        now_lens: Mutex<Vec<usize>>,
        /// (offset, len, out_offset) of every served `copy_now`.
        copies: Mutex<Vec<(u64, usize, u64)>>,
        /// Calls of the async `read`.
        reads: AtomicUsize,
        /// (offset, data) of every write.
        written: Mutex<Vec<(u64, Vec<u8>)>>,
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

        fn copy_now(
            &self,
            offset: u64,
            len: usize,
            out: BorrowedFd<'_>,
            out_offset: u64,
        ) -> Option<io::Result<()>> {
            if !self.copy {
                return None;
            }
            self.copies.lock().unwrap().push((offset, len, out_offset));
            Some(cdev::write_all_at(out, &vec![0xef; len], out_offset))
        }

        fn present_file(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
            assert!(!self.file_panics, "present_file panics");
            let file = self.file.as_ref()?;
            self.files.lock().unwrap().push((offset, len));
            Some(file.as_fd())
        }

        async fn read(&self, _offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(vec![0xcd; len as usize])
        }

        async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
            self.written.lock().unwrap().push((offset, data));
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
        let (_rt, device, ctx) = fixture(now, false);
        let desc = Descriptor {
            op_flags: op::READ,
            nr_sectors: sectors,
            start_sector: 8,
        };
        let mut buf = vec![0u8; 64 << 10];
        let io = TargetIo::Counted(&device.ring_reads);
        let res = smol::block_on(ctx.handle(desc, DataPath::Buffer(&mut buf), io));
        (res, buf, device)
    }

    /// How the fake device and the page cache behave.
    #[derive(Clone, Copy)]
    struct Setup {
        now: Now,
        /// The device has `copy_now`.
        copy: bool,
        /// The device has a file (`present_file`).
        file: bool,
        /// `present_file` panics.
        file_panics: bool,
        /// The page cache holds every page of the file (else none).
        cached: bool,
    }

    /// A runtime, a fake device behaving as `now` (`copy`: it has
    /// `copy_now`), and tag 0 of queue 0 over it.
    fn fixture(now: Now, copy: bool) -> (tokio::runtime::Runtime, Arc<Fake>, TagCtx<Fake>) {
        fixture_with(Setup {
            now,
            copy,
            file: false,
            file_panics: false,
            cached: true,
        })
    }

    /// As [`fixture`], as set up.
    fn fixture_with(setup: Setup) -> (tokio::runtime::Runtime, Arc<Fake>, TagCtx<Fake>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let device = Arc::new(Fake {
            now: setup.now,
            copy: setup.copy,
            file: setup.file.then(device_file),
            file_panics: setup.file_panics,
            files: Mutex::default(),
            ring_reads: AtomicUsize::new(0),
            now_lens: Mutex::default(),
            copies: Mutex::default(),
            reads: AtomicUsize::new(0),
            written: Mutex::default(),
        });
        let ctx = TagCtx {
            qid: 0,
            tag: 0,
            device: Arc::clone(&device),
            rt: rt.handle().clone(),
            size: SIZE,
            wake: Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap()),
            residency: Arc::new(Residency::with_page_cache(SIZE, Uniform(setup.cached))),
            armed: smol::channel::bounded(1).0,
        };
        (rt, device, ctx)
    }

    /// Runs a request with `UBLK_F_USER_COPY` against a fake device: a temp
    /// file stands for the char device and `POS` for the tag's position.
    /// Returns the result, the "char device" and the device.
    fn user_copy(
        now: Now,
        copy: bool,
        op_flags: u32,
        sectors: u32,
        cdev: std::fs::File,
    ) -> (io::Result<i32>, std::fs::File, Arc<Fake>) {
        let (_rt, device, ctx) = fixture(now, copy);
        let res = uc_request(&ctx, &device, op_flags, 8, sectors, &cdev);
        (res, cdev, device)
    }

    /// Runs a request with `UBLK_F_USER_COPY` on `ctx` (over `device`) at
    /// sector `sector`, `cdev` standing for the char device.
    fn uc_request(
        ctx: &TagCtx<Fake>,
        device: &Fake,
        op_flags: u32,
        sector: u64,
        sectors: u32,
        cdev: &std::fs::File,
    ) -> io::Result<i32> {
        let desc = Descriptor {
            op_flags,
            nr_sectors: sectors,
            start_sector: sector,
        };
        let scratch = RefCell::new(Vec::new());
        let mut ring_buf = Vec::new();
        let path = DataPath::UserCopy(UserCopy {
            cdev: cdev.as_fd(),
            pos: POS,
            max_len: 64 << 10,
            scratch: &scratch,
            ring_buf: &mut ring_buf,
        });
        smol::block_on(ctx.handle(desc, path, TargetIo::Counted(&device.ring_reads)))
    }

    /// Stand-in for the tag's user-copy position.
    const POS: u64 = 1 << 16;

    fn cdev_bytes(cdev: &std::fs::File, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        cdev.read_exact_at(&mut got, POS).unwrap();
        got
    }

    #[test]
    fn user_copy_read_uses_copy_now_with_the_tags_position() {
        let cdev = tempfile::tempfile().unwrap();
        let (res, cdev, device) = user_copy(Now::Decline, true, op::READ, 8, cdev);
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(*device.copies.lock().unwrap(), [(4096, 4096, POS)]);
        assert!(device.now_lens.lock().unwrap().is_empty());
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        assert!(cdev_bytes(&cdev, 4096).iter().all(|b| *b == 0xef));
        assert_eq!(
            cdev.metadata().unwrap().len(),
            POS + 4096,
            "wrote past the request"
        );
    }

    /// A device with `copy_now` and a file, the page cache holding all of
    /// it (`cached`) or none of it.
    fn file_device(cached: bool) -> Setup {
        Setup {
            now: Now::Serve,
            copy: true,
            file: true,
            file_panics: false,
            cached,
        }
    }

    #[test]
    fn user_copy_read_in_the_page_cache_is_checked_once_per_granule_then_copied_at_once() {
        let (_rt, device, ctx) = fixture_with(file_device(true));
        let (armed, arm) = smol::channel::bounded(1);
        let ctx = TagCtx { armed, ..ctx };
        let cdev = tempfile::tempfile().unwrap();
        // First READ of granule 0: one page-cache check, then `copy_now`;
        // the bit is set and the epoch timer armed.
        assert_eq!(
            uc_request(&ctx, &device, op::READ, 8, 8, &cdev).unwrap(),
            4096
        );
        assert_eq!(ctx.residency.checks(), 1);
        assert_eq!(*device.files.lock().unwrap(), [(4096, 4096)]);
        assert_eq!(*device.copies.lock().unwrap(), [(4096, 4096, POS)]);
        assert_eq!(arm.try_recv(), Ok(()));
        // Another READ of the granule: no check, no `present_file`.
        assert_eq!(
            uc_request(&ctx, &device, op::READ, 64, 16, &cdev).unwrap(),
            8192
        );
        assert_eq!(ctx.residency.checks(), 1);
        assert_eq!(device.files.lock().unwrap().len(), 1);
        assert_eq!(device.copies.lock().unwrap().len(), 2);
        assert!(arm.is_empty(), "nothing new to time out");
        assert_eq!(device.ring_reads.load(Ordering::SeqCst), 0);
        assert!(cdev_bytes(&cdev, 8192).iter().all(|b| *b == 0xef));
        // After the epoch: asked again.
        ctx.residency.clear();
        uc_request(&ctx, &device, op::READ, 8, 8, &cdev).unwrap();
        assert_eq!(ctx.residency.checks(), 2);
        assert_eq!(arm.try_recv(), Ok(()));
    }

    #[test]
    fn user_copy_read_not_in_the_page_cache_goes_to_the_ring() {
        let (_rt, device, ctx) = fixture_with(file_device(false));
        let cdev = tempfile::tempfile().unwrap();
        // 8 KiB at 12 KiB: read on the "ring", then written to the char
        // device: the file's bytes, exactly the request.
        assert_eq!(
            uc_request(&ctx, &device, op::READ, 24, 16, &cdev).unwrap(),
            8192
        );
        assert_eq!(device.ring_reads.load(Ordering::SeqCst), 1);
        assert!(device.copies.lock().unwrap().is_empty());
        assert!(device.now_lens.lock().unwrap().is_empty());
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        assert_eq!(cdev_bytes(&cdev, 8192), file_bytes(12288, 8192));
        assert_eq!(cdev.metadata().unwrap().len(), POS + 8192);
        // Nothing marked: the next READ asks again, and goes to the ring.
        assert!(!ctx.residency.recent(12288, 8192));
        uc_request(&ctx, &device, op::READ, 24, 16, &cdev).unwrap();
        assert_eq!(ctx.residency.checks(), 2);
        assert_eq!(ctx.residency.misses(), 2);
        assert_eq!(device.ring_reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn user_copy_read_of_a_range_not_in_the_file_skips_the_check() {
        // No file (e.g. blocks still absent): `copy_now`, `read_now`, then
        // the async read, as before.
        let cdev = tempfile::tempfile().unwrap();
        let (res, cdev, device) = user_copy(Now::Decline, false, op::READ, 8, cdev);
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(device.reads.load(Ordering::SeqCst), 1);
        assert_eq!(device.ring_reads.load(Ordering::SeqCst), 0);
        assert!(cdev_bytes(&cdev, 4096).iter().all(|b| *b == 0xcd));
        let (_rt, device, ctx) = fixture(Now::Serve, true);
        uc_request(&ctx, &device, op::READ, 8, 8, &cdev).unwrap();
        assert_eq!(ctx.residency.checks(), 0);
        assert_eq!(device.copies.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_panicking_present_file_fails_the_request_only() {
        let (_rt, device, ctx) = fixture_with(Setup {
            file_panics: true,
            ..file_device(false)
        });
        let cdev = tempfile::tempfile().unwrap();
        let e = uc_request(&ctx, &device, op::READ, 8, 8, &cdev).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert_eq!(device.ring_reads.load(Ordering::SeqCst), 0);
        assert!(device.copies.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failed_ring_read_fails_the_request() {
        // The file is shorter than the device: the read hits its end.
        let (_rt, device, ctx) = fixture_with(file_device(false));
        device.file.as_ref().unwrap().set_len(4096).unwrap();
        let cdev = tempfile::tempfile().unwrap();
        let e = uc_request(&ctx, &device, op::READ, 8, 16, &cdev).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(cdev.metadata().unwrap().len(), 0, "nothing delivered");
    }

    #[test]
    fn user_copy_read_without_copy_now_goes_through_read_now() {
        let cdev = tempfile::tempfile().unwrap();
        let (res, cdev, device) = user_copy(Now::Serve, false, op::READ, 16, cdev);
        assert_eq!(res.unwrap(), 8192);
        assert_eq!(*device.now_lens.lock().unwrap(), [8192]);
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        assert!(cdev_bytes(&cdev, 8192).iter().all(|b| *b == 0xab));
        assert_eq!(cdev.metadata().unwrap().len(), POS + 8192);
    }

    #[test]
    fn user_copy_read_falls_back_to_the_async_read() {
        let cdev = tempfile::tempfile().unwrap();
        let (res, cdev, device) = user_copy(Now::Decline, false, op::READ, 8, cdev);
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(device.reads.load(Ordering::SeqCst), 1);
        assert!(cdev_bytes(&cdev, 4096).iter().all(|b| *b == 0xcd));
    }

    #[test]
    fn user_copy_read_errors_keep_their_errno() {
        let cdev = tempfile::tempfile().unwrap();
        let (res, _, device) = user_copy(Now::Fail, false, op::READ, 8, cdev);
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(device.reads.load(Ordering::SeqCst), 0);
        // A char device that refuses the data fails the request.
        let dir = tempfile::tempdir().unwrap();
        let ro = std::fs::File::open(dir.path()).unwrap();
        let (res, _, _) = user_copy(Now::Serve, false, op::READ, 8, ro);
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn user_copy_write_takes_its_data_from_the_char_device() {
        let cdev = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        cdev.write_all_at(&data, POS).unwrap();
        let (res, _, device) = user_copy(Now::Serve, true, op::WRITE, 16, cdev);
        assert_eq!(res.unwrap(), 8192);
        assert_eq!(*device.written.lock().unwrap(), [(4096, data)]);
        // Nothing beyond the request can be taken: a short char device fails.
        let short = tempfile::tempfile().unwrap();
        short.set_len(POS + 100).unwrap();
        let (res, _, device) = user_copy(Now::Serve, true, op::WRITE, 16, short);
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(device.written.lock().unwrap().is_empty());
    }

    #[test]
    fn user_copy_requests_larger_than_the_device_allows_are_invalid() {
        let cdev = tempfile::tempfile().unwrap();
        // 256 sectors = 128 KiB > max_len (64 KiB).
        let (res, _, device) = user_copy(Now::Serve, true, op::READ, 256, cdev);
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(device.copies.lock().unwrap().is_empty());
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
