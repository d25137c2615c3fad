//! The persistent block map ("state file") of a destination disk.
//!
//! Layout: a 4 KiB header (magic, version, the source's id, disk size,
//! chunk size, a BLAKE3 checksum of those; at byte 1024 the id of the boot
//! that last opened the file; at byte 2048, once the copy is complete and
//! verified, a record saying so, with its own checksum), then the present bitmap (one bit per block),
//! the guest bitmap (one bit per chunk) and the written bitmap (one bit per
//! block), each padded to 4 KiB.
//!
//! *Present* bits only ever go from 0 to 1 and are written only for data
//! already synced, so a torn write of a bitmap page is harmless: every bit
//! that reaches the disk is backed by durable data (invariant 1). Only the
//! pages that changed are written, then fdatasync'd.
//!
//! *Written* bits record guest writes as they are acknowledged, before any
//! FLUSH: written to the file (page cache), not synced. If `ferry pull`
//! dies, the host's page cache still holds both the guest's data and these
//! bits, and the guest may FLUSH later (through a ublk device that outlived
//! its server, or an NBD client that reconnects) expecting those writes to
//! be durable. So a restart on the same boot adopts them as present (after
//! syncing the backing file). After a reboot the page cache is gone and so
//! are unflushed writes: the written bits are then discarded and the blocks
//! fetched again, which is what a disk that lost power may do.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bitvec::prelude::*;
use ferry_core::{Geometry, SyncBatch};

const MAGIC: &[u8; 8] = b"FERRYST1";
const VERSION: u32 = 2;
const BOOT_ID_AT: usize = 1024;
const BOOT_ID_LEN: usize = 64;
/// Where the "complete and verified" record is (see [`Verified`]).
const VERIFIED_AT: usize = 2048;
const VERIFIED_MAGIC: &[u8; 8] = b"VERIFIED";
/// Magic, disk hash, chunks checked, then a BLAKE3 checksum of those.
const VERIFIED_BODY: usize = 8 + 32 + 8;

/// What a state file's header says, read without knowing the source:
/// enough to serve the disk before (or without) reaching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateHeader {
    /// The disk's geometry.
    pub geometry: Geometry,
    /// The id of the source the disk is copied from.
    pub source_id: [u8; 32],
    /// Set once the copy was complete and verified against the source.
    pub verified: Option<Verified>,
}

/// The durable record that a copy was complete and verified: every block
/// present, every chunk the guest did not write equal to the source's.
/// From then on the disk needs no source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// BLAKE3 of the whole disk when it was verified.
    pub disk_blake3: [u8; 32],
    /// Chunks checked against the source's hashes.
    pub chunks_checked: u64,
}

impl Verified {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(VERIFIED_BODY + 32);
        b.extend_from_slice(VERIFIED_MAGIC);
        b.extend_from_slice(&self.disk_blake3);
        b.extend_from_slice(&self.chunks_checked.to_le_bytes());
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b
    }

    /// The record in a header page, if there is a valid one (a torn or
    /// absent record reads as "not verified": the safe side).
    fn decode(page: &[u8]) -> Option<Verified> {
        let b = page.get(VERIFIED_AT..VERIFIED_AT + VERIFIED_BODY + 32)?;
        if &b[..8] != VERIFIED_MAGIC
            || blake3::hash(&b[..VERIFIED_BODY]).as_bytes() != &b[VERIFIED_BODY..]
        {
            return None;
        }
        Some(Verified {
            disk_blake3: b[8..40].try_into().ok()?,
            chunks_checked: u64::from_le_bytes(b[40..48].try_into().ok()?),
        })
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or empty if unknown
/// (then written bits are never adopted: the safe choice).
pub fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
const PAGE: usize = 4096;

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state file failed.
    #[error("{op} state file {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a ferry state file, or is damaged.
    #[error("{path} is not a valid ferry state file: {why}")]
    Invalid {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The state belongs to another source.
    #[error(
        "state file {path} belongs to another source (its source id {found}, this source {expected}); \
         refusing to use it: the destination disk would mix two sources"
    )]
    OtherSource {
        /// The path.
        path: PathBuf,
        /// The id in the file (hex).
        found: String,
        /// The id of the source we connected to (hex).
        expected: String,
    },
}

/// The state file, with its bitmaps in memory.
#[derive(Debug)]
pub struct StateFile {
    file: File,
    path: PathBuf,
    present: Vec<u8>,
    guest: Vec<u8>,
    written: Vec<u8>,
    present_off: u64,
    guest_off: u64,
    written_off: u64,
    dirty_present: BTreeSet<usize>,
    dirty_guest: BTreeSet<usize>,
    recovered: Vec<std::ops::Range<u64>>,
    verified: Option<Verified>,
}

fn round_page(n: usize) -> usize {
    n.div_ceil(PAGE) * PAGE
}

/// Bits stored least-significant first in `bytes`, as a word-backed
/// bit vector `len` long (word by word: fast even for a 32 MiB map).
fn bits_from_bytes(bytes: &[u8], len: u64) -> BitVec {
    const W: usize = std::mem::size_of::<usize>();
    let words: Vec<usize> = bytes
        .chunks(W)
        .map(|c| {
            let mut b = [0u8; W];
            b[..c.len()].copy_from_slice(c);
            usize::from_le_bytes(b)
        })
        .collect();
    let mut v = BitVec::from_vec(words);
    v.truncate(len as usize);
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl StateFile {
    fn header(geo: Geometry, source_id: [u8; 32]) -> Vec<u8> {
        let mut h = Vec::with_capacity(PAGE);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&source_id);
        h.extend_from_slice(&geo.disk_size.to_le_bytes());
        h.extend_from_slice(&geo.chunk_size.to_le_bytes());
        let sum = *blake3::hash(&h).as_bytes();
        h.extend_from_slice(&sum);
        h.resize(PAGE, 0);
        h
    }

    /// Offsets and lengths of the present, guest and written bitmaps.
    fn layout(geo: Geometry) -> [(u64, usize); 3] {
        let present_len = round_page((geo.blocks() as usize).div_ceil(8));
        let guest_len = round_page((geo.chunks() as usize).div_ceil(8));
        let p = PAGE as u64;
        let g = p + present_len as u64;
        let w = g + guest_len as u64;
        [(p, present_len), (g, guest_len), (w, present_len)]
    }

    fn write_boot_id(file: &File, path: &Path, boot: &str, sync: bool) -> Result<(), StateError> {
        let mut b = [0u8; BOOT_ID_LEN];
        let n = boot.len().min(BOOT_ID_LEN);
        b[..n].copy_from_slice(&boot.as_bytes()[..n]);
        file.write_all_at(&b, BOOT_ID_AT as u64)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
            .map_err(|source| StateError::Io {
                op: "cannot write",
                path: path.to_owned(),
                source,
            })
    }

    /// Creates a new state file (fails if it exists) with every bit clear.
    pub fn create(path: &Path, geo: Geometry, source_id: [u8; 32]) -> Result<Self, StateError> {
        Self::create_on_boot(path, geo, source_id, &current_boot_id())
    }

    /// [`StateFile::create`] without waiting for the new file to be
    /// durable: the caller makes it so (`sync_all` of
    /// [`StateFile::durable_handle`], then [`crate::sync_parent_dir`])
    /// before its first [`StateFile::persist`], off its critical path.
    pub fn create_unsynced(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
    ) -> Result<Self, StateError> {
        Self::create_with(path, geo, source_id, &current_boot_id(), false)
    }

    /// A second descriptor of the file, to make it durable from another
    /// thread.
    pub fn durable_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// [`StateFile::create`] as if on boot `boot`.
    pub fn create_on_boot(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        boot: &str,
    ) -> Result<Self, StateError> {
        Self::create_with(path, geo, source_id, boot, true)
    }

    fn create_with(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        boot: &str,
        sync: bool,
    ) -> Result<Self, StateError> {
        let io_err = |op| {
            move |source| StateError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("cannot create"))?;
        let [(present_off, present_len), (guest_off, guest_len), (written_off, written_len)] =
            Self::layout(geo);
        file.set_len(written_off + written_len as u64)
            .map_err(io_err("cannot size"))?;
        file.write_all_at(&Self::header(geo, source_id), 0)
            .map_err(io_err("cannot write"))?;
        Self::write_boot_id(&file, path, boot, false)?;
        if sync {
            file.sync_all().map_err(io_err("cannot sync"))?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            present: vec![0; present_len],
            guest: vec![0; guest_len],
            written: vec![0; written_len],
            present_off,
            guest_off,
            written_off,
            dirty_present: BTreeSet::new(),
            dirty_guest: BTreeSet::new(),
            recovered: Vec::new(),
            verified: None,
        })
    }

    /// Opens an existing state file and checks it belongs to this source.
    /// Guest writes acknowledged before a crash on this same boot are
    /// named by [`StateFile::recovered_writes`]; after a reboot they are
    /// discarded (see the module documentation).
    pub fn open(path: &Path, geo: Geometry, source_id: [u8; 32]) -> Result<Self, StateError> {
        Self::open_on_boot(path, geo, source_id, &current_boot_id())
    }

    /// [`StateFile::open`] as if on boot `boot`.
    pub fn open_on_boot(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        boot: &str,
    ) -> Result<Self, StateError> {
        let io_err = |op| {
            move |source| StateError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let invalid = |why: &str| StateError::Invalid {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("cannot open"))?;
        let mut h = vec![0u8; PAGE];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| invalid("shorter than its header"))?;
        if &h[..8] != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(invalid(&format!("unsupported version {version}")));
        }
        let body = 8 + 4 + 32 + 8 + 4;
        if blake3::hash(&h[..body]).as_bytes() != &h[body..body + 32] {
            return Err(invalid("header checksum mismatch"));
        }
        let found: [u8; 32] = h[12..44].try_into().expect("32 bytes");
        if found != source_id {
            return Err(StateError::OtherSource {
                path: path.to_owned(),
                found: hex(&found),
                expected: hex(&source_id),
            });
        }
        let size = u64::from_le_bytes(h[44..52].try_into().expect("8 bytes"));
        let chunk = u32::from_le_bytes(h[52..56].try_into().expect("4 bytes"));
        if size != geo.disk_size || chunk != geo.chunk_size {
            return Err(invalid("geometry differs from the source's"));
        }
        let [(present_off, present_len), (guest_off, guest_len), (written_off, written_len)] =
            Self::layout(geo);
        let mut present = vec![0u8; present_len];
        let mut guest = vec![0u8; guest_len];
        let mut written = vec![0u8; written_len];
        file.read_exact_at(&mut present, present_off)
            .map_err(|_| invalid("truncated present bitmap"))?;
        file.read_exact_at(&mut guest, guest_off)
            .map_err(|_| invalid("truncated guest bitmap"))?;
        file.read_exact_at(&mut written, written_off)
            .map_err(|_| invalid("truncated written bitmap"))?;
        let stored = String::from_utf8_lossy(&h[BOOT_ID_AT..BOOT_ID_AT + BOOT_ID_LEN])
            .trim_end_matches('\0')
            .to_string();
        let same_boot = !boot.is_empty() && stored == boot;
        let mut recovered: Vec<std::ops::Range<u64>> = Vec::new();
        if same_boot {
            let p = present.view_bits::<Lsb0>();
            let w = written.view_bits::<Lsb0>();
            for i in w.iter_ones().take_while(|i| (*i as u64) < geo.blocks()) {
                if !p[i] {
                    let i = i as u64;
                    match recovered.last_mut() {
                        Some(r) if r.end == i => r.end += 1,
                        _ => recovered.push(i..i + 1),
                    }
                }
            }
        } else if written.iter().any(|b| *b != 0) {
            // Unflushed writes of another boot: gone with its page cache.
            tracing::info!(path = %path.display(), "discarding unflushed guest writes from before a reboot");
            written.fill(0);
            file.write_all_at(&written, written_off)
                .map_err(|source| StateError::Io {
                    op: "cannot write",
                    path: path.to_owned(),
                    source,
                })?;
        }
        Self::write_boot_id(&file, path, boot, true)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            present,
            guest,
            written,
            present_off,
            guest_off,
            written_off,
            dirty_present: BTreeSet::new(),
            dirty_guest: BTreeSet::new(),
            recovered,
            verified: Verified::decode(&h),
        })
    }

    /// Reads and checks the header of the state file at `path` without
    /// changing anything: the geometry and source id it was made for, and
    /// whether the copy was complete and verified. A resumed pull serves
    /// the disk from these before (or without) reaching the source.
    pub fn peek(path: &Path) -> Result<StateHeader, StateError> {
        let invalid = |why: &str| StateError::Invalid {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let file = File::open(path).map_err(|source| StateError::Io {
            op: "cannot open",
            path: path.to_owned(),
            source,
        })?;
        let mut h = vec![0u8; PAGE];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| invalid("shorter than its header"))?;
        if &h[..8] != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(invalid(&format!("unsupported version {version}")));
        }
        let body = 8 + 4 + 32 + 8 + 4;
        if blake3::hash(&h[..body]).as_bytes() != &h[body..body + 32] {
            return Err(invalid("header checksum mismatch"));
        }
        let size = u64::from_le_bytes(h[44..52].try_into().expect("8 bytes"));
        let chunk = u32::from_le_bytes(h[52..56].try_into().expect("4 bytes"));
        if chunk == 0 || chunk % ferry_core::geometry::BLOCK_SIZE != 0 {
            return Err(invalid(&format!("bad chunk size {chunk}")));
        }
        Ok(StateHeader {
            geometry: Geometry::new(size, chunk),
            source_id: h[12..44].try_into().expect("32 bytes"),
            verified: Verified::decode(&h),
        })
    }

    /// Whether the copy was recorded as complete and verified (see
    /// [`StateFile::record_verified`]).
    pub fn verified(&self) -> Option<Verified> {
        self.verified
    }

    /// Records durably that the copy is complete and verified: from then
    /// on the disk is served without its source. The caller has synced the
    /// backing file and persisted every present bit before.
    pub fn record_verified(&mut self, v: Verified) -> Result<(), StateError> {
        self.file
            .write_all_at(&v.encode(), VERIFIED_AT as u64)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StateError::Io {
                op: "cannot record the verification in",
                path: self.path.clone(),
                source,
            })?;
        self.verified = Some(v);
        Ok(())
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Present bits, one per block (`blocks` long).
    pub fn present_bits(&self, blocks: u64) -> BitVec {
        bits_from_bytes(&self.present, blocks)
    }

    /// Guest bits, one per chunk (`chunks` long).
    pub fn guest_bits(&self, chunks: u64) -> BitVec {
        bits_from_bytes(&self.guest, chunks)
    }

    /// Runs of blocks the guest wrote (acknowledged, not flushed) before a
    /// crash of the pull on this boot, not yet present: the caller syncs the
    /// backing file and persists them as present before serving.
    pub fn recovered_writes(&self) -> &[std::ops::Range<u64>] {
        &self.recovered
    }

    /// Records guest writes of `blocks` as they are acknowledged: sets their
    /// written bits and writes the changed pages, without syncing.
    pub fn mark_written(&mut self, blocks: std::ops::Range<u64>) -> Result<(), StateError> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.written.view_bits_mut::<Lsb0>()[blocks.start as usize..blocks.end as usize].fill(true);
        let first = blocks.start as usize / 8 / PAGE;
        let last = (blocks.end as usize - 1) / 8 / PAGE;
        let r = first * PAGE..(last + 1) * PAGE;
        self.file
            .write_all_at(&self.written[r.clone()], self.written_off + r.start as u64)
            .map_err(|source| StateError::Io {
                op: "cannot write",
                path: self.path.clone(),
                source,
            })
    }

    /// Persists a sync batch's bits. The caller has synced the backing file
    /// before (invariant 1). Writes only the changed pages, then syncs.
    pub fn persist(&mut self, batch: &SyncBatch) -> Result<(), StateError> {
        {
            let bits = self.present.view_bits_mut::<Lsb0>();
            for r in &batch.blocks {
                bits[r.start as usize..r.end as usize].fill(true);
                let first = r.start as usize / 8 / PAGE;
                let last = (r.end as usize - 1) / 8 / PAGE;
                self.dirty_present.extend(first..=last);
            }
        }
        {
            let bits = self.guest.view_bits_mut::<Lsb0>();
            for c in &batch.guest_chunks {
                bits.set(*c as usize, true);
                self.dirty_guest.insert(*c as usize / 8 / PAGE);
            }
        }
        self.flush_dirty()
    }

    fn flush_dirty(&mut self) -> Result<(), StateError> {
        let io_err = |source| StateError::Io {
            op: "cannot write",
            path: self.path.clone(),
            source,
        };
        if self.dirty_present.is_empty() && self.dirty_guest.is_empty() {
            return Ok(());
        }
        for p in &self.dirty_present {
            let r = p * PAGE..(p + 1) * PAGE;
            self.file
                .write_all_at(&self.present[r], self.present_off + (p * PAGE) as u64)
                .map_err(io_err)?;
        }
        for p in &self.dirty_guest {
            let r = p * PAGE..(p + 1) * PAGE;
            self.file
                .write_all_at(&self.guest[r], self.guest_off + (p * PAGE) as u64)
                .map_err(io_err)?;
        }
        self.file.sync_data().map_err(|source| StateError::Io {
            op: "cannot sync",
            path: self.path.clone(),
            source,
        })?;
        self.dirty_present.clear();
        self.dirty_guest.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsynced_creation_writes_the_same_file_and_refuses_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let geo = Geometry::new(100 << 20, 65536);
        drop(StateFile::create(&a, geo, [4; 32]).unwrap());
        let s = StateFile::create_unsynced(&b, geo, [4; 32]).unwrap();
        s.durable_handle().unwrap().sync_all().unwrap();
        crate::sync_parent_dir(&b).unwrap();
        drop(s);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let s = StateFile::open(&b, geo, [4; 32]).unwrap();
        assert!(s.present_bits(geo.blocks()).not_any());
        assert!(matches!(
            StateFile::create_unsynced(&b, geo, [4; 32]),
            Err(StateError::Io { .. })
        ));
    }

    #[test]
    fn persisted_bits_survive_reopen_and_other_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(100 << 20, 65536);
        let mut s = StateFile::create(&p, geo, [1; 32]).unwrap();
        s.persist(&SyncBatch {
            blocks: vec![3..5, 20000..20001],
            guest_chunks: vec![7],
        })
        .unwrap();
        drop(s);
        let s = StateFile::open(&p, geo, [1; 32]).unwrap();
        let bits = s.present_bits(geo.blocks());
        assert_eq!(bits.count_ones(), 3);
        assert!(bits[3] && bits[4] && bits[20000]);
        assert!(s.guest_bits(geo.chunks())[7]);
        let e = StateFile::open(&p, geo, [2; 32]).unwrap_err();
        assert!(matches!(e, StateError::OtherSource { .. }), "{e}");
        let before = std::fs::read(&p).unwrap();
        let e = StateFile::open(&p, Geometry::new(200 << 20, 65536), [1; 32]).unwrap_err();
        assert!(e.to_string().contains("geometry"), "{e}");
        assert_eq!(
            before,
            std::fs::read(&p).unwrap(),
            "a refused open changed the file"
        );
        std::fs::write(dir.path().join("junk"), b"hello").unwrap();
        assert!(StateFile::open(&dir.path().join("junk"), geo, [1; 32]).is_err());
    }

    #[test]
    fn the_header_and_the_verified_record_read_without_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(40 << 20, 65536);
        let mut s = StateFile::create(&p, geo, [9; 32]).unwrap();
        let h = StateFile::peek(&p).unwrap();
        assert_eq!(
            h,
            StateHeader {
                geometry: geo,
                source_id: [9; 32],
                verified: None
            }
        );
        let v = Verified {
            disk_blake3: [3; 32],
            chunks_checked: 17,
        };
        s.record_verified(v).unwrap();
        drop(s);
        assert_eq!(StateFile::peek(&p).unwrap().verified, Some(v));
        let s = StateFile::open(&p, geo, [9; 32]).unwrap();
        assert_eq!(s.verified(), Some(v));
        drop(s);
        // A damaged record is no record: not verified.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], (VERIFIED_AT + 20) as u64).unwrap();
        assert_eq!(StateFile::peek(&p).unwrap().verified, None);
        std::fs::write(dir.path().join("junk"), vec![0u8; 8192]).unwrap();
        let e = StateFile::peek(&dir.path().join("junk")).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn acknowledged_writes_are_recovered_on_the_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(64 << 20, 65536);
        let mut s = StateFile::create_on_boot(&p, geo, [1; 32], "boot-a").unwrap();
        s.persist(&SyncBatch {
            blocks: vec![0..4],
            guest_chunks: vec![],
        })
        .unwrap();
        s.mark_written(2..10).unwrap();
        s.mark_written(100..101).unwrap();
        drop(s); // a crash: nothing synced
        let s = StateFile::open_on_boot(&p, geo, [1; 32], "boot-a").unwrap();
        assert_eq!(s.recovered_writes(), &[4..10, 100..101]);
        // After a reboot they are gone, for good.
        let s = StateFile::open_on_boot(&p, geo, [1; 32], "boot-b").unwrap();
        assert!(s.recovered_writes().is_empty());
        let s = StateFile::open_on_boot(&p, geo, [1; 32], "boot-b").unwrap();
        assert!(s.recovered_writes().is_empty());
        // An unknown boot never adopts them.
        let mut s = StateFile::open_on_boot(&p, geo, [1; 32], "").unwrap();
        s.mark_written(7..8).unwrap();
        let s = StateFile::open_on_boot(&p, geo, [1; 32], "").unwrap();
        assert!(s.recovered_writes().is_empty());
    }

    #[test]
    fn large_map_roundtrips_its_last_bit() {
        // 64 GiB at 4 KiB blocks: a 2 MiB bitmap. Behaviour only; the time to
        // open a 1 TiB map is measured by `cargo xtask bench`.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(64 << 30, 65536);
        let mut s = StateFile::create(&p, geo, [9; 32]).unwrap();
        let last = geo.blocks() - 1;
        s.persist(&SyncBatch {
            blocks: vec![last..last + 1],
            guest_chunks: vec![],
        })
        .unwrap();
        let s = StateFile::open(&p, geo, [9; 32]).unwrap();
        let bits = s.present_bits(geo.blocks());
        assert!(bits[last as usize]);
        assert_eq!(bits.count_ones(), 1);
    }
}
