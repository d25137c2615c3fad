//! The guest's writes at the destination, kept aside by `ferry abort`: the
//! source remains the truth, and these are what the operator may apply to
//! it (`ferry apply-writes`) or discard (remove the directory).
//!
//! A writes directory (owner-only) holds two files:
//! - `writes.raw`: a sparse raw file the size of the disk, holding the
//!   destination's bytes at their own offsets in every extent, holes
//!   elsewhere;
//! - `extents.json` ([`WritesIndex`]): the extents to apply (offset and
//!   length in bytes), their total, a BLAKE3 hash of their bytes in order,
//!   and where they came from. It is written last (under a temporary name,
//!   then renamed), so a directory without it is incomplete.
//!
//! The extents are the present blocks of every chunk the guest wrote into:
//! the guest's writes, plus the source's own data around them in those
//! chunks (so applying them rewrites those source bytes with themselves).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bitvec::slice::BitSlice;
use ferry_core::Geometry;
use serde::{Deserialize, Serialize};

/// The data file in a writes directory.
pub const DATA_FILE: &str = "writes.raw";
/// The index file in a writes directory.
pub const INDEX_FILE: &str = "extents.json";
/// The `format` of a [`WritesIndex`] this version writes and reads.
pub const FORMAT: &str = "ferry guest writes 1";

/// Bytes read or written at once.
const PIECE: u64 = 1 << 20;

/// `extents.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritesIndex {
    /// [`FORMAT`].
    pub format: String,
    /// The destination disk they were taken from.
    pub disk: String,
    /// Its size in bytes (the image they apply to has this size).
    pub disk_size: u64,
    /// The id of the source the disk was copied from (hex).
    pub source_id: String,
    /// The data file, relative to the directory ([`DATA_FILE`]).
    pub data: String,
    /// Bytes in all extents.
    pub bytes: u64,
    /// BLAKE3 of the extents' bytes, in order (hex).
    pub blake3: String,
    /// When they were kept, seconds since the Unix epoch.
    pub kept_at_unix: u64,
    /// The extents, in order, not overlapping.
    pub extents: Vec<Extent>,
}

/// One extent of guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// What was kept, or applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The writes directory.
    pub dir: PathBuf,
    /// Extents.
    pub extents: usize,
    /// Bytes in them.
    pub bytes: u64,
}

/// Errors keeping or applying guest writes.
#[derive(Debug, thiserror::Error)]
pub enum WritesError {
    /// I/O on a file.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No free name for a new writes directory.
    #[error("no free name for a writes directory beside {0} (.ferry-writes, .1 … .999 are taken)")]
    NoFreeName(PathBuf),
    /// The directory is not a complete writes directory of this format.
    #[error("{dir} is not a complete ferry writes directory: {why}")]
    NotWrites {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The image has another size than the disk the writes came from.
    #[error(
        "{image} is {found} bytes, the disk the writes in {dir} came from {expected}: refusing to \
         apply them to another disk (nothing was written)"
    )]
    SizeMismatch {
        /// The image.
        image: PathBuf,
        /// Its size.
        found: u64,
        /// The disk's size.
        expected: u64,
        /// The writes directory.
        dir: PathBuf,
    },
    /// The data file does not hash to what the index says.
    #[error(
        "the data in {dir} does not match its extents.json (BLAKE3 {found}, expected {expected}): \
         altered or damaged; refusing to apply it (nothing was written)"
    )]
    Altered {
        /// The writes directory.
        dir: PathBuf,
        /// The hash found.
        found: String,
        /// The hash recorded.
        expected: String,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WritesError {
    let path = path.to_owned();
    move |source| WritesError::Io { op, path, source }
}

/// The byte extents of the guest's writes: the runs of blocks `present`
/// in every chunk `guest` says the guest wrote into, and the blocks
/// `written` (acknowledged guest writes of this boot) wherever they are;
/// merged, in order.
pub fn extents_of(
    geo: Geometry,
    present: impl Fn(u64) -> bool,
    guest: impl Fn(u64) -> bool,
    written: Option<&BitSlice>,
) -> Vec<Range<u64>> {
    let mut blocks: Vec<Range<u64>> = Vec::new();
    let mut add = |b: u64| match blocks.last_mut() {
        Some(r) if r.end == b => r.end += 1,
        _ => blocks.push(b..b + 1),
    };
    let per_chunk = u64::from(geo.chunk_size / ferry_core::geometry::BLOCK_SIZE);
    let written_in = |b: u64| written.is_some_and(|w| w.get(b as usize).is_some_and(|x| *x));
    for c in 0..geo.chunks() {
        let first = c * per_chunk;
        let end = (first + per_chunk).min(geo.blocks());
        let g = guest(c);
        for b in first..end {
            if (g && present(b)) || written_in(b) {
                add(b);
            }
        }
    }
    blocks
        .into_iter()
        .map(|r| geo.block_bytes(r.start).start..geo.block_bytes(r.end - 1).end)
        .collect()
}

/// The writes directory to make for the state file `state`: its name with
/// `.ferry-state` replaced by `.ferry-writes` (or that appended), or, if
/// taken, with `.1`, `.2`, … after it.
pub fn free_dir_name(state: &Path) -> Result<PathBuf, WritesError> {
    let name = state.to_string_lossy();
    let base = match name.strip_suffix(".ferry-state") {
        Some(stem) => format!("{stem}.ferry-writes"),
        None => format!("{name}.ferry-writes"),
    };
    for n in 0..1000 {
        let p = if n == 0 {
            PathBuf::from(&base)
        } else {
            PathBuf::from(format!("{base}.{n}"))
        };
        if !p.exists() {
            return Ok(p);
        }
    }
    Err(WritesError::NoFreeName(state.to_owned()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the guest writes come from.
pub struct Origin<'a> {
    /// The destination disk's path.
    pub disk: &'a Path,
    /// Its size.
    pub disk_size: u64,
    /// The source's id.
    pub source_id: [u8; 32],
}

/// Keeps `extents` (in order, not overlapping) of a disk read by `read`
/// in a new writes directory `dir` (owner-only; it must not exist), made
/// durable.
pub fn keep(
    dir: &Path,
    origin: &Origin<'_>,
    extents: &[Range<u64>],
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<Kept, WritesError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create the writes directory", dir))?;
    let data_path = dir.join(DATA_FILE);
    let data = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&data_path)
        .map_err(io_err("create", &data_path))?;
    data.set_len(origin.disk_size)
        .map_err(io_err("size", &data_path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; PIECE as usize];
    let mut bytes = 0;
    for r in extents {
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(PIECE) as usize;
            read(&mut buf[..n], off)
                .map_err(io_err("read the guest's writes from", origin.disk))?;
            hasher.update(&buf[..n]);
            // Zeros stay a hole.
            if buf[..n].iter().any(|b| *b != 0) {
                data.write_all_at(&buf[..n], off)
                    .map_err(io_err("write", &data_path))?;
            }
            off += n as u64;
        }
        bytes += r.end - r.start;
    }
    data.sync_all().map_err(io_err("sync", &data_path))?;
    let index = WritesIndex {
        format: FORMAT.into(),
        disk: origin.disk.display().to_string(),
        disk_size: origin.disk_size,
        source_id: hex(&origin.source_id),
        data: DATA_FILE.into(),
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
        kept_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        extents: extents
            .iter()
            .map(|r| Extent {
                offset: r.start,
                length: r.end - r.start,
            })
            .collect(),
    };
    let tmp = dir.join(format!("{INDEX_FILE}.new"));
    let index_path = dir.join(INDEX_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let json = serde_json::to_vec_pretty(&index).map_err(|e| WritesError::Io {
        op: "encode",
        path: index_path.clone(),
        source: io::Error::other(e),
    })?;
    f.write_all(&json)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &index_path).map_err(io_err("rename into place", &tmp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))?;
    crate::sync_parent_dir(dir).map_err(io_err("sync the directory holding", dir))?;
    Ok(Kept {
        dir: dir.to_owned(),
        extents: extents.len(),
        bytes,
    })
}

/// Reads a writes directory's index, checking its format and extents.
pub fn read_index(dir: &Path) -> Result<WritesIndex, WritesError> {
    let not = |why: String| WritesError::NotWrites {
        dir: dir.to_owned(),
        why,
    };
    let path = dir.join(INDEX_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(not(format!(
            "it has no {INDEX_FILE} (not a writes directory, or one whose making was interrupted)"
        )))
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let index: WritesIndex =
        serde_json::from_slice(&text).map_err(|e| not(format!("{INDEX_FILE}: {e}")))?;
    if index.format != FORMAT {
        return Err(not(format!(
            "format {:?}, this ferry reads {FORMAT:?}",
            index.format
        )));
    }
    let mut end = 0;
    for e in &index.extents {
        let stop = e.offset.checked_add(e.length);
        if e.offset < end || stop.is_none_or(|s| s > index.disk_size) || e.length == 0 {
            return Err(not(format!(
                "extent at {} of {} bytes overlaps another or lies outside the disk",
                e.offset, e.length
            )));
        }
        end = e.offset + e.length;
    }
    if index.extents.iter().map(|e| e.length).sum::<u64>() != index.bytes {
        return Err(not("its extents do not add up to its bytes".into()));
    }
    Ok(index)
}

/// Calls `f` with the data of every extent of `index`, a piece at a time,
/// and its offset.
fn for_each_piece(
    index: &WritesIndex,
    data: &File,
    data_path: &Path,
    buf: &mut [u8],
    mut f: impl FnMut(&[u8], u64) -> Result<(), WritesError>,
) -> Result<(), WritesError> {
    for e in &index.extents {
        let mut off = e.offset;
        while off < e.offset + e.length {
            let n = (e.offset + e.length - off).min(buf.len() as u64) as usize;
            data.read_exact_at(&mut buf[..n], off)
                .map_err(io_err("read", data_path))?;
            f(&buf[..n], off)?;
            off += n as u64;
        }
    }
    Ok(())
}

/// Applies the writes in `dir` to `image` (a file or block device of the
/// disk's size): checks everything first (index, size, the data's hash),
/// then writes every extent and syncs the image.
pub fn apply(dir: &Path, image: &Path) -> Result<Kept, WritesError> {
    let index = read_index(dir)?;
    let data_path = dir.join(&index.data);
    let data = File::open(&data_path).map_err(io_err("open", &data_path))?;
    let mut img = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_err("open for writing", image))?;
    let size = img.seek(SeekFrom::End(0)).map_err(io_err("size", image))?;
    if size != index.disk_size {
        return Err(WritesError::SizeMismatch {
            image: image.to_owned(),
            found: size,
            expected: index.disk_size,
            dir: dir.to_owned(),
        });
    }
    let mut buf = vec![0u8; PIECE as usize];
    let mut hasher = blake3::Hasher::new();
    for_each_piece(&index, &data, &data_path, &mut buf, |b, _| {
        hasher.update(b);
        Ok(())
    })?;
    let found = hasher.finalize().to_hex().to_string();
    if found != index.blake3 {
        return Err(WritesError::Altered {
            dir: dir.to_owned(),
            found,
            expected: index.blake3,
        });
    }
    for_each_piece(&index, &data, &data_path, &mut buf, |b, off| {
        img.write_all_at(b, off)
            .map_err(io_err("write the guest's writes to", image))
    })?;
    img.sync_all().map_err(io_err("sync", image))?;
    Ok(Kept {
        dir: dir.to_owned(),
        extents: index.extents.len(),
        bytes: index.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::prelude::*;

    const GEO: Geometry = Geometry {
        disk_size: (4 << 20) + 1000,
        chunk_size: 65536,
    };

    #[test]
    fn extents_are_present_blocks_of_guest_chunks_and_written_blocks() {
        // Chunk 1 (blocks 16..32) written by the guest, blocks 16..20 and
        // 30..32 present; blocks 33 and 40 written this boot (chunk 2, not
        // yet a guest chunk; its present block 32 is the source's).
        let present = |b: u64| (16..20).contains(&b) || (30..34).contains(&b) || b >= 80;
        let guest = |c: u64| c == 1 || c == 64;
        let mut written = bitvec![0; GEO.blocks() as usize];
        written.set(40, true);
        written.set(33, true);
        let e = extents_of(GEO, present, guest, Some(&written));
        let kib = |k: u64| k * 4096;
        assert_eq!(
            e,
            vec![
                kib(16)..kib(20),
                kib(30)..kib(32),
                kib(33)..kib(34),
                kib(40)..kib(41),
                // The last chunk holds a partial block: up to the disk's end.
                kib(1024)..GEO.disk_size,
            ]
        );
    }

    #[test]
    fn kept_writes_apply_to_an_image_and_are_refused_when_altered_or_misfit() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Vec<u8> = (0..GEO.disk_size).map(|i| (i % 251) as u8 + 1).collect();
        let extents = vec![
            4096..12288,
            65536..65536 + 100,
            GEO.disk_size - 1000..GEO.disk_size,
        ];
        let state = dir.path().join("d.img.ferry-state");
        let wdir = free_dir_name(&state).unwrap();
        assert_eq!(wdir, dir.path().join("d.img.ferry-writes"));
        let origin = Origin {
            disk: Path::new("/somewhere/d.img"),
            disk_size: GEO.disk_size,
            source_id: [5; 32],
        };
        let kept = keep(&wdir, &origin, &extents, |buf, off| {
            buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(kept.extents, 3);
        assert_eq!(kept.bytes, 8192 + 100 + 1000);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&wdir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // The next abort gets another name.
        assert_eq!(
            free_dir_name(&state).unwrap(),
            dir.path().join("d.img.ferry-writes.1")
        );
        let image = dir.path().join("img");
        std::fs::write(&image, vec![0u8; GEO.disk_size as usize]).unwrap();
        assert_eq!(apply(&wdir, &image).unwrap().bytes, kept.bytes);
        let got = std::fs::read(&image).unwrap();
        for (i, b) in got.iter().enumerate() {
            let i = i as u64;
            let want = if extents.iter().any(|r| r.contains(&i)) {
                disk[i as usize]
            } else {
                0
            };
            assert_eq!(*b, want, "byte {i}");
        }
        // Another size: refused, nothing written.
        let small = dir.path().join("small");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let e = apply(&wdir, &small).unwrap_err();
        assert!(matches!(e, WritesError::SizeMismatch { .. }), "{e}");
        // Altered data: refused, nothing written.
        let f = OpenOptions::new()
            .write(true)
            .open(wdir.join(DATA_FILE))
            .unwrap();
        f.write_all_at(&[0xee], 65536 + 50).unwrap();
        std::fs::write(&image, vec![0u8; GEO.disk_size as usize]).unwrap();
        let e = apply(&wdir, &image).unwrap_err();
        assert!(e.to_string().contains("altered or damaged"), "{e}");
        assert!(std::fs::read(&image).unwrap().iter().all(|b| *b == 0));
        // Not a writes directory.
        let e = apply(dir.path(), &image).unwrap_err();
        assert!(e.to_string().contains("has no extents.json"), "{e}");
    }
}
