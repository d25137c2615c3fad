//! The block-device interface served by ferry's frontends.
//!
//! A frontend (the NBD server, the ublk target) turns requests from its
//! client into calls on a [`BlockDevice`]. The migration engine implements it
//! for `ferry pull`; [`MemDevice`] is a simple in-memory device for tests of
//! the frontends themselves.
//!
//! [`Request`] is the one request model the frontends share: each frontend
//! only decodes its wire format into a `Request` and encodes the outcome
//! back; validation ([`Request::validate`]), execution ([`execute`], with
//! the fast path [`read_now`] for present blocks) and the mapping of
//! errors to errno values ([`errno`]) live here.
#![forbid(unsafe_code)]

mod errno;
mod request;

pub use errno::errno;
pub use request::{execute, read_now, Limits, Request, RequestError};

use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

/// A byte-addressed block device with the operations a guest can issue.
///
/// Offsets and lengths are in bytes. Frontends check that a request lies
/// inside `0..size()` before calling; implementations may assume it.
/// Errors are `io::Error`s; frontends turn them into the client's error codes
/// (NBD error numbers, negative errno for ublk) in one place.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// Preferred (logical) block size in bytes; 4096 for ferry.
    fn block_size(&self) -> u32 {
        4096
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// Reads `buf.len()` bytes at `offset` into `buf` at once, on the
    /// caller's thread, if that needs no waiting on anything but local
    /// storage (for ferry: every block is present). `None` means "use
    /// [`BlockDevice::read`]". Frontends call it first on their hot path to
    /// avoid a thread hop, an allocation and a copy.
    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let _ = (offset, buf);
        None
    }

    /// Copies `len` bytes at `offset` to the file descriptor `out` at
    /// `out_offset` at once, on the caller's thread, if that needs no
    /// waiting on anything but local storage (as for
    /// [`BlockDevice::read_now`]). `None` means "use `read_now` or `read`".
    ///
    /// For a device over a file this is one `pwrite` from the file's page
    /// cache to `out`: the ublk frontend passes `/dev/ublkcN` at the
    /// request's user-copy position (`UBLK_F_USER_COPY`), so the bytes
    /// reach the block request's pages with a single copy.
    fn copy_now(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        let _ = (offset, len, out, out_offset);
        None
    }

    /// The file that holds the device's bytes at their own offsets, if the
    /// `len` bytes at `offset` can be read from it now without waiting on
    /// anything but local storage (as for [`BlockDevice::read_now`]; for
    /// ferry: every block of the range is present). It is the same file for
    /// every range. `None` means "use `copy_now`, `read_now` or `read`".
    ///
    /// The ublk frontend reads a range that is not in the page cache from
    /// this file on its queue's io_uring, so that a page-cache miss of one
    /// request does not stall the queue's other requests.
    fn present_file(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        let _ = (offset, len);
        None
    }

    /// Writes `data` at `offset`. With `fua`, the data is durable when this
    /// returns.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Discards `len` bytes at `offset` (contents afterwards are zeros).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes zeros over `len` bytes at `offset`. With `fua`, durable on return.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// An in-memory [`BlockDevice`] for tests of frontends.
#[derive(Debug)]
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; usize::try_from(size).expect("size fits in memory")])
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(bytes),
        }
    }

    /// A copy of the device's contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("lock").clone()
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.size();
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "beyond end of device"))?;
        Ok(offset as usize..end as usize)
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().expect("lock").len() as u64
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        Some(self.range(offset, buf.len() as u64).map(|r| {
            buf.copy_from_slice(&self.data.lock().expect("lock")[r]);
        }))
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let r = self.range(offset, u64::from(len))?;
        Ok(self.data.lock().expect("lock")[r].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().expect("lock")[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.data.lock().expect("lock")[r].fill(0);
        Ok(())
    }
}
