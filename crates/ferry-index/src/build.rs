//! Building and updating an index: hash the files' chunks, sort the
//! records in bounded runs (spilled to temporary files beside the index),
//! merge them with the kept records of the old index, and write the new
//! index atomically (a temporary file, fsynced, renamed over the old one,
//! the directory fsynced). Index files are created mode 0600.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_core::ChunkKind;

use crate::format::{self, FileEntry, FileIdentity, Header, Record, HEADER_LEN, RECORD_LEN};
use crate::{Index, IndexError, CHUNK_SIZE};

/// Records sorted in memory before a run is spilled to disk (48 bytes
/// each: 24 MiB).
const RUN_RECORDS: usize = 1 << 19;

/// What a build or an update did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Files hashed (new or changed).
    pub files_hashed: u64,
    /// Files kept without reading them (unchanged since the last run).
    pub files_unchanged: u64,
    /// Files dropped (gone, or no longer readable).
    pub files_gone: u64,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    /// Records in the index written.
    pub records: u64,
    /// Whether the index file was rewritten (an update of unchanged files
    /// leaves it alone).
    pub rewritten: bool,
    /// Time taken.
    pub elapsed: Duration,
}

/// The identity of the file at `path` as it is now.
pub fn identity_of(path: &Path) -> io::Result<FileIdentity> {
    let m = std::fs::metadata(path)?;
    let block_device = m.file_type().is_block_device();
    let size = if block_device {
        File::open(path)?.seek(SeekFrom::End(0))?
    } else {
        m.len()
    };
    Ok(FileIdentity {
        dev: m.dev(),
        ino: m.ino(),
        size,
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec() as u32,
        block_device,
    })
}

/// Builds an index of `paths` (image files or block devices) at `out`,
/// replacing any index there.
pub fn build(out: &Path, paths: &[PathBuf]) -> Result<BuildReport, IndexError> {
    build_with(out, paths, RUN_RECORDS)
}

/// [`build`] with runs of `run` records.
pub(crate) fn build_with(
    out: &Path,
    paths: &[PathBuf],
    run: usize,
) -> Result<BuildReport, IndexError> {
    let t0 = Instant::now();
    let mut report = BuildReport::default();
    let mut sorter = Sorter::new(out, run);
    let mut files = Vec::new();
    for p in paths {
        let source = |source| IndexError::Source {
            path: p.clone(),
            source,
        };
        let path = std::fs::canonicalize(p).map_err(source)?;
        if files.iter().any(|f: &FileEntry| f.path == path) {
            continue;
        }
        let id = files.len() as u32;
        let identity = hash_file(&path, id, &mut sorter, &mut report)?;
        files.push(FileEntry { path, identity });
    }
    report.records = write_index(out, &files, sorter, None)?;
    report.rewritten = true;
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// Updates the index at `index`: files whose identity is unchanged keep
/// their records unread; changed ones are hashed again; files gone are
/// dropped. Nothing is written when nothing changed.
pub fn update(index: &Path) -> Result<BuildReport, IndexError> {
    update_with(index, RUN_RECORDS)
}

/// [`update`] with runs of `run` records.
pub(crate) fn update_with(index: &Path, run: usize) -> Result<BuildReport, IndexError> {
    let t0 = Instant::now();
    let old = Index::open(index)?;
    let mut report = BuildReport::default();
    // Old file number -> new number, for files whose records are kept.
    let mut keep: Vec<Option<u32>> = vec![None; old.files().len()];
    let mut files = Vec::new();
    let mut changed = Vec::new();
    for (i, f) in old.files().iter().enumerate() {
        match identity_of(&f.path) {
            Ok(now) if now == f.identity && !now.block_device => {
                keep[i] = Some(files.len() as u32);
                files.push(f.clone());
                report.files_unchanged += 1;
            }
            Ok(_) => {
                changed.push(files.len());
                files.push(f.clone());
            }
            Err(_) => report.files_gone += 1,
        }
    }
    if changed.is_empty() && report.files_gone == 0 {
        report.records = old.records();
        report.elapsed = t0.elapsed();
        return Ok(report);
    }
    let mut sorter = Sorter::new(index, run);
    for n in changed {
        let path = files[n].path.clone();
        // A file gone between the stat and the read fails the update (run
        // it again): its number is already taken.
        files[n].identity = hash_file(&path, n as u32, &mut sorter, &mut report)?;
    }
    let old_records = OldRecords {
        reader: old.record_reader().map_err(|source| IndexError::Read {
            path: index.to_owned(),
            source,
        })?,
        left: old.records(),
        keep,
    };
    report.records = write_index(index, &files, sorter, Some(old_records))?;
    report.rewritten = true;
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// Hashes every chunk of `path` into `sorter` as file `id` (zero chunks
/// skipped); returns the identity it had before it was read (a change
/// during the read shows at the next update).
fn hash_file(
    path: &Path,
    id: u32,
    sorter: &mut Sorter,
    report: &mut BuildReport,
) -> Result<FileIdentity, IndexError> {
    let source = |source| IndexError::Source {
        path: path.to_owned(),
        source,
    };
    let identity = identity_of(path).map_err(source)?;
    let mut f = File::open(path).map_err(source)?;
    let cs = CHUNK_SIZE as usize;
    let mut buf = vec![0u8; 16 * cs];
    let mut chunk = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(source)?;
        if n == 0 {
            break;
        }
        report.bytes_hashed += n as u64;
        for piece in buf[..n].chunks(cs) {
            if let ChunkKind::Data(hash) = ChunkKind::of(piece) {
                sorter
                    .push(Record {
                        hash,
                        file: id,
                        chunk,
                    })
                    .map_err(|e| sorter.write_err(e))?;
            }
            chunk += 1;
        }
        if n < buf.len() {
            break;
        }
    }
    report.files_hashed += 1;
    Ok(identity)
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sorts records in runs of at most [`RUN_RECORDS`], spilled to anonymous
/// temporary files in the index's directory.
struct Sorter {
    out: PathBuf,
    buf: Vec<Record>,
    runs: Vec<(File, u64)>,
    /// Records per run.
    run: usize,
}

impl Sorter {
    fn new(out: &Path, run: usize) -> Self {
        Sorter {
            out: out.to_owned(),
            buf: Vec::new(),
            runs: Vec::new(),
            run,
        }
    }

    fn write_err(&self, source: io::Error) -> IndexError {
        IndexError::Write {
            path: self.out.clone(),
            source,
        }
    }

    fn dir(&self) -> PathBuf {
        match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    fn push(&mut self, r: Record) -> io::Result<()> {
        self.buf.push(r);
        if self.buf.len() >= self.run {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        self.buf.sort_unstable();
        self.buf
            .dedup_by(|a, b| a.hash == b.hash && a.file == b.file);
        let mut f = tempfile::tempfile_in(self.dir())?;
        {
            let mut w = BufWriter::new(&mut f);
            let mut b = [0u8; RECORD_LEN];
            for r in &self.buf {
                r.encode(&mut b);
                w.write_all(&b)?;
            }
            w.flush()?;
        }
        f.seek(SeekFrom::Start(0))?;
        self.runs.push((f, self.buf.len() as u64));
        self.buf.clear();
        Ok(())
    }

    /// The sorted runs: the spilled ones and what is left in memory.
    fn finish(mut self) -> io::Result<Vec<Stream>> {
        self.buf.sort_unstable();
        self.buf
            .dedup_by(|a, b| a.hash == b.hash && a.file == b.file);
        let mut streams: Vec<Stream> = self
            .runs
            .into_iter()
            .map(|(f, left)| Stream::Run {
                reader: BufReader::with_capacity(256 << 10, f),
                left,
            })
            .collect();
        streams.push(Stream::Memory(std::mem::take(&mut self.buf).into_iter()));
        Ok(streams)
    }
}

/// The kept records of the index being updated, renumbered.
struct OldRecords {
    reader: crate::RecordReader,
    left: u64,
    /// Old file number -> new one; `None`: the file's records are dropped.
    keep: Vec<Option<u32>>,
}

/// A sorted source of records for the merge.
enum Stream {
    Run { reader: BufReader<File>, left: u64 },
    Memory(std::vec::IntoIter<Record>),
    Old(OldRecords),
}

impl Stream {
    fn next(&mut self) -> io::Result<Option<Record>> {
        match self {
            Stream::Run { reader, left } => {
                if *left == 0 {
                    return Ok(None);
                }
                *left -= 1;
                let mut b = [0u8; RECORD_LEN];
                reader.read_exact(&mut b)?;
                Ok(Some(Record::decode(&b)))
            }
            Stream::Memory(it) => Ok(it.next()),
            Stream::Old(o) => loop {
                if o.left == 0 {
                    return Ok(None);
                }
                o.left -= 1;
                let mut r = o.reader.next_record()?;
                let new = o.keep.get(r.file as usize).copied().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "record names no file")
                })?;
                if let Some(n) = new {
                    r.file = n;
                    return Ok(Some(r));
                }
            },
        }
    }
}

/// Writes the index of `files` at `out` atomically: the sorter's records
/// merged with `old`'s kept ones, one per (hash, file). Returns the number
/// of records.
fn write_index(
    out: &Path,
    files: &[FileEntry],
    sorter: Sorter,
    old: Option<OldRecords>,
) -> Result<u64, IndexError> {
    let write_err = |source| IndexError::Write {
        path: out.to_owned(),
        source,
    };
    let dir = sorter.dir();
    let mut streams = sorter.finish().map_err(write_err)?;
    if let Some(o) = old {
        streams.push(Stream::Old(o));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".ferry-index.")
        .tempfile_in(&dir)
        .map_err(write_err)?;
    let table = format::encode_files(files);
    let records_offset = (HEADER_LEN + table.len()) as u64;
    let mut count = 0u64;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&[0u8; HEADER_LEN]).map_err(write_err)?;
        w.write_all(&table).map_err(write_err)?;
        let mut heap = BinaryHeap::new();
        for (i, s) in streams.iter_mut().enumerate() {
            if let Some(r) = s.next().map_err(write_err)? {
                heap.push(Reverse((r, i)));
            }
        }
        let mut last: Option<([u8; 32], u32)> = None;
        let mut b = [0u8; RECORD_LEN];
        while let Some(Reverse((r, i))) = heap.pop() {
            if let Some(n) = streams[i].next().map_err(write_err)? {
                heap.push(Reverse((n, i)));
            }
            if last == Some((r.hash, r.file)) {
                continue;
            }
            last = Some((r.hash, r.file));
            r.encode(&mut b);
            w.write_all(&b).map_err(write_err)?;
            count += 1;
        }
        w.flush().map_err(write_err)?;
    }
    let header = Header {
        chunk_size: CHUNK_SIZE,
        file_count: files.len() as u64,
        record_count: count,
        files_offset: HEADER_LEN as u64,
        records_offset,
        files_sum: format::files_sum(&table),
    };
    use std::os::unix::fs::FileExt;
    tmp.as_file()
        .write_all_at(&header.encode(), 0)
        .map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(count)
}
