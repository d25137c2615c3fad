//! A read-only shared mapping of a file, used only as the source address of
//! a `pwrite` to another file descriptor: one copy from the page cache to
//! the target (for ublk with `UBLK_F_USER_COPY`: straight into the pages of
//! the block request), instead of a `pread` into a buffer plus a second copy
//! out of it.
//!
//! The mapping is never read from userspace: no `&[u8]` is ever formed over
//! it (other writers of the file, e.g. this process's own `pwrite`s, change
//! its bytes concurrently, which a Rust slice forbids), and only the kernel
//! touches it, inside `pwrite`. This is the only module of the crate with
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
