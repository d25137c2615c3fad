//! The source side: a disk image or block device opened read-only, scanned
//! into a [`Manifest`] (holes via SEEK_DATA/SEEK_HOLE, zero chunks by
//! inspection, BLAKE3 per data chunk), with the manifest cached beside the
//! image and keyed by the file's identity and times so a changed image is
//! noticed and rescanned.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_core::{ChunkKind, Geometry, Manifest};
use nix::unistd::{lseek, Whence};

const CACHE_MAGIC: &[u8; 8] = b"FERRYMC1";

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
}

/// A source disk, open read-only.
#[derive(Debug)]
pub struct SourceImage {
    file: File,
    path: PathBuf,
    size: u64,
    key: [u8; 32],
}

impl SourceImage {
    /// Opens `path` read-only (ferry never writes the source).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let err = |op| {
            move |source| SourceError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let mut file = File::open(path).map_err(err("open"))?;
        let meta = file.metadata().map_err(err("stat"))?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(SourceError::NotADisk(path.to_owned()));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(err("size"))?;
        if size == 0 {
            return Err(SourceError::Empty(path.to_owned()));
        }
        let mut k = blake3::Hasher::new();
        for v in [
            meta.dev(),
            meta.ino(),
            size,
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ] {
            k.update(&v.to_le_bytes());
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            key: *k.finalize().as_bytes(),
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

    /// Where the manifest cache lives by default: beside the image.
    pub fn default_cache_path(&self) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(".ferry-manifest");
        PathBuf::from(s)
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
    /// (`POSIX_FADV_RANDOM`), once its manifest is known: from then on
    /// ferry reads exactly the chunks it sends. A readahead guess goes to
    /// the disk ahead of a guest's on-demand read and delays it: with this
    /// machine's `read_ahead_kb` of 8192 one guess queued up to 8 MiB
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

    /// The manifest for chunks of `chunk_size`: from the cache at
    /// `cache` when it matches this image, else by scanning (and then
    /// written to the cache; a cache that cannot be written is only
    /// logged). `progress` is called with bytes scanned so far.
    pub fn manifest(
        &self,
        chunk_size: u32,
        cache: Option<&Path>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Manifest, SourceError> {
        let mut key = blake3::Hasher::new();
        key.update(&self.key);
        key.update(&chunk_size.to_le_bytes());
        let key = *key.finalize().as_bytes();
        if let Some(c) = cache {
            if let Ok(bytes) = std::fs::read(c) {
                if bytes.len() > 40 && &bytes[..8] == CACHE_MAGIC && bytes[8..40] == key {
                    if let Ok(m) = Manifest::decode(&bytes[40..]) {
                        tracing::info!(cache = %c.display(), "manifest loaded from cache");
                        return Ok(m);
                    }
                }
                tracing::info!(cache = %c.display(), "manifest cache is stale; rescanning");
            }
        }
        let m = self.scan(chunk_size, progress)?;
        if let Some(c) = cache {
            let mut out = Vec::new();
            out.extend_from_slice(CACHE_MAGIC);
            out.extend_from_slice(&key);
            out.extend_from_slice(&m.encode());
            let tmp = c.with_extension("ferry-manifest.tmp");
            let r = std::fs::write(&tmp, &out).and_then(|()| std::fs::rename(&tmp, c));
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(cache = %c.display(), error = %e, "cannot write the manifest cache; it will be recomputed next time");
            }
        }
        Ok(m)
    }

    /// Scans the whole image.
    fn scan(
        &self,
        chunk_size: u32,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Manifest, SourceError> {
        let geo = Geometry::new(self.size, chunk_size);
        let n = geo.chunks();
        let holes = self.hole_chunks(geo);
        let workers = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
            .clamp(1, 4) as u64;
        let stripe = 256u64;
        let done = AtomicU64::new(0);
        let results: Vec<Result<Vec<(u64, ChunkKind)>, SourceError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let holes = &holes;
                    let done = &done;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let mut buf = Vec::new();
                        let mut first = w * stripe;
                        while first < n {
                            for c in first..(first + stripe).min(n) {
                                if holes[c as usize] {
                                    out.push((c, ChunkKind::Zero));
                                    continue;
                                }
                                self.read_chunk(geo, c, &mut buf).map_err(|source| {
                                    SourceError::Io {
                                        op: "read",
                                        path: self.path.clone(),
                                        source,
                                    }
                                })?;
                                let kind = if buf.iter().all(|b| *b == 0) {
                                    ChunkKind::Zero
                                } else {
                                    ChunkKind::Data(*blake3::hash(&buf).as_bytes())
                                };
                                out.push((c, kind));
                                let d = done.fetch_add(buf.len() as u64, Ordering::Relaxed);
                                progress(d + buf.len() as u64, self.size);
                            }
                            first += workers * stripe;
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("scan worker panicked"))
                .collect()
        });
        let mut kinds = vec![ChunkKind::Zero; n as usize];
        for r in results {
            for (c, k) in r? {
                kinds[c as usize] = k;
            }
        }
        Ok(Manifest::new(geo, kinds))
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
        img.manifest(cs, None, &|_, _| {}).unwrap();
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

    #[test]
    fn holes_zeros_and_data_are_told_apart_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("src.img");
        let cs = 65536u64;
        {
            let mut f = File::create(&p).unwrap();
            f.set_len(10 * cs + 4096).unwrap();
            // chunk 1: data; chunk 3: written zeros; chunk 10 (short): data
            f.write_all_at(&[0xab; 100], cs + 5).unwrap();
            f.write_all_at(&vec![0; cs as usize], 3 * cs).unwrap();
            f.write_all_at(&[1; 10], 10 * cs + 7).unwrap();
            f.flush().unwrap();
        }
        let img = SourceImage::open(&p).unwrap();
        let cache = img.default_cache_path();
        let m = img.manifest(cs as u32, Some(&cache), &|_, _| {}).unwrap();
        let data: Vec<u64> = (0..m.geometry().chunks())
            .filter(|c| matches!(m.chunk(*c), ChunkKind::Data(_)))
            .collect();
        assert_eq!(data, vec![1, 10]);
        let mut buf = Vec::new();
        img.read_chunk(m.geometry(), 10, &mut buf).unwrap();
        assert_eq!(buf.len(), 4096);
        assert_eq!(ChunkKind::Data(*blake3::hash(&buf).as_bytes()), m.chunk(10));
        assert!(cache.exists());
        // From the cache: same manifest.
        let m2 = img.manifest(cs as u32, Some(&cache), &|_, _| {}).unwrap();
        assert_eq!(m, m2);
        // A changed image is rescanned, not served from a stale cache.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[2; 10], 5 * cs)
            .unwrap();
        let img = SourceImage::open(&p).unwrap();
        let m3 = img.manifest(cs as u32, Some(&cache), &|_, _| {}).unwrap();
        assert!(matches!(m3.chunk(5), ChunkKind::Data(_)));
        assert_ne!(m3.source_id(), m.source_id());
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
}
