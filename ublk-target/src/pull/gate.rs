//! The device a pre-copying pull presents: `/dev/ublkbN` and the NBD
//! export exist from the start (a hypervisor can be given their paths and
//! open them) but no request reaches the disk until the switchover opens
//! the gate: ublk requests fail with EIO (a held one would keep the
//! device from coming up), NBD requests wait; then the pull's device
//! answers as usual (docs/decisions/ublk-precopy-device-dark.md,
//! docs/decisions/nbd-held-until-switchover.md).

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_device::BlockDevice;
use tokio::sync::Notify;

/// Whether the gate lets requests through: shared by the devices and the
/// switchover.
#[derive(Debug, Clone)]
pub(crate) struct Gate(Arc<(AtomicBool, Notify)>);

impl Gate {
    /// A gate letting requests through (`open`) or stopping them.
    pub(crate) fn new(open: bool) -> Self {
        Gate(Arc::new((AtomicBool::new(open), Notify::new())))
    }

    /// Lets every later request through (the switchover is done), and
    /// every held one.
    pub(crate) fn open(&self) {
        self.0 .0.store(true, Ordering::Release);
        self.0 .1.notify_waiters();
    }

    pub(crate) fn is_open(&self) -> bool {
        self.0 .0.load(Ordering::Acquire)
    }

    /// Waits until the gate is open.
    async fn opened(&self) {
        loop {
            let notified = self.0 .1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

/// What a closed gate does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Fails it (ublk).
    Fail,
    /// Holds it until the gate opens (NBD).
    Hold,
}

/// `inner` behind a [`Gate`]. A closed gate answers nothing from the
/// backing file: the fast paths decline (so the frontend takes the slow
/// path) and the slow path fails or waits before it reaches the pull,
/// which therefore neither fetches nor writes for such a request before
/// the switchover.
pub(crate) struct Gated<D> {
    pub(crate) inner: D,
    pub(crate) gate: Gate,
    pub(crate) closed: Closed,
}

impl<D> Gated<D> {
    async fn check(&self) -> io::Result<()> {
        if self.gate.is_open() {
            return Ok(());
        }
        match self.closed {
            Closed::Hold => {
                self.gate.opened().await;
                Ok(())
            }
            Closed::Fail => Err(io::Error::other(
                "pre-copying: this disk serves no I/O until `ferry switchover`",
            )),
        }
    }
}

impl<D: BlockDevice> BlockDevice for Gated<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.check().await?;
        self.inner.read(offset, len).await
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if !self.gate.is_open() {
            return None;
        }
        self.inner.read_now(offset, buf)
    }

    fn copy_now(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        if !self.gate.is_open() {
            return None;
        }
        self.inner.copy_now(offset, len, out, out_offset)
    }

    fn present_file(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        if !self.gate.is_open() {
            return None;
        }
        self.inner.present_file(offset, len)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.check().await?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.check().await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check().await?;
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check().await?;
        self.inner.write_zeroes(offset, len, fua).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_device::MemDevice;

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn closed_gate_fails_every_request_and_leaves_the_device_alone() {
        let gate = Gate::new(false);
        let d = Gated {
            inner: MemDevice::from_bytes(vec![7; 8192]),
            gate: gate.clone(),
            closed: Closed::Fail,
        };
        assert_eq!(d.size(), 8192);
        let mut buf = [0u8; 4096];
        assert!(d.read_now(0, &mut buf).is_none());
        assert_eq!(buf, [0; 4096]);
        block_on(async {
            assert!(d.read(0, 4096).await.is_err());
            assert!(d.write(0, vec![1; 4096], true).await.is_err());
            assert!(d.write_zeroes(4096, 4096, false).await.is_err());
            assert!(d.trim(0, 8192).await.is_err());
            assert!(d.flush().await.is_err());
        });
        assert_eq!(d.inner.snapshot(), vec![7; 8192]);
        // Once open, requests reach the device.
        gate.open();
        assert!(matches!(d.read_now(0, &mut buf), Some(Ok(()))));
        assert_eq!(buf, [7; 4096]);
        block_on(async {
            d.write(0, vec![1; 4096], false).await.expect("write");
            assert_eq!(d.read(0, 4096).await.expect("read"), vec![1; 4096]);
            d.flush().await.expect("flush");
        });
    }

    /// NBD: a request made while pre-copying waits, untouched, and is
    /// answered with the disk as it is once the gate opens.
    #[test]
    fn closed_holding_gate_answers_held_requests_once_open() {
        let gate = Gate::new(false);
        let d = Arc::new(Gated {
            inner: MemDevice::from_bytes(vec![7; 8192]),
            gate: gate.clone(),
            closed: Closed::Hold,
        });
        let mut buf = [0u8; 4096];
        assert!(d.read_now(0, &mut buf).is_none());
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(async {
                let (r, w) = (d.clone(), d.clone());
                let read = tokio::spawn(async move { r.read(0, 4096).await });
                let write = tokio::spawn(async move { w.write(4096, vec![1; 4096], true).await });
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                assert!(
                    !read.is_finished() && !write.is_finished(),
                    "answered while closed"
                );
                assert_eq!(d.inner.snapshot(), vec![7; 8192], "the disk was touched");
                // What the switchover brought in before opening is read.
                d.inner.write(0, vec![9; 4096], false).await.expect("write");
                gate.open();
                assert_eq!(read.await.expect("join").expect("read"), vec![9; 4096]);
                write.await.expect("join").expect("write");
                assert_eq!(&d.inner.snapshot()[4096..], &[1; 4096][..]);
            });
    }
}
