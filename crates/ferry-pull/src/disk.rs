//! The destination's storage as the shell sees it: the disk's bytes
//! ([`Disk`], the backing file in production) and its persistent block map
//! ([`BlockMap`], the state file). Tests and the simulation implement them
//! in memory.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

use ferry_core::SyncBatch;
use ferry_store::{Backing, StateFile, Verified};

/// The disk's bytes.
pub trait Disk: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset` (durable after [`Disk::sync`]).
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Copies `len` bytes at `offset` to `out` at `out_offset` at once, if
    /// it can (see [`ferry_device::BlockDevice::copy_now`]).
    fn copy_to(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        let _ = (offset, len, out, out_offset);
        None
    }
    /// The file holding the disk's bytes at their own offsets, if there is
    /// one (see [`ferry_device::BlockDevice::present_file`]).
    fn file(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Runs `f` (I/O on this disk or its block map, which may block) where
    /// blocking does not hold up other requests.
    fn offload<R: Send + 'static>(
        f: impl FnOnce() -> io::Result<R> + Send + 'static,
    ) -> impl Future<Output = io::Result<R>> + Send;
}

/// The persistent block map: which blocks are present (durable), which
/// chunks the guest wrote.
pub trait BlockMap: Send + 'static {
    /// Records guest writes of `blocks` as they are acknowledged (for a
    /// restart after a crash of the process; not synced).
    fn mark_written(&mut self, blocks: Range<u64>) -> io::Result<()>;
    /// Persists a sync round's bits; the disk was synced before.
    fn persist(&mut self, batch: &SyncBatch) -> io::Result<()>;
    /// Clears the present bits of `blocks`, durably.
    fn clear_present(&mut self, blocks: &[Range<u64>]) -> io::Result<()>;
    /// Records that the copy is complete and verified, durably.
    fn record_verified(&mut self, verified: Verified) -> io::Result<()>;
    /// Records where a pre-copy stands, durably (see
    /// [`ferry_store::Precopy`]). Maps of tests that never pre-copy may
    /// keep the default, which records nothing.
    fn record_precopy(&mut self, precopy: ferry_store::Precopy) -> io::Result<()> {
        let _ = precopy;
        Ok(())
    }
}

impl Disk for Backing {
    fn size(&self) -> u64 {
        Backing::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Backing::read_at(self, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        Backing::write_at(self, data, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        Backing::punch_hole(self, offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        Backing::sync(self)
    }
    fn copy_to(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        Backing::copy_to(self, offset, len, out, out_offset)
    }
    fn file(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
    /// On tokio's blocking threads.
    async fn offload<R: Send + 'static>(
        f: impl FnOnce() -> io::Result<R> + Send + 'static,
    ) -> io::Result<R> {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
    }
}

impl BlockMap for StateFile {
    fn mark_written(&mut self, blocks: Range<u64>) -> io::Result<()> {
        StateFile::mark_written(self, blocks).map_err(io::Error::other)
    }
    fn persist(&mut self, batch: &SyncBatch) -> io::Result<()> {
        StateFile::persist(self, batch).map_err(io::Error::other)
    }
    fn clear_present(&mut self, blocks: &[Range<u64>]) -> io::Result<()> {
        StateFile::clear_present(self, blocks).map_err(io::Error::other)
    }
    fn record_verified(&mut self, verified: Verified) -> io::Result<()> {
        StateFile::record_verified(self, verified).map_err(io::Error::other)
    }
    fn record_precopy(&mut self, precopy: ferry_store::Precopy) -> io::Result<()> {
        StateFile::record_precopy(self, precopy).map_err(io::Error::other)
    }
}
