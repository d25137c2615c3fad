//! Which pages of a device's file are in the page cache: a read-only shared
//! mapping of the file, asked with `mincore(2)`.
//!
//! The mapping is never read from userspace (no `&[u8]` is ever formed over
//! it, and nothing dereferences it): it exists only so that `mincore` can
//! report the page cache's state of the file's pages, which it does for a
//! file mapping whether or not the pages were ever faulted in. Besides
//! `cdev`, this is the only module of the crate with `unsafe` code.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::resident::PageCache;

/// A read-only shared mapping of the first `len` bytes of a file, used only
/// for `mincore`.
pub(crate) struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
    page: u64,
}

// SAFETY: the mapping is never read or written through `ptr` in userspace;
// the pointer is only handed to `mincore` (which only reads the page tables
// and the page cache) and to `munmap` in `Drop` (once, with `&mut self`).
// Sharing or sending it between threads therefore shares no memory.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` only allows `mincore` calls, which the
// kernel serialises as needed.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd`'s file (read-only, shared).
    pub(crate) fn new(fd: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes of the device's file"),
            )
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(bad)?;
        // SAFETY: a new mapping at an address the kernel chooses (addr is
        // null), so no existing memory is affected; `fd` is an open
        // descriptor borrowed for the call (the mapping keeps its own
        // reference to the file). The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr).ok_or_else(bad)?;
        Ok(Self {
            ptr,
            len,
            page: page_size(),
        })
    }
}

impl PageCache for Mapping {
    fn page_size(&self) -> u64 {
        self.page
    }

    fn mincore(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let outside = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} pages at {start} are not page-aligned inside the {}-byte mapping",
                    out.len(),
                    self.len
                ),
            )
        };
        let start = usize::try_from(start)
            .ok()
            .filter(|s| *s < self.len && (*s as u64).is_multiple_of(self.page))
            .ok_or_else(outside)?;
        // The kernel writes one byte per page of `span` (rounded up).
        let span = (out.len() as u64)
            .saturating_mul(self.page)
            .min((self.len - start) as u64) as usize;
        if span == 0 {
            return Ok(());
        }
        // SAFETY: `start` is page-aligned (the mapping starts on a page
        // boundary) and `start..start + span` lies inside the mapping
        // (`span <= self.len - start`), which stays mapped while `self` is
        // borrowed; the kernel writes `span.div_ceil(page) <= out.len()`
        // bytes into `out`. Nothing reads or writes the mapped memory.
        let rc = unsafe {
            libc::mincore(
                self.ptr.as_ptr().cast::<u8>().add(start).cast(),
                span,
                out.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned and was
        // given; the mapping is unmapped once, here, and nothing refers to
        // its memory (it was never dereferenced).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
        if rc != 0 {
            tracing::warn!(
                "unmapping the page-cache probe of the device's file failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The system's page size (mappings and `mincore` work in pages).
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // 4096 if sysconf fails, which it does not for _SC_PAGESIZE on Linux.
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A file of `len` bytes written through the page cache, in a temporary
    /// directory in the crate's own directory (likely a disk filesystem:
    /// /tmp may be tmpfs, whose pages cannot be dropped).
    fn disk_file(len: usize) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&vec![0x5a; len], 0).unwrap();
        (dir, f)
    }

    fn resident(map: &Mapping, start: u64, pages: usize) -> Vec<bool> {
        let mut out = vec![0u8; pages];
        map.mincore(start, &mut out).unwrap();
        out.iter().map(|b| b & 1 != 0).collect()
    }

    #[test]
    fn mincore_follows_the_page_cache() {
        let len = 64 * 4096;
        let (_dir, f) = disk_file(len);
        let map = Mapping::new(f.as_fd(), len as u64).unwrap();
        let page = map.page_size();
        let pages = len / page as usize;
        // Just written: in the page cache.
        assert!(resident(&map, 0, pages).iter().all(|r| *r));
        let fs = nix::sys::statfs::fstatfs(&f).unwrap().filesystem_type();
        if fs == nix::sys::statfs::TMPFS_MAGIC {
            // A target dir on tmpfs: its pages cannot be dropped.
            return;
        }
        // Written back and dropped: no longer resident.
        f.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(resident(&map, 0, pages).iter().all(|r| !*r));
        // One page read back: that page (only) is resident again.
        let mut buf = vec![0u8; page as usize];
        f.read_exact_at(&mut buf, 2 * page).unwrap();
        assert_eq!(resident(&map, page, 3), [false, true, false]);
    }

    #[test]
    fn mincore_refuses_what_lies_outside_the_mapping_and_unaligned_starts() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(3 * 4096).unwrap();
        let map = Mapping::new(f.as_fd(), 3 * 4096).unwrap();
        let mut out = [0u8; 4];
        for start in [1, 3 * 4096, 1 << 40, u64::MAX] {
            let e = map.mincore(start, &mut out).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{start}");
        }
        // More pages asked than mapped: only the mapped ones are reported.
        out = [7; 4];
        map.mincore(0, &mut out).unwrap();
        assert_eq!(out[3], 7, "wrote past the mapping's pages");
        assert!(Mapping::new(f.as_fd(), 0).is_err());
    }
}
