//! A persistent content index of local images and block devices: the
//! BLAKE3 hash of every 64 KiB chunk (the same chunks and hash as the
//! source's manifest, [`ferry_core::ChunkKind::of`]) → the file and offset
//! holding it, so `ferry pull --index` can fill chunks from data the
//! destination already has instead of fetching them over the WAN.
//!
//! The index is one file ([`format`]): fixed-size records sorted by hash,
//! binary-searched through `pread` ([`Index::lookup`]) or streamed once
//! against a sorted list of wanted hashes ([`Index::matches`]); nothing
//! holds the whole index in memory, and building or updating one sorts in
//! bounded runs spilled to temporary files ([`build`]). Zero chunks are
//! never indexed (they never cross the wire anyway). Each indexed file's
//! identity (dev, ino, size, mtime, ctime) is kept, so [`update`] hashes
//! only files that changed. An index says where a chunk *was*: whoever
//! uses it must hash what it reads again (a file may have changed since).
//! Why it is built this way: docs/decisions/dedup-index.md.
#![forbid(unsafe_code)]

mod build;
mod format;

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use build::{build, identity_of, update, BuildReport};
pub use format::{FileEntry, FileIdentity};
use format::{Header, Record, HEADER_LEN, RECORD_LEN};

/// The chunk size of every index: the source's.
pub const CHUNK_SIZE: u32 = ferry_core::geometry::DEFAULT_CHUNK_SIZE;

/// Errors of index operations, each naming the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index file could not be opened or read.
    #[error("cannot read index {path}")]
    Read {
        /// The index.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not an index, or is damaged.
    #[error("{path} is not a ferry index or is damaged: {why}")]
    Corrupt {
        /// The index.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The index was made for another chunk size.
    #[error("index {path} has chunks of {found} bytes; ferry uses {CHUNK_SIZE}")]
    ChunkSize {
        /// The index.
        path: PathBuf,
        /// Its chunk size.
        found: u32,
    },
    /// A file to index could not be opened or read.
    #[error("cannot read {path} to index it")]
    Source {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The index (or a temporary file beside it) could not be written.
    #[error("cannot write index {path}")]
    Write {
        /// The index.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a chunk's content was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The file's number in [`Index::files`].
    pub file: u32,
    /// The chunk's byte offset in that file.
    pub offset: u64,
}

/// Figures of an index (`ferry index stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Files indexed.
    pub files: u64,
    /// Bytes in those files.
    pub file_bytes: u64,
    /// Records: distinct (hash, file) pairs.
    pub records: u64,
    /// Distinct hashes.
    pub distinct_hashes: u64,
    /// Size of the index file.
    pub index_bytes: u64,
}

/// An open index (read-only).
#[derive(Debug)]
pub struct Index {
    path: PathBuf,
    file: File,
    header: Header,
    files: Vec<FileEntry>,
}

impl Index {
    /// Opens and checks the index at `path` (its header and file table;
    /// records are read when asked for).
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let read_err = |source| IndexError::Read {
            path: path.to_owned(),
            source,
        };
        let corrupt = |why: String| IndexError::Corrupt {
            path: path.to_owned(),
            why,
        };
        let file = File::open(path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        let mut hb = [0u8; HEADER_LEN];
        if len < HEADER_LEN as u64 {
            return Err(corrupt(format!("{len} bytes, shorter than a header")));
        }
        file.read_exact_at(&mut hb, 0).map_err(read_err)?;
        let header = Header::decode(&hb).map_err(corrupt)?;
        if header.chunk_size != CHUNK_SIZE {
            return Err(IndexError::ChunkSize {
                path: path.to_owned(),
                found: header.chunk_size,
            });
        }
        let records_len = header
            .record_count
            .checked_mul(RECORD_LEN as u64)
            .ok_or_else(|| corrupt("record count overflows".into()))?;
        if header.files_offset != HEADER_LEN as u64
            || header.records_offset < header.files_offset
            || header.records_offset.checked_add(records_len) != Some(len)
        {
            return Err(corrupt(format!(
                "sections do not add up to the file's {len} bytes"
            )));
        }
        let mut table = vec![0u8; (header.records_offset - header.files_offset) as usize];
        file.read_exact_at(&mut table, header.files_offset)
            .map_err(read_err)?;
        if format::files_sum(&table) != header.files_sum {
            return Err(corrupt("file table checksum mismatch".into()));
        }
        let files = format::decode_files(&table, header.file_count).map_err(corrupt)?;
        Ok(Index {
            path: path.to_owned(),
            file,
            header,
            files,
        })
    }

    /// The index file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The indexed files, by number.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// Number of records.
    pub fn records(&self) -> u64 {
        self.header.record_count
    }

    fn read_err(&self, source: io::Error) -> IndexError {
        IndexError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn record(&self, i: u64) -> Result<Record, IndexError> {
        let mut b = [0u8; RECORD_LEN];
        self.file
            .read_exact_at(&mut b, self.header.records_offset + i * RECORD_LEN as u64)
            .map_err(|e| self.read_err(e))?;
        let r = Record::decode(&b);
        if u64::from(r.file) >= self.header.file_count {
            return Err(IndexError::Corrupt {
                path: self.path.clone(),
                why: format!("record {i} names file {}", r.file),
            });
        }
        Ok(r)
    }

    /// Where a chunk of hash `hash` was found, if anywhere: a binary
    /// search of the records, one `pread` a step.
    pub fn lookup(&self, hash: &[u8; 32]) -> Result<Option<Location>, IndexError> {
        let (mut lo, mut hi) = (0u64, self.header.record_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.record(mid)?.hash < *hash {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == self.header.record_count {
            return Ok(None);
        }
        let r = self.record(lo)?;
        Ok((r.hash == *hash).then_some(self.location(&r)))
    }

    fn location(&self, r: &Record) -> Location {
        Location {
            file: r.file,
            offset: r.chunk * u64::from(CHUNK_SIZE),
        }
    }

    /// For each wanted `(hash, key)` — sorted by hash — whose hash is in
    /// the index, `(key, where)`: one sequential pass over the records,
    /// so matching a whole manifest costs one read of the index.
    pub fn matches(&self, wanted: &[([u8; 32], u64)]) -> Result<Vec<(u64, Location)>, IndexError> {
        debug_assert!(wanted.windows(2).all(|w| w[0].0 <= w[1].0));
        let mut out = Vec::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        let mut reader = self.record_reader().map_err(|e| self.read_err(e))?;
        let mut w = 0usize;
        for i in 0..self.header.record_count {
            let r = reader.next_record().map_err(|e| self.read_err(e))?;
            if u64::from(r.file) >= self.header.file_count {
                return Err(IndexError::Corrupt {
                    path: self.path.clone(),
                    why: format!("record {i} names file {}", r.file),
                });
            }
            while w < wanted.len() && wanted[w].0 < r.hash {
                w += 1;
            }
            if w == wanted.len() {
                break;
            }
            // The first record of a hash answers every wanted chunk of it.
            let mut k = w;
            while k < wanted.len() && wanted[k].0 == r.hash {
                out.push((wanted[k].1, self.location(&r)));
                k += 1;
            }
            w = k;
        }
        Ok(out)
    }

    /// A sequential reader of the records.
    pub(crate) fn record_reader(&self) -> io::Result<RecordReader> {
        let mut f = self.file.try_clone()?;
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(self.header.records_offset))?;
        Ok(RecordReader {
            inner: BufReader::with_capacity(1 << 20, f),
        })
    }

    /// The index's figures (reads every record once).
    pub fn stats(&self) -> Result<Stats, IndexError> {
        let mut reader = self.record_reader().map_err(|e| self.read_err(e))?;
        let mut distinct = 0u64;
        let mut last: Option<[u8; 32]> = None;
        for _ in 0..self.header.record_count {
            let r = reader.next_record().map_err(|e| self.read_err(e))?;
            if last != Some(r.hash) {
                distinct += 1;
                last = Some(r.hash);
            }
        }
        Ok(Stats {
            files: self.files.len() as u64,
            file_bytes: self.files.iter().map(|f| f.identity.size).sum(),
            records: self.header.record_count,
            distinct_hashes: distinct,
            index_bytes: self.header.records_offset + self.header.record_count * RECORD_LEN as u64,
        })
    }
}

/// Reads records one after another.
pub(crate) struct RecordReader {
    inner: BufReader<File>,
}

impl RecordReader {
    pub(crate) fn next_record(&mut self) -> io::Result<Record> {
        let mut b = [0u8; RECORD_LEN];
        self.inner.read_exact(&mut b)?;
        Ok(Record::decode(&b))
    }
}

#[cfg(test)]
mod tests;
