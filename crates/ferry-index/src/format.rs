//! The index file's layout: a header, the table of indexed files, then
//! fixed-size records sorted by hash (binary-searched with `pread`,
//! streamed for bulk matches).
//!
//! All integers little-endian:
//! - header (64 bytes): magic `FERRYIX1`, chunk size (u32), reserved (u32),
//!   file count (u64), record count (u64), offset of the file table (u64),
//!   offset of the records (u64), the first 16 bytes of the BLAKE3 of the
//!   file table;
//! - file table: per file its identity (dev, ino, size, mtime and ctime
//!   seconds and nanoseconds, whether it is a block device) and its path;
//! - records (48 bytes each), sorted by (hash, file, chunk), one per
//!   distinct (hash, file): hash (32 bytes), file number (u32), reserved
//!   (u32), chunk number in that file (u64).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Magic at the start of every index file.
pub(crate) const MAGIC: &[u8; 8] = b"FERRYIX1";
/// Bytes of the header.
pub(crate) const HEADER_LEN: usize = 64;
/// Bytes of a record.
pub(crate) const RECORD_LEN: usize = 48;

/// What identifies a file's content without reading it: if all of these
/// are unchanged, `ferry index update` does not hash it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the filesystem holding it.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Status change time, seconds.
    pub ctime: i64,
    /// Status change time, nanoseconds.
    pub ctime_nsec: u32,
    /// A block device: its times do not change when it is written, so it
    /// is hashed again at every update.
    pub block_device: bool,
}

/// An indexed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Its absolute path.
    pub path: PathBuf,
    /// Its identity when it was hashed.
    pub identity: FileIdentity,
}

/// One record: a chunk of a file with its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Record {
    pub(crate) hash: [u8; 32],
    pub(crate) file: u32,
    pub(crate) chunk: u64,
}

impl Record {
    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.hash);
        out[32..36].copy_from_slice(&self.file.to_le_bytes());
        out[36..40].copy_from_slice(&[0; 4]);
        out[40..48].copy_from_slice(&self.chunk.to_le_bytes());
    }

    pub(crate) fn decode(b: &[u8]) -> Self {
        Record {
            hash: b[..32].try_into().expect("32 bytes"),
            file: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
            chunk: u64::from_le_bytes(b[40..48].try_into().expect("8 bytes")),
        }
    }
}

/// The header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) chunk_size: u32,
    pub(crate) file_count: u64,
    pub(crate) record_count: u64,
    pub(crate) files_offset: u64,
    pub(crate) records_offset: u64,
    pub(crate) files_sum: [u8; 16],
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.record_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.files_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.records_offset.to_le_bytes());
        b[48..64].copy_from_slice(&self.files_sum);
        b
    }

    /// `Err` says what is wrong.
    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than a header", b.len()));
        }
        if &b[..8] != MAGIC {
            return Err("no FERRYIX1 magic".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            chunk_size: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            file_count: u64_at(16),
            record_count: u64_at(24),
            files_offset: u64_at(32),
            records_offset: u64_at(40),
            files_sum: b[48..64].try_into().expect("16 bytes"),
        })
    }
}

/// The file table's bytes.
pub(crate) fn encode_files(files: &[FileEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        let i = &f.identity;
        out.extend_from_slice(&i.dev.to_le_bytes());
        out.extend_from_slice(&i.ino.to_le_bytes());
        out.extend_from_slice(&i.size.to_le_bytes());
        out.extend_from_slice(&i.mtime.to_le_bytes());
        out.extend_from_slice(&i.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&i.ctime.to_le_bytes());
        out.extend_from_slice(&i.ctime_nsec.to_le_bytes());
        out.push(u8::from(i.block_device));
        let p = f.path.as_os_str().as_bytes();
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Decodes `count` file entries; `Err` says what is wrong.
pub(crate) fn decode_files(b: &[u8], count: u64) -> Result<Vec<FileEntry>, String> {
    let mut files = Vec::new();
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = b
            .get(at..at + n)
            .ok_or_else(|| format!("file table truncated at byte {at}"))?;
        at += n;
        Ok(s)
    };
    for _ in 0..count {
        let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let u32_ = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
        let dev = u64_(take(8)?);
        let ino = u64_(take(8)?);
        let size = u64_(take(8)?);
        let mtime = u64_(take(8)?) as i64;
        let mtime_nsec = u32_(take(4)?);
        let ctime = u64_(take(8)?) as i64;
        let ctime_nsec = u32_(take(4)?);
        let block_device = match take(1)?[0] {
            0 => false,
            1 => true,
            x => return Err(format!("bad file kind {x}")),
        };
        let len = u32_(take(4)?) as usize;
        let path = PathBuf::from(OsStr::from_bytes(take(len)?));
        files.push(FileEntry {
            path,
            identity: FileIdentity {
                dev,
                ino,
                size,
                mtime,
                mtime_nsec,
                ctime,
                ctime_nsec,
                block_device,
            },
        });
    }
    if at != b.len() {
        return Err(format!("{} bytes after the file table", b.len() - at));
    }
    Ok(files)
}

/// The checksum of a file table kept in the header.
pub(crate) fn files_sum(table: &[u8]) -> [u8; 16] {
    blake3::hash(table).as_bytes()[..16]
        .try_into()
        .expect("16 bytes")
}
