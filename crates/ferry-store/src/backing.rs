//! The destination's backing file: a sparse file the size of the source, or
//! a block device at least that large (an LVM volume, a LUN) whose first
//! bytes hold the disk.
//!
//! Besides `pread`/`pwrite`, the file is mapped once, read-only and shared
//! ([`crate::mapping`]), so [`Backing::copy_to`] can hand a range of it to
//! another file descriptor with one `pwrite` from the page cache (the ublk
//! frontend's single-copy READ).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::lock::{describe_holder, lock_exclusive, LockFail};
use crate::mapping::FileMap;

/// The extended attribute holding the id that binds a backing file to its
/// state file (see [`crate::state`]).
const PAIR_XATTR: &str = "user.ferry.pair";

/// What the backing file says about the state file it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairMark {
    /// The id written at creation.
    Id([u8; 16]),
    /// The filesystem keeps extended attributes but the file has none.
    Missing,
    /// The filesystem keeps no user extended attributes.
    Unsupported,
}

/// Whether `path` is a block device (false if it does not exist).
pub fn is_block_device(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.file_type().is_block_device()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens `path` read-write (creating it, owner-only, when `create`) and
/// locks it. A block device is opened exclusively (`O_EXCL`): the kernel
/// refuses it while it is mounted, part of another device, or so opened
/// by another process.
pub(crate) fn open_locked(path: &Path, create: bool) -> Result<File, BackingError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| BackingError::Open {
        path: path.to_owned(),
        source,
    };
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true).mode(0o600);
    } else if is_block_device(path).map_err(err)? {
        o.custom_flags(libc::O_EXCL);
    }
    let file = match o.open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(BackingError::DeviceBusy {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(err(e)),
    };
    if create {
        // The mode asked for is masked by the umask: set it outright.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    match lock_exclusive(&file) {
        Ok(()) => Ok(file),
        Err(LockFail::Held(pid)) => Err(BackingError::Locked {
            path: path.to_owned(),
            holder: describe_holder(pid),
        }),
        Err(LockFail::Io(source)) => Err(err(source)),
    }
}

/// Errors opening or creating the backing file.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The file could not be opened or created.
    #[error("cannot open backing file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file exists with another size than the source's.
    #[error(
        "backing file {path} exists with size {found} bytes, but the source is {expected} bytes; \
         refusing to touch it (remove it, or pass another --disk)"
    )]
    SizeMismatch {
        /// The path.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The source's size.
        expected: u64,
    },
    /// Another process (another `ferry pull`) has the file open and locked.
    #[error(
        "backing file {path} is in use by {holder} (another ferry pull of this disk?); \
         refusing to serve it twice"
    )]
    Locked {
        /// The path.
        path: PathBuf,
        /// Who holds the lock ("PID 123").
        holder: String,
    },
    /// The block device is smaller than the source's disk.
    #[error(
        "block device {path} holds {found} bytes, but the source's disk is {expected} bytes; \
         refusing it (give a device at least as large as the source)"
    )]
    DeviceTooSmall {
        /// The path.
        path: PathBuf,
        /// The device's size.
        found: u64,
        /// The source's size.
        expected: u64,
    },
    /// The kernel refused an exclusive open of the block device.
    #[error(
        "block device {path} is in use (mounted, part of another device such as an LVM or md \
         volume, or opened exclusively by another process, e.g. another ferry pull); refusing \
         to write to it"
    )]
    DeviceBusy {
        /// The path.
        path: PathBuf,
    },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device; ferry cannot keep a disk in it")]
    NotADisk {
        /// The path.
        path: PathBuf,
    },
    /// The file exists but there is no state file telling what it holds.
    #[error(
        "backing file {path} exists but has no state file {state}; its contents are unknown, \
         so ferry will not use it (remove it, or pass the --state that belongs to it)"
    )]
    Orphan {
        /// The path.
        path: PathBuf,
        /// The expected state path.
        state: PathBuf,
    },
}

/// The backing file.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
    /// A block device (its first `size` bytes are the disk), not a file.
    block_device: bool,
    /// The whole file mapped read-only; `None` if mapping failed (then
    /// [`Backing::copy_to`] declines and callers read with `read_at`).
    map: Option<FileMap>,
}

/// The backing file's descriptor, for frontends that read present blocks
/// with their own I/O engine (ublk: the queue's io_uring).
impl AsFd for Backing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Backing {
    /// Creates a new sparse file of `size` bytes; fails if it exists.
    pub fn create(path: &Path, size: u64) -> Result<Self, BackingError> {
        let b = Self::create_unsynced(path, size)?;
        b.file.sync_all().map_err(|source| BackingError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(b)
    }

    /// [`Backing::create`] without waiting for the new file to be durable:
    /// the caller makes it so ([`Backing::sync_all`], then
    /// [`crate::sync_parent_dir`]) before it records anything as durable in
    /// it. The file is owner-only (0600, whatever the umask) and locked.
    pub fn create_unsynced(path: &Path, size: u64) -> Result<Self, BackingError> {
        let err = |source| BackingError::Open {
            path: path.to_owned(),
            source,
        };
        let file = open_locked(path, true)?;
        file.set_len(size).map_err(err)?;
        Ok(Self::with_map(file, path, size, false))
    }

    /// Makes the file and its metadata (size, extended attributes) durable
    /// (fsync). There is deliberately no second descriptor of the file to
    /// do this with: closing one would drop this process's classic lock
    /// on it (see [`crate::lock`]).
    pub fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Opens an existing file, which must be `size` bytes long, and locks
    /// it ([`BackingError::Locked`] if another process holds it); or a
    /// block device of at least `size` bytes (its size as the kernel
    /// reports it: the end a seek finds, as `BLKGETSIZE64` gives),
    /// exclusively ([`BackingError::DeviceBusy`]). A device is never
    /// resized: the disk is its first `size` bytes, the rest is left as it
    /// is.
    pub fn open(path: &Path, size: u64) -> Result<Self, BackingError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        let err = |source| BackingError::Open {
            path: path.to_owned(),
            source,
        };
        let file = open_locked(path, false)?;
        let kind = file.metadata().map_err(err)?;
        if kind.file_type().is_block_device() {
            let found = (&file).seek(SeekFrom::End(0)).map_err(err)?;
            if found < size {
                return Err(BackingError::DeviceTooSmall {
                    path: path.to_owned(),
                    found,
                    expected: size,
                });
            }
            return Ok(Self::with_map(file, path, size, true));
        }
        if !kind.is_file() {
            return Err(BackingError::NotADisk {
                path: path.to_owned(),
            });
        }
        let found = kind.len();
        if found != size {
            return Err(BackingError::SizeMismatch {
                path: path.to_owned(),
                found,
                expected: size,
            });
        }
        Ok(Self::with_map(file, path, size, false))
    }

    fn with_map(file: File, path: &Path, size: u64, block_device: bool) -> Self {
        // ferry never shrinks the file (it is created at its final size),
        // which the mapping requires; see `FileMap::pwrite_to`.
        let map = match FileMap::new(&file, size) {
            Ok(map) => Some(map),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "cannot map the backing file ({e}); reads will be copied through a buffer"
                );
                None
            }
        };
        Self {
            file,
            path: path.to_owned(),
            size,
            block_device,
            map,
        }
    }

    /// Whether the disk is kept on a block device rather than in a file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Makes the whole disk read as zeros (deallocated where the device
    /// can: see [`Backing::punch_hole`]) and durable. For a block device
    /// taken as a fresh destination: its old contents must not show
    /// through the source's zero chunks, which are never fetched.
    pub fn zero_all(&self) -> io::Result<()> {
        punch_or_zero(&self.file, 0, self.size)?;
        self.file.sync_all()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `id` as the id of this file's state file (an extended
    /// attribute); `Ok(false)` where the filesystem keeps none.
    pub fn set_pair_id(&self, id: &[u8; 16]) -> io::Result<bool> {
        match rustix::fs::fsetxattr(&self.file, PAIR_XATTR, id, rustix::fs::XattrFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOTSUP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The id of the state file this file belongs to.
    pub fn pair_mark(&self) -> io::Result<PairMark> {
        let mut buf = [0u8; 16];
        match rustix::fs::fgetxattr(&self.file, PAIR_XATTR, &mut buf[..]) {
            Ok(16) => Ok(PairMark::Id(buf)),
            Ok(n) => Err(io::Error::other(format!(
                "extended attribute {PAIR_XATTR} is {n} bytes, not 16"
            ))),
            Err(rustix::io::Errno::NODATA) => Ok(PairMark::Missing),
            Err(rustix::io::Errno::NOTSUP) => Ok(PairMark::Unsupported),
            Err(rustix::io::Errno::RANGE) => Err(io::Error::other(format!(
                "extended attribute {PAIR_XATTR} is longer than 16 bytes"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The file's inode number (binds the state file where the filesystem
    /// keeps no extended attributes).
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.ino())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Copies `len` bytes at `offset` to `out` at `out_offset` with one
    /// `pwrite` from the file's mapping: the bytes go from the page cache
    /// straight to `out` (for ublk's user copy, into the block request's
    /// pages), with no buffer in between. `None` when the file could not be
    /// mapped; the caller then uses [`Backing::read_at`].
    pub fn copy_to(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        let map = self.map.as_ref()?;
        Some(map.pwrite_to(offset, len, out, out_offset))
    }

    /// Writes `data` at `offset` (into the page cache; see [`Backing::sync`]).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read as zeros afterwards.
    /// Falls back to writing zeros where hole punching is unsupported. On
    /// a block device the kernel turns the punch into a zero-out that
    /// guarantees zeros (unmapping where the device can, never a plain
    /// discard, which may leave old data readable); a device that cannot
    /// zero without writing gets the zeros written.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_or_zero(&self.file, offset, len)
    }
}

/// Deallocates `len` bytes of `file` at `offset` (they read as zeros);
/// writes zeros where hole punching is unsupported. Shared by the backing
/// file and the state file.
pub(crate) fn punch_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file.as_raw_fd(), flags, offset as i64, len as i64) {
        Ok(()) => Ok(()),
        // EINVAL: a block device's range not aligned to its logical
        // block size (a disk whose size is no multiple of it).
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_refuses_existing_and_open_checks_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let b = Backing::create(&p, 1 << 20).unwrap();
        b.write_at(&[7; 4096], 8192).unwrap();
        b.punch_hole(8192, 4096).unwrap();
        let mut buf = [1u8; 4096];
        b.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|x| *x == 0));
        assert!(matches!(
            Backing::create(&p, 1 << 20),
            Err(BackingError::Open { .. })
        ));
        drop(b);
        let e = Backing::open(&p, 2 << 20).unwrap_err();
        assert!(e.to_string().contains("exists with size 1048576"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[test]
    fn copy_to_sends_what_the_file_holds_now() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        Backing::create(&p, 1 << 20).unwrap();
        // Reopened: the mapping is made by `open` as well.
        let b = Backing::open(&p, 1 << 20).unwrap();
        b.write_at(&[7; 8192], 65536).unwrap();
        let out = tempfile::tempfile().unwrap();
        b.copy_to(65536 - 4096, 16384, out.as_fd(), 0)
            .expect("the file is mapped")
            .unwrap();
        let mut got = vec![1u8; 16384];
        out.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..4096].iter().all(|x| *x == 0), "hole before");
        assert!(got[4096..12288].iter().all(|x| *x == 7), "written data");
        assert!(got[12288..].iter().all(|x| *x == 0), "hole after");
        b.punch_hole(65536, 4096).unwrap();
        b.copy_to(65536, 4096, out.as_fd(), 0).unwrap().unwrap();
        out.read_exact_at(&mut got[..4096], 0).unwrap();
        assert!(got[..4096].iter().all(|x| *x == 0), "punched");
        assert!(b
            .copy_to((1 << 20) - 4096, 8192, out.as_fd(), 0)
            .unwrap()
            .is_err());
    }
}
