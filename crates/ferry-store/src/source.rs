//! The source side: a disk image or block device opened read-only, with
//! its first [`Manifest`] made without reading any data (holes via
//! SEEK_DATA/SEEK_HOLE are zero chunks, the rest unhashed unless the hash
//! cache knows them), hashes learned as chunks are sent and kept in a cache
//! beside the image (keyed by the file's identity and times, so a changed
//! image is noticed), the source id kept in a sidecar
//! (`<image>.ferry-source`), and the image watched for changes made behind
//! ferry's back (docs/decisions/lazy-source-manifest.md).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_core::{ChunkKind, Geometry, Manifest};
use nix::unistd::{lseek, Whence};

const CACHE_MAGIC: &[u8; 8] = b"FERRYMC2";
/// First line of a source id sidecar.
const ID_HEADER: &str = "ferry-source 1";

/// Errors of the source image.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The image could not be opened or read.
    #[error("cannot {op} source disk {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("source disk {0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// The image is empty.
    #[error("source disk {0} is empty")]
    Empty(PathBuf),
    /// Another process has the image open for writing: serving it would
    /// send data that changes under ferry.
    #[error(
        "source disk {path} is open for writing by {writers}: stop the VM (or \
         whatever writes it) before serving it; ferry serves a disk nobody writes"
    )]
    OpenForWriting {
        /// The image.
        path: PathBuf,
        /// The processes, as `pid (name)`.
        writers: String,
    },
}

/// What identifies the image file's content without reading it: the
/// file, its size and its modification and change times. Any write,
/// resize, replacement or metadata change alters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the file.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Status change time (seconds, nanoseconds).
    pub ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity `meta` gives, with `size` (a block device's size is
    /// not in its metadata).
    fn of(meta: &std::fs::Metadata, size: u64) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// A hash of the identity (what the hash cache is keyed by).
    fn key(&self) -> [u8; 32] {
        let mut k = blake3::Hasher::new();
        for v in [
            self.dev,
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ] {
            k.update(&v.to_le_bytes());
        }
        *k.finalize().as_bytes()
    }

    /// What differs from `earlier`, in words.
    fn changes_since(&self, earlier: &FileIdentity) -> String {
        let mut what = Vec::new();
        if (self.dev, self.ino) != (earlier.dev, earlier.ino) {
            what.push("it was replaced by another file".to_string());
        }
        if self.size != earlier.size {
            what.push(format!(
                "its size went from {} to {} bytes",
                earlier.size, self.size
            ));
        }
        let t = |(s, ns): (i64, i64)| format!("{s}.{ns:09}");
        if self.mtime != earlier.mtime {
            what.push(format!(
                "it was written (mtime {} -> {})",
                t(earlier.mtime),
                t(self.mtime)
            ));
        } else if self.ctime != earlier.ctime {
            what.push(format!(
                "its inode changed (ctime {} -> {})",
                t(earlier.ctime),
                t(self.ctime)
            ));
        }
        what.join(", ")
    }

    /// As stored in a source id sidecar.
    fn to_line(self) -> String {
        format!(
            "file dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }
}

/// The source's id (see [`Manifest::source_id`]) as kept in its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId {
    /// The id: random, made when the image was first served unchanged.
    pub id: [u8; 32],
    /// Bumped at each switchover of a live source (0 for now).
    pub generation: u64,
    /// Whether this run made it (first served, or the image changed).
    pub new: bool,
    /// Whether it is kept in the sidecar (else derived from the file's
    /// identity because the sidecar could not be written).
    pub kept: bool,
}

/// A source disk, open read-only.
#[derive(Debug)]
pub struct SourceImage {
    file: File,
    path: PathBuf,
    size: u64,
    /// The file's identity when opened, or after ferry's own last write
    /// to it (a presented image, [`SourceImage::write_presented`]).
    identity: Mutex<FileIdentity>,
    regular: bool,
    /// Opened for writing by [`SourceImage::open_for_presenting`].
    writable: bool,
    /// Set once the image was seen changed; never cleared.
    changed: Mutex<Option<String>>,
}

impl SourceImage {
    /// Opens `path` read-only (ferry never writes the source).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        Self::open_with(path, false)
    }

    /// Opens `path` for reading and writing, to present it to the running
    /// source VM (`ferry serve --present`): the VM's writes go through
    /// [`SourceImage::write_presented`], which keeps the change detection
    /// blind to them only.
    pub fn open_for_presenting(path: &Path) -> Result<Self, SourceError> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self, SourceError> {
        let err = |op| {
            move |source| SourceError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(err("open"))?;
        let meta = file.metadata().map_err(err("stat"))?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(SourceError::NotADisk(path.to_owned()));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(err("size"))?;
        if size == 0 {
            return Err(SourceError::Empty(path.to_owned()));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            identity: Mutex::new(FileIdentity::of(&meta, size)),
            regular: ft.is_file(),
            writable,
            changed: Mutex::new(None),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's identity when it was opened (or after ferry's own last
    /// write to a presented image).
    pub fn identity(&self) -> FileIdentity {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset` for the VM the image is presented to
    /// (opened with [`SourceImage::open_for_presenting`]), durably with
    /// `sync`. A change made behind ferry's back before it is noticed
    /// first (the write is refused then); after it the identity the
    /// change detection compares with is the file's now, so ferry's own
    /// writes are not taken for foreign ones. A foreign write landing
    /// while this one runs is not told apart from it.
    pub fn write_presented(&self, offset: u64, data: &[u8], sync: bool) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::other(format!(
                "source disk {} is not presented: it is open read-only",
                self.path.display()
            )));
        }
        if let Some(why) = self.check() {
            return Err(io::Error::other(why));
        }
        let mut identity = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        self.file.write_all_at(data, offset)?;
        if sync {
            self.file.sync_data()?;
        }
        let meta = self.file.metadata()?;
        let size = if self.regular { meta.len() } else { self.size };
        *identity = FileIdentity::of(&meta, size);
        Ok(())
    }

    /// Makes every write through [`SourceImage::write_presented`] durable.
    pub fn sync_presented(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Reads `buf.len()` bytes at `offset` (for the presented device).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn beside(&self, suffix: &str) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(suffix);
        PathBuf::from(s)
    }

    /// Where the hash cache lives by default: beside the image.
    pub fn default_cache_path(&self) -> PathBuf {
        self.beside(".ferry-manifest")
    }

    /// Where the source id is kept: beside the image.
    pub fn id_path(&self) -> PathBuf {
        self.beside(".ferry-source")
    }

    /// Reads chunk `index` of `geo` into `buf` (resized to the chunk).
    pub fn read_chunk(&self, geo: Geometry, index: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        self.read_chunks(geo, index, 1, buf)
    }

    /// Reads the `count` consecutive chunks from `first` into `buf` with
    /// one read (the last chunk of the disk may be short). The background
    /// copy reads up to 1 MiB at once this way, so a disk still sees large
    /// sequential requests with the kernel's readahead off
    /// ([`SourceImage::turn_readahead_off`]).
    pub fn read_chunks(
        &self,
        geo: Geometry,
        first: u64,
        count: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        if count == 0 {
            buf.clear();
            return Ok(());
        }
        let start = geo.chunk_bytes(first).start;
        let end = geo.chunk_bytes(first + count - 1).end;
        buf.resize((end - start) as usize, 0);
        self.file.read_exact_at(buf, start)
    }

    /// Turns the kernel's readahead off for this image
    /// (`POSIX_FADV_RANDOM`): ferry reads exactly the chunks it sends. A
    /// readahead guess goes to the disk ahead of a guest's on-demand read
    /// and delays it: with this machine's `read_ahead_kb` of 8192 one
    /// guess queued up to 8 MiB
    /// (docs/decisions/source-reads-what-it-sends.md).
    pub fn turn_readahead_off(&self) -> io::Result<()> {
        nix::fcntl::posix_fadvise(
            self.file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
        )
        .map_err(io::Error::from)
    }

    /// The source's id, from the sidecar at `sidecar` when it was made for
    /// this image as it is now (same [`FileIdentity`]); else a new random
    /// one, written there (owner-only). A sidecar that cannot be written
    /// is logged, and the id is then derived from the file's identity (the
    /// same for as long as the image is unchanged).
    pub fn source_id(&self, sidecar: &Path) -> SourceId {
        let line = self.identity().to_line();
        if let Ok(text) = std::fs::read_to_string(sidecar) {
            if let Some(id) = parse_sidecar(&text, &line) {
                return id;
            }
            tracing::info!(sidecar = %sidecar.display(), "the source disk changed since it was last served: new source id");
        }
        let mut id = [0u8; 32];
        let made = File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut id));
        let written = made.and_then(|()| write_sidecar(sidecar, &id, 0, &line));
        match written {
            Ok(()) => SourceId {
                id,
                generation: 0,
                new: true,
                kept: true,
            },
            Err(e) => {
                tracing::warn!(sidecar = %sidecar.display(), error = %e, "cannot keep the source id; using one derived from the image's identity");
                let mut k = blake3::Hasher::new();
                k.update(b"ferry source id from the file identity");
                k.update(&self.identity().key());
                SourceId {
                    id: *k.finalize().as_bytes(),
                    generation: 0,
                    new: true,
                    kept: false,
                }
            }
        }
    }

    fn cache_key(&self, chunk_size: u32) -> [u8; 32] {
        let mut key = blake3::Hasher::new();
        key.update(&self.identity().key());
        key.update(&chunk_size.to_le_bytes());
        *key.finalize().as_bytes()
    }

    /// The first manifest for chunks of `chunk_size`, with `source_id`,
    /// made without reading any data: the hashes the cache at `cache`
    /// holds when it was made for this image as it is now, else holes
    /// (SEEK_DATA/SEEK_HOLE) as zero chunks and every other chunk
    /// unhashed.
    pub fn first_manifest(
        &self,
        chunk_size: u32,
        cache: Option<&Path>,
        source_id: [u8; 32],
    ) -> Manifest {
        let key = self.cache_key(chunk_size);
        let geo = Geometry::new(self.size, chunk_size);
        if let Some(c) = cache {
            if let Ok(bytes) = std::fs::read(c) {
                if bytes.len() > 40 && &bytes[..8] == CACHE_MAGIC && bytes[8..40] == key {
                    if let Ok(m) = Manifest::decode(&bytes[40..]) {
                        if m.geometry() == geo {
                            tracing::info!(cache = %c.display(), unhashed = m.unhashed(), "chunk hashes loaded from the cache");
                            return Manifest::with_source_id(geo, m.chunks().to_vec(), source_id);
                        }
                    }
                }
                tracing::info!(cache = %c.display(), "hash cache is stale; starting without hashes");
            }
        }
        let kinds = self
            .hole_chunks(geo)
            .into_iter()
            .map(|hole| {
                if hole {
                    ChunkKind::Zero
                } else {
                    ChunkKind::Unhashed
                }
            })
            .collect();
        Manifest::with_source_id(geo, kinds, source_id)
    }

    /// Saves the hashes `manifest` knows in the cache at `cache` (atomic
    /// replace), keyed by the image's identity when it was opened; not if
    /// the image has changed since.
    pub fn save_hashes(&self, manifest: &Manifest, cache: &Path) -> io::Result<()> {
        if let Some(why) = self.check() {
            return Err(io::Error::other(format!("not saving hashes: {why}")));
        }
        let mut out = Vec::new();
        out.extend_from_slice(CACHE_MAGIC);
        out.extend_from_slice(&self.cache_key(manifest.geometry().chunk_size));
        out.extend_from_slice(&manifest.encode());
        let mut tmp = cache.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let r = std::fs::write(&tmp, &out).and_then(|()| std::fs::rename(&tmp, cache));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Why the image may no longer be served, or `None`: it was changed
    /// behind ferry's back if its identity (size, times, file) differs
    /// from when it was opened. Cheap (one `fstat`); once it says so, it
    /// always does.
    pub fn check(&self) -> Option<String> {
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = changed.as_ref() {
            return Some(why.clone());
        }
        let known = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        let what = match self.file.metadata() {
            Ok(meta) => {
                let size = if self.regular { meta.len() } else { self.size };
                let now = FileIdentity::of(&meta, size);
                (now != *known).then(|| now.changes_since(&known))
            }
            Err(e) => Some(format!("it cannot be examined: {e}")),
        }?;
        let why = format!(
            "source disk changed while it was served: {}: {what}; ferry refuses to serve \
             it further (a disk must not be written while ferry serves it)",
            self.path.display()
        );
        tracing::error!("{why}");
        *changed = Some(why.clone());
        Some(why)
    }

    /// Refuses an image that another process has open for writing (found
    /// through `/proc/*/fd`; processes this user may not inspect are not
    /// seen).
    pub fn refuse_if_open_for_writing(&self) -> Result<(), SourceError> {
        let id = self.identity();
        let writers = writers_of(id.dev, id.ino);
        if writers.is_empty() {
            return Ok(());
        }
        Err(SourceError::OpenForWriting {
            path: self.path.clone(),
            writers: writers.join(", "),
        })
    }

    /// Which chunks lie wholly inside holes (SEEK_DATA/SEEK_HOLE); all
    /// false where the filesystem or device cannot tell.
    fn hole_chunks(&self, geo: Geometry) -> Vec<bool> {
        let n = geo.chunks() as usize;
        let mut holes = vec![false; n];
        let mut pos: i64 = 0;
        let size = self.size as i64;
        while pos < size {
            let data = match lseek(self.file.as_raw_fd(), pos, Whence::SeekData) {
                Ok(d) => d,
                Err(nix::errno::Errno::ENXIO) => size,
                Err(_) => return vec![false; n],
            };
            // [pos, data) is a hole.
            let cs = i64::from(geo.chunk_size);
            let first = (pos + cs - 1) / cs;
            let last = data / cs; // exclusive: chunks wholly before `data`
            for c in first..last {
                holes[c as usize] = true;
            }
            if data >= size {
                // A trailing short chunk wholly in the hole.
                if pos <= (n as i64 - 1) * cs {
                    holes[n - 1] = true;
                }
                break;
            }
            pos = match lseek(self.file.as_raw_fd(), data, Whence::SeekHole) {
                Ok(h) => h,
                Err(_) => return vec![false; n],
            };
        }
        holes
    }
}

/// The id a sidecar holds, if it was made for the file identity `line`.
fn parse_sidecar(text: &str, line: &str) -> Option<SourceId> {
    let mut lines = text.lines();
    if lines.next()? != ID_HEADER {
        return None;
    }
    let hex = lines.next()?.strip_prefix("id ")?;
    let generation = lines.next()?.strip_prefix("generation ")?.parse().ok()?;
    if lines.next()? != line || lines.next().is_some() || hex.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(SourceId {
        id,
        generation,
        new: false,
        kept: true,
    })
}

/// Writes a sidecar (owner-only, atomic replace).
fn write_sidecar(path: &Path, id: &[u8; 32], generation: u64, line: &str) -> io::Result<()> {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!("{ID_HEADER}\nid {hex}\ngeneration {generation}\n{line}\n");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The processes (other than this one) with file `dev`/`ino` open for
/// writing, as `pid (name)`, from `/proc/*/fd` and `/proc/*/fdinfo`.
fn writers_of(dev: u64, ino: u64) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if meta.dev() != dev || meta.ino() != ino {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            let flags = std::fs::read_to_string(info)
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                })
                .unwrap_or(0);
            if flags & 3 != 0 {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.push(format!("{pid} ({})", comm.trim()));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_run_of_chunks_reads_as_the_chunks_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("src.img");
        let cs = 4096u32;
        // 5 chunks and a short sixth, each byte its offset's low bits.
        let data: Vec<u8> = (0..5 * cs as usize + 100)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let img = SourceImage::open(&p).unwrap();
        img.turn_readahead_off().unwrap();
        let geo = Geometry::new(data.len() as u64, cs);
        for (first, count) in [(0, 1), (1, 3), (2, 4), (5, 1), (0, 6)] {
            let mut run = Vec::new();
            img.read_chunks(geo, first, count, &mut run).unwrap();
            let mut one_by_one = Vec::new();
            for c in first..first + count {
                let mut b = Vec::new();
                img.read_chunk(geo, c, &mut b).unwrap();
                one_by_one.extend_from_slice(&b);
            }
            assert_eq!(run, one_by_one, "chunks {first}+{count}");
            let start = geo.chunk_bytes(first).start as usize;
            assert_eq!(
                run,
                data[start..start + run.len()],
                "chunks {first}+{count}"
            );
        }
    }

    /// A 10-chunk-and-a-bit image: chunk 1 data, chunk 3 written zeros,
    /// chunk 10 (short) data, the rest holes.
    fn sample(dir: &Path) -> (PathBuf, u64) {
        let p = dir.join("src.img");
        let cs = 65536u64;
        let mut f = File::create(&p).unwrap();
        f.set_len(10 * cs + 4096).unwrap();
        f.write_all_at(&[0xab; 100], cs + 5).unwrap();
        f.write_all_at(&vec![0; cs as usize], 3 * cs).unwrap();
        f.write_all_at(&[1; 10], 10 * cs + 7).unwrap();
        f.flush().unwrap();
        (p, cs)
    }

    fn touch(p: &Path, at: u64) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .write_all_at(&[2; 10], at)
            .unwrap();
    }

    #[test]
    fn the_first_manifest_reads_nothing_and_the_cache_keeps_learned_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let (p, cs) = sample(dir.path());
        let img = SourceImage::open(&p).unwrap();
        let cache = img.default_cache_path();
        let m = img.first_manifest(cs as u32, Some(&cache), [4; 32]);
        assert_eq!(m.source_id(), [4; 32]);
        let kinds: Vec<ChunkKind> = m.chunks().to_vec();
        let allocated: Vec<u64> = (0..m.geometry().chunks())
            .filter(|c| kinds[*c as usize] == ChunkKind::Unhashed)
            .collect();
        // Holes are zero; the written chunks (zeros too) are unhashed.
        assert_eq!(allocated, vec![1, 3, 10]);
        assert!(kinds
            .iter()
            .all(|k| matches!(k, ChunkKind::Zero | ChunkKind::Unhashed)));
        assert!(!cache.exists(), "nothing to cache yet");
        // Hashes learned as chunks are sent are saved and found again.
        let mut learned = m.clone();
        let mut buf = Vec::new();
        img.read_chunk(m.geometry(), 10, &mut buf).unwrap();
        assert_eq!(buf.len(), 4096);
        learned.set_chunk(10, ChunkKind::of(&buf));
        learned.set_chunk(3, ChunkKind::Zero);
        img.save_hashes(&learned, &cache).unwrap();
        let again = SourceImage::open(&p).unwrap();
        let m2 = again.first_manifest(cs as u32, Some(&cache), [5; 32]);
        assert_eq!(m2.chunks(), learned.chunks());
        assert_eq!(
            m2.chunk(10),
            ChunkKind::Data(*blake3::hash(&buf).as_bytes())
        );
        assert_eq!(m2.source_id(), [5; 32]);
        // A changed image starts without them, and is not saved over.
        touch(&p, 5 * cs);
        assert!(img.save_hashes(&learned, &cache).is_err());
        let changed = SourceImage::open(&p).unwrap();
        let m3 = changed.first_manifest(cs as u32, Some(&cache), [5; 32]);
        assert_eq!(m3.chunk(10), ChunkKind::Unhashed);
        assert_eq!(m3.chunk(5), ChunkKind::Unhashed);
    }

    #[test]
    fn the_source_id_is_kept_while_the_image_is_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (p, cs) = sample(dir.path());
        let img = SourceImage::open(&p).unwrap();
        let side = img.id_path();
        assert_eq!(side, dir.path().join("src.img.ferry-source"));
        let first = img.source_id(&side);
        assert!(first.new && first.kept);
        assert_eq!(first.generation, 0);
        let mode = std::fs::metadata(&side).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only");
        // Served again: the same id.
        let again = SourceImage::open(&p).unwrap().source_id(&side);
        assert_eq!(again.id, first.id);
        assert!(!again.new);
        // Another image gets another id.
        let other = dir.path().join("other.img");
        std::fs::copy(&p, &other).unwrap();
        let o = SourceImage::open(&other).unwrap();
        assert_ne!(o.source_id(&o.id_path()).id, first.id);
        // The image changed: a new id.
        touch(&p, 5 * cs);
        let changed = SourceImage::open(&p).unwrap().source_id(&side);
        assert!(changed.new);
        assert_ne!(changed.id, first.id);
        // A damaged sidecar: a new id, not an error.
        std::fs::write(&side, "ferry-source 1\nid zz\n").unwrap();
        let fresh = SourceImage::open(&p).unwrap().source_id(&side);
        assert!(fresh.new && fresh.kept);
        assert_ne!(fresh.id, changed.id);
        // A sidecar that cannot be written: an id derived from the
        // image's identity, the same while the image is unchanged.
        let nowhere = dir.path().join("no-such-dir").join("x.ferry-source");
        let img = SourceImage::open(&p).unwrap();
        let d1 = img.source_id(&nowhere);
        let d2 = SourceImage::open(&p).unwrap().source_id(&nowhere);
        assert!(!d1.kept);
        assert_eq!(d1.id, d2.id);
    }

    #[test]
    fn a_write_behind_ferrys_back_is_noticed_and_stays_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let (p, cs) = sample(dir.path());
        let img = SourceImage::open(&p).unwrap();
        assert_eq!(img.check(), None);
        touch(&p, 7 * cs);
        let why = img.check().expect("changed");
        assert!(why.contains("source disk changed"), "{why}");
        assert!(why.contains("src.img"), "{why}");
        assert!(why.contains("mtime"), "{why}");
        assert_eq!(img.check(), Some(why));
    }

    #[test]
    fn an_image_open_for_writing_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = sample(dir.path());
        let img = SourceImage::open(&p).unwrap();
        img.refuse_if_open_for_writing().unwrap();
        // Our own handles do not count; another process's do.
        let _mine = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        img.refuse_if_open_for_writing().unwrap();
        let out = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdout(out)
            .spawn()
            .unwrap();
        let e = img.refuse_if_open_for_writing();
        let _ = child.kill();
        let _ = child.wait();
        let e = e.unwrap_err().to_string();
        assert!(e.contains("is open for writing by"), "{e}");
        assert!(e.contains(&format!("{} (sleep)", child.id())), "{e}");
        img.refuse_if_open_for_writing().unwrap();
    }

    #[test]
    fn missing_and_bad_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = SourceImage::open(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("cannot open source disk"), "{e}");
        let e = SourceImage::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        assert!(matches!(
            SourceImage::open(&empty),
            Err(SourceError::Empty(_))
        ));
    }

    #[test]
    fn a_presented_image_accepts_its_own_writes_and_still_notices_foreign_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (p, cs) = sample(dir.path());
        // Not presented: ferry does not write.
        let ro = SourceImage::open(&p).unwrap();
        assert!(ro.write_presented(0, &[1; 10], false).is_err());
        let img = SourceImage::open_for_presenting(&p).unwrap();
        for i in 0..3u8 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            img.write_presented(2 * cs + u64::from(i), &[i + 1; 100], i == 2)
                .unwrap();
            assert_eq!(img.check(), None, "own write {i}");
        }
        let mut back = [0u8; 3];
        img.read_at(2 * cs, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
        // A write behind ferry's back is noticed, and refuses the next own one.
        touch(&p, 7 * cs);
        assert!(img.check().is_some());
        assert!(img.write_presented(0, &[1; 10], false).is_err());
    }
}
