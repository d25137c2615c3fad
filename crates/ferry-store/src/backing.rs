//! The destination's backing file: a sparse file the size of the source.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

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
}

impl Backing {
    /// Creates a new sparse file of `size` bytes; fails if it exists.
    pub fn create(path: &Path, size: u64) -> Result<Self, BackingError> {
        let err = |source| BackingError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        file.set_len(size).map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// Opens an existing file, which must be `size` bytes long (a regular
    /// file) or at least that long (a block device is not resized).
    pub fn open(path: &Path, size: u64) -> Result<Self, BackingError> {
        let err = |source| BackingError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let found = file.metadata().map_err(err)?.len();
        if found != size {
            return Err(BackingError::SizeMismatch {
                path: path.to_owned(),
                found,
                expected: size,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
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
    /// Falls back to writing zeros where hole punching is unsupported.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    self.write_at(&zeros[..n as usize], offset + done)?;
                    done += n;
                }
                Ok(())
            }
            Err(e) => Err(io::Error::from(e)),
        }
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
        let e = Backing::open(&p, 2 << 20).unwrap_err();
        assert!(e.to_string().contains("exists with size 1048576"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }
}
