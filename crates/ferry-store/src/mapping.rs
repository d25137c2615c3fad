//! A read-only shared mapping of a file, used only as the source address of
//! a `pwrite` to another file descriptor: one copy from the page cache to
//! the target (for ublk with `UBLK_F_USER_COPY`: straight into the pages of
//! the block request), instead of a `pread` into a buffer plus a second copy
//! out of it. `mincore(2)` on it tells whether a range is in the page cache
//! (then that `pwrite` waits on no storage).
//!
//! The mapping is never read from userspace: no `&[u8]` is ever formed over
//! it (other writers of the file, e.g. this process's own `pwrite`s, change
//! its bytes concurrently, which a Rust slice forbids), and only the kernel
//! touches it, inside `pwrite` and `mincore`. This is the only module of the crate with
//! `unsafe` code.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// `len` bytes of a file mapped `PROT_READ`, `MAP_SHARED`.
#[derive(Debug)]
pub(crate) struct FileMap {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value (unmapped only in
// `Drop`); nothing in Rust reads or writes through `ptr`, it is only handed
// to the kernel, which may be called from any thread concurrently.
unsafe impl Send for FileMap {}
// SAFETY: as for `Send`: `&FileMap` only allows `pwrite`s from the mapping,
// which the kernel serialises as it needs to.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the first `len` bytes of `file` (opened for reading) read-only
    /// and shared. `len` must not exceed the file's size, and the file must
    /// not be shrunk while the mapping exists (see [`FileMap::pwrite_to`]).
    pub(crate) fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot map {len} bytes"),
                )
            })?;
        // SAFETY: a new mapping at an address of the kernel's choosing
        // (`addr` None) cannot alias any existing Rust object. It is
        // read-only and never dereferenced by Rust code, so concurrent
        // changes of the file's contents cannot break Rust's aliasing
        // rules. The fd only needs to be valid for the duration of the call
        // (the mapping holds its own reference to the file).
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }?;
        Ok(Self {
            ptr,
            len: len.get(),
        })
    }

    /// Writes `len` bytes of the file at `offset` to `out` at `out_offset`
    /// with `pwrite(2)` straight from the mapping (one copy, from the page
    /// cache into whatever `out` is). Pages not yet in the page cache are
    /// read in by the kernel's fault handling. A short write is continued;
    /// a write that makes no progress is an error.
    pub(crate) fn pwrite_to(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> io::Result<()> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|start| start.checked_add(len).is_some_and(|end| end <= self.len))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} lie outside the {}-byte mapping",
                        self.len
                    ),
                )
            })?;
        let mut done = 0usize;
        while done < len {
            let at = start + done;
            let pos = out_offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "output offset overflows")
                })?;
            // Truncation hazard: if someone else shrank the file below
            // this range, a userspace access would raise SIGBUS; the
            // kernel's access inside `pwrite` is fault-handled instead and
            // the call fails with EFAULT (or writes short): an I/O error of
            // this request. ferry owns its backing file, never shrinks it.
            //
            // SAFETY: `at..at + (len - done)` lies inside the mapping
            // (checked above: `start + len <= self.len`), mapped while
            // `self` is borrowed. The kernel only reads it (the source of
            // the write); Rust never forms a reference to it, so concurrent
            // changes of the file cannot violate aliasing rules.
            let n = unsafe {
                libc::pwrite(
                    out.as_raw_fd(),
                    self.ptr.as_ptr().cast::<u8>().add(at).cast::<c_void>(),
                    len - done,
                    pos,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "pwrite from the mapping wrote nothing after {done} of {len} bytes"
                        ),
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
    /// Whether every page of `len` bytes at `offset` is in the page cache
    /// now (`mincore(2)` on the mapping), so a copy from it waits on no
    /// storage. Only a hint: a page may be evicted right after. A range
    /// outside the mapping is an error.
    pub(crate) fn resident(&self, offset: u64, len: usize) -> io::Result<bool> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|start| start.checked_add(len).is_some_and(|end| end <= self.len))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} lie outside the {}-byte mapping",
                        self.len
                    ),
                )
            })?;
        let page = page_size();
        let end = start + len;
        let mut at = start - start % page;
        // Up to 64 pages per call, on the stack.
        let mut vec = [0u8; 64];
        while at < end {
            let span = (end - at).min(vec.len() * page);
            let pages = span.div_ceil(page);
            // SAFETY: `at` is page-aligned (the mapping starts on a page and
            // `at` is a multiple of the page size from it) and
            // `at..at + span` lies inside the mapping (`end <= self.len`),
            // mapped while `self` is borrowed; the kernel writes one byte per
            // page of the span into `vec`, which holds `pages <= 64` bytes.
            // Nothing reads or writes the mapped memory itself.
            let rc = unsafe {
                libc::mincore(
                    self.ptr.as_ptr().cast::<u8>().add(at).cast::<c_void>(),
                    span,
                    vec.as_mut_ptr().cast(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            if vec[..pages].iter().any(|b| b & 1 == 0) {
                return Ok(false);
            }
            at += span;
        }
        Ok(true)
    }
}

/// The system's page size (mappings and `mincore` work in pages).
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // 4096 if sysconf fails, which it does not for _SC_PAGESIZE on Linux.
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no
        // borrow of `self` (so no `pwrite_to` using it) outlives the drop.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            tracing::warn!("munmap of the backing file failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn pwrite_to_copies_exactly_the_range_and_sees_later_writes() {
        let mut src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        src.write_all(&data).unwrap();
        let map = FileMap::new(&src, data.len() as u64).unwrap();
        let out = tempfile::tempfile().unwrap();
        map.pwrite_to(4096, 8192, out.as_fd(), 100).unwrap();
        let mut got = vec![0u8; 8192];
        out.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got, data[4096..4096 + 8192]);
        assert_eq!(out.metadata().unwrap().len(), 100 + 8192);

        // The mapping is shared: a later write through the fd is what the
        // next copy sends.
        src.write_all_at(&[0xee; 512], 4096).unwrap();
        map.pwrite_to(4096, 512, out.as_fd(), 0).unwrap();
        let mut got = vec![0u8; 512];
        out.read_exact_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|b| *b == 0xee));
    }

    #[test]
    fn ranges_outside_the_mapping_are_refused() {
        let src = tempfile::tempfile().unwrap();
        src.set_len(8192).unwrap();
        let map = FileMap::new(&src, 8192).unwrap();
        let out = tempfile::tempfile().unwrap();
        for (offset, len) in [(8192, 1), (4096, 4097), (u64::MAX, 1)] {
            let e = map.pwrite_to(offset, len, out.as_fd(), 0).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{offset}+{len}");
        }
        assert!(FileMap::new(&src, 0).is_err());
    }

    /// A file of `len` bytes written through the page cache, in a
    /// temporary directory in the crate's own directory (likely a disk
    /// filesystem: /tmp may be tmpfs, whose pages are always resident).
    fn disk_file(len: usize) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all(&vec![0x5a; len]).unwrap();
        (dir, f)
    }

    #[test]
    fn resident_follows_the_page_cache() {
        let len = 256 * 1024;
        let (_dir, f) = disk_file(len);
        let map = FileMap::new(&f, len as u64).unwrap();
        // Just written: in the page cache (dirty pages cannot be dropped).
        assert!(map.resident(0, len).unwrap());
        assert!(map.resident(4095, 2).unwrap(), "unaligned range");
        assert!(map.resident(0, 0).unwrap(), "empty range");
        // Written back and dropped: no longer resident (the advice is
        // honoured for clean pages of a disk filesystem).
        f.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let fs = nix::sys::statfs::fstatfs(&f).unwrap().filesystem_type();
        if fs == nix::sys::statfs::TMPFS_MAGIC {
            // A target dir on tmpfs: its pages cannot be dropped.
            return;
        }
        assert!(!map.resident(0, len).unwrap());
        assert!(!map.resident(8192, 4096).unwrap());
        // Read back one page: that page (only) is resident again.
        let mut page = vec![0u8; 4096];
        f.read_exact_at(&mut page, 8192).unwrap();
        assert!(map.resident(8192, 4096).unwrap());
        assert!(!map.resident(8192, 8192).unwrap());
    }

    #[test]
    fn resident_refuses_ranges_outside_the_mapping() {
        let src = tempfile::tempfile().unwrap();
        src.set_len(8192).unwrap();
        let map = FileMap::new(&src, 8192).unwrap();
        for (offset, len) in [(8192, 1), (4096, 4097), (u64::MAX, 1)] {
            let e = map.resident(offset, len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{offset}+{len}");
        }
    }

    #[test]
    fn errors_of_the_output_come_back() {
        let src = tempfile::tempfile().unwrap();
        src.set_len(4096).unwrap();
        let map = FileMap::new(&src, 4096).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ro = File::open(dir.path()).unwrap();
        let e = map.pwrite_to(0, 4096, ro.as_fd(), 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }
}
