//! The persistent block map ("state file") of a destination disk.
//!
//! Layout (version 3): a 4 KiB header (magic, version, the source's id, disk
//! size, chunk size, the *pair id* and binding of the backing file, a BLAKE3
//! checksum of those; at byte 1024 the id of the boot that last opened the
//! file; at byte 2048, once the copy is complete and verified, a record
//! saying so, with its own checksum), then three bitmaps: present (one bit per block), guest (one bit
//! per chunk) and written (one bit per block). See
//! `docs/decisions/state-file-integrity.md` for why it is built so.
//!
//! Each bitmap is cut into pages of [`BITS_PER_PAGE`] bits, and each page
//! has two 4 KiB *slots*: its bits, a version number and a keyed checksum
//! (BLAKE3, keyed by the source id and the pair id, over the map, the page
//! number, the version and the bits). A page is rewritten into the slot
//! holding its older version, so a write torn by a power cut damages only
//! the slot being written: on open the valid slot with the higher version
//! wins, which is the page as of the last completed sync round. A page
//! whose two slots are both invalid is damage, and the file is refused. A
//! slot of all zeros is the page's never-written version 0 (a new file is
//! sparse). The checksum key makes a page of another state file, or from
//! another place in this one, invalid.
//!
//! The pair id is random, written at creation into the header and onto the
//! backing file (an extended attribute, or where the filesystem keeps none
//! the backing file's inode number in the header): a state file is used
//! only with the backing file it was created with. A block device carries
//! neither (no user extended attributes on device nodes; its node's inode
//! and device numbers change across reboots): its state file records that
//! it belongs to a block device, is named by the operator (`--state`), and
//! is refused with a regular file, as a file's is with a block device.
//!
//! *Present* bits only ever go from 0 to 1 and are written only for data
//! already synced (invariant 1). Only the pages that changed are written,
//! then fdatasync'd.
//!
//! *Written* bits record guest writes as they are acknowledged, before any
//! FLUSH: written to the file (page cache), not synced. If `ferry pull`
//! dies, the host's page cache still holds both the guest's data and these
//! bits, and the guest may FLUSH later (through a ublk device that outlived
//! its server, or an NBD client that reconnects) expecting those writes to
//! be durable. So a restart on the same boot adopts them: their blocks as
//! present and their chunks as written by the guest (after syncing the
//! backing file). After a reboot the page cache is gone and so are
//! unflushed writes: the written bits are then discarded (unread: they were
//! never synced, so they may be torn) and the blocks fetched again, which
//! is what a disk that lost power may do.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bitvec::prelude::*;
use ferry_core::{Geometry, SyncBatch};

use crate::backing::{Backing, PairMark};
use crate::lock::{describe_holder, lock_exclusive, LockFail};
use crate::precopy::Precopy;
use crate::runtime::RuntimeSettings;

const MAGIC: &[u8; 8] = b"FERRYST1";
const VERSION: u32 = 3;
const BOOT_ID_AT: usize = 1024;
const BOOT_ID_LEN: usize = 64;
const PAGE: usize = 4096;
/// Bytes of bits in one slot; the rest holds the version and checksum.
const SLOT_BITS: usize = PAGE - 8 - 16;
/// Bits of one bitmap page.
pub const BITS_PER_PAGE: usize = SLOT_BITS * 8;
/// Header fields covered by its checksum.
const HEADER_BODY: usize = 8 + 4 + 32 + 8 + 4 + 16 + 8 + 1;

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

/// Where the record of the migration's end is (see [`Ended`]).
const ENDED_AT: usize = 3072;
const ENDED_MAGIC: &[u8; 8] = b"FERRYEND";
/// Longest writes directory kept in an [`Ended::Aborted`] record.
const ENDED_PATH_MAX: usize = 1024 - 8 - 1 - 8 - 2 - 32;

/// How a migration ended, recorded durably in its state file by
/// `ferry commit` or `ferry abort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Committed: the copy was verified and the operator let the source
    /// go; the destination disk is the disk now.
    Committed {
        /// When, in seconds since the Unix epoch.
        at_unix: u64,
    },
    /// Aborted: the source remains the truth; the guest's writes at the
    /// destination were kept aside in `writes` (a directory).
    Aborted {
        /// When, in seconds since the Unix epoch.
        at_unix: u64,
        /// Where the guest's writes were kept (empty if its path was too
        /// long to record).
        writes: PathBuf,
    },
}

impl Ended {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let (kind, at, path): (u8, u64, &[u8]) = match self {
            Ended::Committed { at_unix } => (1, *at_unix, &[]),
            Ended::Aborted { at_unix, writes } => {
                let p = writes.as_os_str().as_bytes();
                (2, *at_unix, if p.len() <= ENDED_PATH_MAX { p } else { &[] })
            }
        };
        let mut b = Vec::with_capacity(1024);
        b.extend_from_slice(ENDED_MAGIC);
        b.push(kind);
        b.extend_from_slice(&at.to_le_bytes());
        b.extend_from_slice(&(path.len() as u16).to_le_bytes());
        b.extend_from_slice(path);
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b
    }

    /// The record in a header page, if there is a valid one (a torn or
    /// absent record reads as none).
    fn decode(page: &[u8]) -> Option<Ended> {
        use std::os::unix::ffi::OsStrExt;
        let b = page.get(ENDED_AT..)?;
        if b.get(..8)? != ENDED_MAGIC {
            return None;
        }
        let kind = *b.get(8)?;
        let at_unix = u64::from_le_bytes(b.get(9..17)?.try_into().ok()?);
        let len = usize::from(u16::from_le_bytes(b.get(17..19)?.try_into().ok()?));
        let body = 19 + len;
        if len > ENDED_PATH_MAX
            || blake3::hash(b.get(..body)?).as_bytes() != b.get(body..body + 32)?
        {
            return None;
        }
        match kind {
            1 => Some(Ended::Committed { at_unix }),
            2 => Some(Ended::Aborted {
                at_unix,
                writes: PathBuf::from(std::ffi::OsStr::from_bytes(&b[19..body])),
            }),
            _ => None,
        }
    }
}

const BIND_XATTR: u8 = 1;
const BIND_INODE: u8 = 2;
const BIND_DEVICE: u8 = 3;

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or empty if unknown
/// (then written bits are never adopted: the safe choice).
pub fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What ties a state file to its backing file: a random id, kept on the
/// backing file as an extended attribute, or (`inode`) where the
/// filesystem keeps none, the backing file's inode number; for a block
/// device (`block_device`), only the operator's `--state` (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pairing {
    /// The random id.
    pub id: [u8; 16],
    /// The backing file's inode number when it carries no id.
    pub inode: Option<u64>,
    /// The disk is a block device, which carries nothing.
    pub block_device: bool,
}

impl Pairing {
    /// A new random pairing for `backing`: writes the id onto it (or, where
    /// extended attributes are unsupported, takes its inode number; a
    /// block device is left as it is).
    pub fn bind(backing: &Backing) -> io::Result<Self> {
        use std::io::Read;
        let mut id = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut id)?;
        if backing.is_block_device() {
            return Ok(Self {
                id,
                inode: None,
                block_device: true,
            });
        }
        let inode = if backing.set_pair_id(&id)? {
            None
        } else {
            Some(backing.inode()?)
        };
        Ok(Self {
            id,
            inode,
            block_device: false,
        })
    }
}

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
    /// Pages of a bitmap fail their checksums in both slots.
    #[error(
        "state file {path} is damaged: page(s) {pages:?} of its {map} bitmap fail their checksums \
         (both copies); refusing to trust it (the disk's contents are unknown: remove the disk and \
         its state file to start afresh)"
    )]
    Damaged {
        /// The path.
        path: PathBuf,
        /// Which bitmap.
        map: &'static str,
        /// The damaged pages (the first few).
        pages: Vec<usize>,
    },
    /// The state file was created with another backing file.
    #[error(
        "state file {path} does not belong to the backing file {backing}: {why}; refusing to use \
         them together (pass the --state created with this --disk)"
    )]
    NotPaired {
        /// The path.
        path: PathBuf,
        /// The backing file's path.
        backing: PathBuf,
        /// What differs.
        why: String,
    },
    /// Another process has the file open and locked.
    #[error(
        "state file {path} is in use by {holder} (another ferry pull of this disk?); \
         refusing to use it twice"
    )]
    Locked {
        /// The path.
        path: PathBuf,
        /// Who holds the lock ("PID 123").
        holder: String,
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

/// One bitmap: its bits in memory, each page's current version, and the
/// pages changed since they were last written.
#[derive(Debug)]
struct Map {
    /// 0 present, 1 guest, 2 written (part of every page's checksum).
    kind: u8,
    /// Offset of its first slot in the file.
    off: u64,
    /// `pages * SLOT_BITS` bytes, least-significant bit first.
    bits: Vec<u8>,
    /// Each page's current version (0: never written).
    version: Vec<u64>,
    dirty: BTreeSet<usize>,
}

fn map_pages(bits: u64) -> usize {
    (bits as usize).div_ceil(BITS_PER_PAGE).max(1)
}

fn page_sum(key: &[u8; 32], kind: u8, page: usize, slot: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&[kind]);
    h.update(&(page as u64).to_le_bytes());
    h.update(&slot[..SLOT_BITS + 8]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

impl Map {
    fn new(kind: u8, off: u64, pages: usize) -> Self {
        Self {
            kind,
            off,
            bits: vec![0; pages * SLOT_BITS],
            version: vec![0; pages],
            dirty: BTreeSet::new(),
        }
    }

    /// Bytes of the file it takes (two slots a page).
    fn file_len(pages: usize) -> u64 {
        (pages * 2 * PAGE) as u64
    }

    /// Reads it; the pages whose two slots are both invalid are returned
    /// (and left empty). Reads a batch of pages at a time, and checks the
    /// older slot of a page only when its newer one is torn.
    fn load(
        file: &File,
        key: &[u8; 32],
        kind: u8,
        off: u64,
        pages: usize,
    ) -> io::Result<(Self, Vec<usize>)> {
        const BATCH: usize = 128;
        static ZERO: [u8; PAGE] = [0; PAGE];
        let mut m = Self::new(kind, off, pages);
        let mut raw = vec![0u8; BATCH.min(pages) * 2 * PAGE];
        let mut bad = Vec::new();
        let ver =
            |s: &[u8]| u64::from_le_bytes(s[SLOT_BITS..SLOT_BITS + 8].try_into().expect("8 bytes"));
        for first in (0..pages).step_by(BATCH) {
            let n = BATCH.min(pages - first);
            let raw = &mut raw[..n * 2 * PAGE];
            file.read_exact_at(raw, off + (first * 2 * PAGE) as u64)?;
            for (i, pair) in raw.chunks_exact(2 * PAGE).enumerate() {
                let p = first + i;
                let slots = [&pair[..PAGE], &pair[PAGE..]];
                let valid = |s: &[u8]| {
                    if ver(s) == 0 {
                        // Never written: all zeros, or damaged.
                        return s == &ZERO[..];
                    }
                    page_sum(key, kind, p, s)[..] == s[SLOT_BITS + 8..]
                };
                // The newer first; the older only if the newer is torn.
                let order = if ver(slots[1]) > ver(slots[0]) {
                    [1, 0]
                } else {
                    [0, 1]
                };
                match order.into_iter().find(|i| valid(slots[*i])) {
                    Some(i) => {
                        m.bits[p * SLOT_BITS..(p + 1) * SLOT_BITS]
                            .copy_from_slice(&slots[i][..SLOT_BITS]);
                        m.version[p] = ver(slots[i]);
                    }
                    None => bad.push(p),
                }
            }
        }
        Ok((m, bad))
    }

    /// Marks the pages holding bits `r` as changed.
    fn touch(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let first = r.start as usize / BITS_PER_PAGE;
        let last = (r.end as usize - 1) / BITS_PER_PAGE;
        self.dirty.extend(first..=last);
    }

    fn set(&mut self, r: Range<u64>) {
        self.bits.view_bits_mut::<Lsb0>()[r.start as usize..r.end as usize].fill(true);
        self.touch(r);
    }

    /// Writes every changed page into its older slot (not synced). On
    /// error nothing is forgotten: the pages stay changed, and their
    /// versions are kept, so the next try rewrites the same slots and never
    /// the last durable copy.
    fn write_dirty(&mut self, file: &File, key: &[u8; 32]) -> io::Result<()> {
        let mut slot = vec![0u8; PAGE];
        for &p in &self.dirty {
            let v = self.version[p] + 1;
            slot[..SLOT_BITS].copy_from_slice(&self.bits[p * SLOT_BITS..(p + 1) * SLOT_BITS]);
            slot[SLOT_BITS..SLOT_BITS + 8].copy_from_slice(&v.to_le_bytes());
            let sum = page_sum(key, self.kind, p, &slot);
            slot[SLOT_BITS + 8..].copy_from_slice(&sum);
            let at = self.off + ((2 * p + (v % 2) as usize) * PAGE) as u64;
            file.write_all_at(&slot, at)?;
        }
        Ok(())
    }

    /// The pages written by [`Map::write_dirty`] are done with.
    fn written(&mut self) {
        for p in std::mem::take(&mut self.dirty) {
            self.version[p] += 1;
        }
    }

    fn bitvec(&self, len: u64) -> BitVec {
        bits_from_bytes(&self.bits, len)
    }
}

/// The state file, with its bitmaps in memory.
#[derive(Debug)]
pub struct StateFile {
    file: File,
    path: PathBuf,
    key: [u8; 32],
    geo: Geometry,
    present: Map,
    guest: Map,
    written: Map,
    recovered: Vec<Range<u64>>,
    recovered_guest: Vec<u64>,
    verified: Option<Verified>,
    /// Runtime changes to the background copy, and the sequence number of
    /// their copy in the header (see [`crate::runtime`]).
    runtime: (RuntimeSettings, u64),
    /// The pre-copy record (see [`crate::precopy`]).
    precopy: Option<Precopy>,
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

fn page_key(source_id: &[u8; 32], pair: &[u8; 16]) -> [u8; 32] {
    let mut material = Vec::with_capacity(48);
    material.extend_from_slice(source_id);
    material.extend_from_slice(pair);
    blake3::derive_key("ferry state file v3 bitmap page", &material)
}

/// Offsets and page counts of the present, guest and written bitmaps, and
/// the file's length.
fn layout(geo: Geometry) -> ([(u64, usize); 3], u64) {
    let pb = map_pages(geo.blocks());
    let pg = map_pages(geo.chunks());
    let p = PAGE as u64;
    let g = p + Map::file_len(pb);
    let w = g + Map::file_len(pg);
    ([(p, pb), (g, pg), (w, pb)], w + Map::file_len(pb))
}

fn header(geo: Geometry, source_id: [u8; 32], pairing: Pairing) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&source_id);
    h.extend_from_slice(&geo.disk_size.to_le_bytes());
    h.extend_from_slice(&geo.chunk_size.to_le_bytes());
    h.extend_from_slice(&pairing.id);
    h.extend_from_slice(&pairing.inode.unwrap_or(0).to_le_bytes());
    h.push(if pairing.block_device {
        BIND_DEVICE
    } else if pairing.inode.is_some() {
        BIND_INODE
    } else {
        BIND_XATTR
    });
    debug_assert_eq!(h.len(), HEADER_BODY);
    let sum = *blake3::hash(&h).as_bytes();
    h.extend_from_slice(&sum);
    h.resize(PAGE, 0);
    h
}

/// Opens `path` read-write (creating it, owner-only, when `create`) and
/// locks it.
fn open_locked(path: &Path, create: bool) -> Result<File, StateError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |op| {
        move |source| StateError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true).mode(0o600);
    }
    let file = o.open(path).map_err(err(if create {
        "cannot create"
    } else {
        "cannot open"
    }))?;
    if create {
        // The mode asked for is masked by the umask: set it outright.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err("cannot set the mode of"))?;
    }
    match lock_exclusive(&file) {
        Ok(()) => Ok(file),
        Err(LockFail::Held(pid)) => Err(StateError::Locked {
            path: path.to_owned(),
            holder: describe_holder(pid),
        }),
        Err(LockFail::Io(source)) => Err(err("cannot lock")(source)),
    }
}

impl StateFile {
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

    /// Creates a new state file (fails if it exists) with every bit clear,
    /// owner-only and locked, for the backing file `pairing` names, and
    /// makes it durable (not its directory entry).
    pub fn create(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        pairing: Pairing,
    ) -> Result<Self, StateError> {
        Self::create_on_boot(path, geo, source_id, pairing, &current_boot_id())
    }

    /// [`StateFile::create`] as if on boot `boot`.
    pub fn create_on_boot(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        pairing: Pairing,
        boot: &str,
    ) -> Result<Self, StateError> {
        let io_err = |op| {
            move |source| StateError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let file = open_locked(path, true)?;
        let ([(po, pp), (go, gp), (wo, wp)], len) = layout(geo);
        file.set_len(len).map_err(io_err("cannot size"))?;
        file.write_all_at(&header(geo, source_id, pairing), 0)
            .map_err(io_err("cannot write"))?;
        Self::write_boot_id(&file, path, boot, false)?;
        file.sync_all().map_err(io_err("cannot sync"))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            key: page_key(&source_id, &pairing.id),
            geo,
            present: Map::new(0, po, pp),
            guest: Map::new(1, go, gp),
            written: Map::new(2, wo, wp),
            recovered: Vec::new(),
            recovered_guest: Vec::new(),
            verified: None,
            runtime: Default::default(),
            precopy: None,
        })
    }

    /// Reads and checks the header of the state file at `path` without
    /// changing anything: the geometry and source id it was made for, and
    /// whether the copy was complete and verified. A resumed pull serves
    /// the disk from these before (or without) reaching the source.
    pub fn peek(path: &Path) -> Result<StateHeader, StateError> {
        let file = File::open(path).map_err(|source| StateError::Io {
            op: "cannot open",
            path: path.to_owned(),
            source,
        })?;
        let h = Self::read_header(&file, path)?;
        let size = u64::from_le_bytes(h[44..52].try_into().expect("8 bytes"));
        let chunk = u32::from_le_bytes(h[52..56].try_into().expect("4 bytes"));
        if chunk == 0 || chunk % ferry_core::geometry::BLOCK_SIZE != 0 {
            return Err(StateError::Invalid {
                path: path.to_owned(),
                why: format!("bad chunk size {chunk}"),
            });
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

    /// How the migration of the state file at `path` ended, if it did
    /// (`ferry commit` or `ferry abort`), read without changing anything.
    pub fn peek_ended(path: &Path) -> Result<Option<Ended>, StateError> {
        let file = File::open(path).map_err(|source| StateError::Io {
            op: "cannot open",
            path: path.to_owned(),
            source,
        })?;
        Ok(Ended::decode(&Self::read_header(&file, path)?))
    }

    /// Records durably how the migration ended (see [`Ended`]).
    pub fn record_ended(&mut self, ended: &Ended) -> Result<(), StateError> {
        self.file
            .write_all_at(&ended.encode(), ENDED_AT as u64)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StateError::Io {
                op: "cannot record the migration's end in",
                path: self.path.clone(),
                source,
            })
    }

    /// Written bits, one per block (`blocks` long): blocks the guest wrote
    /// on this boot, acknowledged, synced or not (see the module
    /// documentation).
    pub fn written_bits(&self, blocks: u64) -> BitVec {
        self.written.bitvec(blocks)
    }

    /// The changes made at runtime to the background copy that are still
    /// in force (see [`StateFile::record_runtime_settings`]).
    pub fn runtime_settings(&self) -> RuntimeSettings {
        self.runtime.0
    }

    /// Records `settings` durably (written and synced when this returns),
    /// for `ferry background` changes to survive a restart. A failed write
    /// changes nothing in memory, so the next one rewrites the same copy,
    /// never the last durable one.
    pub fn record_runtime_settings(&mut self, settings: RuntimeSettings) -> Result<(), StateError> {
        let seq = self.runtime.1 + 1;
        self.file
            .write_all_at(&settings.encode(seq), RuntimeSettings::offset(seq))
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StateError::Io {
                op: "cannot record the background copy's settings in",
                path: self.path.clone(),
                source,
            })?;
        self.runtime = (settings, seq);
        Ok(())
    }

    /// The pre-copy record: the last generation of a live source's
    /// changes applied here, and whether the switchover is done; `None`
    /// if never recorded (or torn).
    pub fn precopy(&self) -> Option<Precopy> {
        self.precopy
    }

    /// Records `p` durably (written and synced when this returns). The
    /// changes it names must be durable in the bitmap already.
    pub fn record_precopy(&mut self, p: Precopy) -> Result<(), StateError> {
        self.file
            .write_all_at(&p.encode(), crate::precopy::PRECOPY_AT as u64)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StateError::Io {
                op: "cannot record the pre-copy's generation in",
                path: self.path.clone(),
                source,
            })?;
        self.precopy = Some(p);
        Ok(())
    }

    fn read_header(file: &File, path: &Path) -> Result<Vec<u8>, StateError> {
        let invalid = |why: &str| StateError::Invalid {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let mut h = vec![0u8; PAGE];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| invalid("shorter than its header"))?;
        if &h[..8] != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(invalid(&format!(
                "unsupported version {version} (this ferry reads version {VERSION}; a state file \
                 of an older ferry cannot be checked: start afresh)"
            )));
        }
        if blake3::hash(&h[..HEADER_BODY]).as_bytes() != &h[HEADER_BODY..HEADER_BODY + 32] {
            return Err(invalid("header checksum mismatch"));
        }
        Ok(h)
    }

    fn pairing_of(h: &[u8]) -> Pairing {
        let id: [u8; 16] = h[56..72].try_into().expect("16 bytes");
        let inode = u64::from_le_bytes(h[72..80].try_into().expect("8 bytes"));
        Pairing {
            id,
            inode: (h[80] == BIND_INODE).then_some(inode),
            block_device: h[80] == BIND_DEVICE,
        }
    }

    /// Opens an existing state file, locks it, and checks it belongs to
    /// this source and to `backing`, and that its bitmaps are intact.
    /// Guest writes acknowledged before a crash on this same boot are
    /// named by [`StateFile::recovered_writes`] and
    /// [`StateFile::recovered_guest_chunks`]; after a reboot they are
    /// discarded (see the module documentation).
    pub fn open(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        backing: &Backing,
    ) -> Result<Self, StateError> {
        Self::open_on_boot(path, geo, source_id, backing, &current_boot_id())
    }

    /// [`StateFile::open`] as if on boot `boot`.
    pub fn open_on_boot(
        path: &Path,
        geo: Geometry,
        source_id: [u8; 32],
        backing: &Backing,
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
        let file = open_locked(path, false)?;
        let h = Self::read_header(&file, path)?;
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
        let pairing = Self::pairing_of(&h);
        Self::check_pairing(path, pairing, backing)?;
        let ([(po, pp), (go, gp), (wo, wp)], len) = layout(geo);
        let found_len = file.metadata().map_err(io_err("cannot stat"))?.len();
        if found_len < len {
            return Err(invalid(&format!(
                "{found_len} bytes long, its bitmaps need {len}"
            )));
        }
        let key = page_key(&source_id, &pairing.id);
        let damaged = |map, pages: Vec<usize>| StateError::Damaged {
            path: path.to_owned(),
            map,
            pages: pages.into_iter().take(8).collect(),
        };
        let (present, bad) = Map::load(&file, &key, 0, po, pp).map_err(io_err("cannot read"))?;
        if !bad.is_empty() {
            return Err(damaged("present", bad));
        }
        let (guest, bad) = Map::load(&file, &key, 1, go, gp).map_err(io_err("cannot read"))?;
        if !bad.is_empty() {
            return Err(damaged("guest", bad));
        }
        let stored = String::from_utf8_lossy(&h[BOOT_ID_AT..BOOT_ID_AT + BOOT_ID_LEN])
            .trim_end_matches('\0')
            .to_string();
        let same_boot = !boot.is_empty() && stored == boot;
        let mut recovered: Vec<Range<u64>> = Vec::new();
        let mut recovered_guest: Vec<u64> = Vec::new();
        let written = if same_boot {
            // This boot's page cache wrote these pages: any damage is real.
            let (written, bad) =
                Map::load(&file, &key, 2, wo, wp).map_err(io_err("cannot read"))?;
            if !bad.is_empty() {
                return Err(damaged("written", bad));
            }
            let p = present.bits.view_bits::<Lsb0>();
            let g = guest.bits.view_bits::<Lsb0>();
            let w = written.bits.view_bits::<Lsb0>();
            for i in w.iter_ones().take_while(|i| (*i as u64) < geo.blocks()) {
                let b = i as u64;
                if !p[i] {
                    match recovered.last_mut() {
                        Some(r) if r.end == b => r.end += 1,
                        _ => recovered.push(b..b + 1),
                    }
                }
                let c = geo.chunk_of_block(b);
                if !g[c as usize] && recovered_guest.last() != Some(&c) {
                    recovered_guest.push(c);
                }
            }
            written
        } else {
            // Unflushed writes of another boot: gone with its page cache.
            // Their pages were never synced, so they are not even read.
            tracing::info!(path = %path.display(), "discarding unflushed guest writes from before a reboot, if any");
            crate::backing::punch_or_zero(&file, wo, Map::file_len(wp))
                .map_err(io_err("cannot clear"))?;
            Map::new(2, wo, wp)
        };
        Self::write_boot_id(&file, path, boot, true)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            key,
            geo,
            present,
            guest,
            written,
            recovered,
            recovered_guest,
            verified: Verified::decode(&h),
            runtime: RuntimeSettings::decode(&h),
            precopy: Precopy::decode(&h),
        })
    }

    fn check_pairing(path: &Path, pairing: Pairing, backing: &Backing) -> Result<(), StateError> {
        let not_paired = |why: String| StateError::NotPaired {
            path: path.to_owned(),
            backing: backing.path().to_owned(),
            why,
        };
        let read_err = |e: io::Error| StateError::Io {
            op: "cannot check the pair id against the backing file, for",
            path: path.to_owned(),
            source: e,
        };
        match (pairing.block_device, backing.is_block_device()) {
            (true, true) => return Ok(()),
            (true, false) => {
                return Err(not_paired(
                    "the state file was made for a block device, and this disk is a file".into(),
                ))
            }
            (false, true) => {
                return Err(not_paired(
                    "the state file was made for a disk in a file, and this disk is a block device"
                        .into(),
                ))
            }
            (false, false) => {}
        }
        match pairing.inode {
            None => match backing.pair_mark().map_err(read_err)? {
                PairMark::Id(id) if id == pairing.id => Ok(()),
                PairMark::Id(id) => Err(not_paired(format!(
                    "the backing file's pair id is {}, the state file's {}",
                    hex(&id),
                    hex(&pairing.id)
                ))),
                PairMark::Missing => Err(not_paired(
                    "the backing file carries no ferry pair id (extended attribute user.ferry.pair; \
                     copies must keep extended attributes)"
                        .into(),
                )),
                PairMark::Unsupported => Err(not_paired(
                    "the backing file's filesystem keeps no extended attributes, so it cannot \
                     carry the pair id the state file expects"
                        .into(),
                )),
            },
            Some(ino) => {
                let found = backing.inode().map_err(read_err)?;
                if found == ino {
                    Ok(())
                } else {
                    Err(not_paired(format!(
                        "the state file names the backing file of inode {ino}, this one is inode {found}"
                    )))
                }
            }
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Present bits, one per block (`blocks` long).
    pub fn present_bits(&self, blocks: u64) -> BitVec {
        self.present.bitvec(blocks)
    }

    /// Guest bits, one per chunk (`chunks` long).
    pub fn guest_bits(&self, chunks: u64) -> BitVec {
        self.guest.bitvec(chunks)
    }

    /// Runs of blocks the guest wrote (acknowledged, not flushed) before a
    /// crash of the pull on this boot, not yet present: the caller syncs the
    /// backing file and persists them as present before serving.
    pub fn recovered_writes(&self) -> &[Range<u64>] {
        &self.recovered
    }

    /// Chunks the guest wrote (acknowledged, not flushed) before a crash of
    /// the pull on this boot whose guest bit is not yet set, present blocks
    /// or not: the caller persists them with [`StateFile::persist`] along
    /// with [`StateFile::recovered_writes`], so their data is never compared
    /// with the source's (it is the guest's).
    pub fn recovered_guest_chunks(&self) -> &[u64] {
        &self.recovered_guest
    }

    /// Records guest writes of `blocks` as they are acknowledged: sets their
    /// written bits and writes the changed pages, without syncing.
    pub fn mark_written(&mut self, blocks: Range<u64>) -> Result<(), StateError> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.written.set(blocks);
        let res = self.written.write_dirty(&self.file, &self.key);
        match res {
            Ok(()) => {
                self.written.written();
                Ok(())
            }
            Err(source) => Err(StateError::Io {
                op: "cannot write",
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Persists a sync batch's bits. The caller has synced the backing file
    /// before (invariant 1). Writes only the changed pages, then syncs.
    pub fn persist(&mut self, batch: &SyncBatch) -> Result<(), StateError> {
        for r in &batch.blocks {
            self.present.set(r.clone());
        }
        for c in &batch.guest_chunks {
            self.guest.set(*c..*c + 1);
        }
        self.flush_dirty()
    }

    /// Clears the present bits of `blocks` (their data is to be fetched
    /// again) and makes that durable.
    pub fn clear_present(&mut self, blocks: &[Range<u64>]) -> Result<(), StateError> {
        for r in blocks {
            self.present.bits.view_bits_mut::<Lsb0>()[r.start as usize..r.end as usize].fill(false);
            self.present.touch(r.clone());
        }
        self.flush_dirty()
    }

    fn flush_dirty(&mut self) -> Result<(), StateError> {
        if self.present.dirty.is_empty() && self.guest.dirty.is_empty() {
            return Ok(());
        }
        let res = self
            .present
            .write_dirty(&self.file, &self.key)
            .and_then(|()| self.guest.write_dirty(&self.file, &self.key))
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.present.written();
                self.guest.written();
                Ok(())
            }
            Err(source) => Err(StateError::Io {
                op: "cannot write and sync",
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The geometry it was opened with.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backing file and a pairing bound to it.
    fn backing(dir: &Path, name: &str, geo: Geometry) -> (Backing, Pairing) {
        let b = Backing::create(&dir.join(name), geo.disk_size).unwrap();
        let p = Pairing::bind(&b).unwrap();
        (b, p)
    }

    fn overwrite(path: &Path, off: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, off).unwrap();
    }

    #[test]
    fn persisted_bits_survive_reopen_and_other_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(100 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [1; 32], pairing).unwrap();
        s.persist(&SyncBatch {
            blocks: vec![3..5, 20000..20001],
            guest_chunks: vec![7],
        })
        .unwrap();
        drop(s);
        let s = StateFile::open(&p, geo, [1; 32], &b).unwrap();
        let bits = s.present_bits(geo.blocks());
        assert_eq!(bits.count_ones(), 3);
        assert!(bits[3] && bits[4] && bits[20000]);
        assert!(s.guest_bits(geo.chunks())[7]);
        drop(s);
        let e = StateFile::open(&p, geo, [2; 32], &b).unwrap_err();
        assert!(matches!(e, StateError::OtherSource { .. }), "{e}");
        let before = std::fs::read(&p).unwrap();
        let e = StateFile::open(&p, Geometry::new(200 << 20, 65536), [1; 32], &b).unwrap_err();
        assert!(e.to_string().contains("geometry"), "{e}");
        assert_eq!(
            before,
            std::fs::read(&p).unwrap(),
            "a refused open changed the file"
        );
        std::fs::write(dir.path().join("junk"), b"hello").unwrap();
        assert!(StateFile::open(&dir.path().join("junk"), geo, [1; 32], &b).is_err());
    }

    #[test]
    fn the_header_and_the_verified_record_read_without_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(40 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [9; 32], pairing).unwrap();
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
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
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
    fn the_end_of_a_migration_is_recorded_and_a_torn_record_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(40 << 20, 65536);
        let (_b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [9; 32], pairing).unwrap();
        assert_eq!(StateFile::peek_ended(&p).unwrap(), None);
        let aborted = Ended::Aborted {
            at_unix: 1_800_000_000,
            writes: dir.path().join("d.ferry-writes"),
        };
        s.record_ended(&aborted).unwrap();
        assert_eq!(StateFile::peek_ended(&p).unwrap(), Some(aborted));
        let committed = Ended::Committed { at_unix: 7 };
        s.record_ended(&committed).unwrap();
        drop(s);
        assert_eq!(StateFile::peek_ended(&p).unwrap(), Some(committed));
        // The header and the verified record are untouched by it.
        assert_eq!(StateFile::peek(&p).unwrap().verified, None);
        overwrite(&p, (ENDED_AT + 10) as u64, &[0xff]);
        assert_eq!(StateFile::peek_ended(&p).unwrap(), None);
        // A path too long to record is left out, not cut.
        let long = Ended::Aborted {
            at_unix: 1,
            writes: PathBuf::from("x".repeat(ENDED_PATH_MAX + 1)),
        };
        let b = long.encode();
        let mut page = vec![0u8; PAGE];
        page[ENDED_AT..ENDED_AT + b.len()].copy_from_slice(&b);
        assert_eq!(
            Ended::decode(&page),
            Some(Ended::Aborted {
                at_unix: 1,
                writes: PathBuf::new()
            })
        );
    }

    #[test]
    fn the_precopy_record_survives_reopen_and_a_torn_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(40 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [9; 32], pairing).unwrap();
        assert_eq!(s.precopy(), None);
        let pre = Precopy {
            generation: 7,
            switched: true,
        };
        s.record_precopy(pre).unwrap();
        s.record_runtime_settings(RuntimeSettings::default())
            .unwrap();
        drop(s);
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
        assert_eq!(s.precopy(), Some(pre));
        drop(s);
        // A torn record (one byte of it changed) is not trusted.
        overwrite(&p, crate::precopy::PRECOPY_AT as u64 + 9, &[0xee]);
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
        assert_eq!(s.precopy(), None);
    }

    #[test]
    fn runtime_settings_survive_reopen_beside_the_other_header_records() {
        use crate::runtime::RuntimeSetting;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(40 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [9; 32], pairing).unwrap();
        assert_eq!(s.runtime_settings(), RuntimeSettings::default());
        let paused = RuntimeSettings {
            paused: Some(RuntimeSetting {
                value: true,
                set_at_unix: 1_700_000_000,
                command_line: false,
            }),
            rate: None,
        };
        s.record_runtime_settings(paused).unwrap();
        let both = RuntimeSettings {
            rate: Some(RuntimeSetting {
                value: 50_000_000,
                set_at_unix: 1_700_000_001,
                command_line: 16 << 20,
            }),
            ..paused
        };
        s.record_runtime_settings(both).unwrap();
        let v = Verified {
            disk_blake3: [3; 32],
            chunks_checked: 17,
        };
        s.record_verified(v).unwrap();
        drop(s);
        // Reopened on another boot: the boot id is rewritten, and neither
        // it nor the verified record touches the settings, nor they them.
        let mut s = StateFile::open_on_boot(&p, geo, [9; 32], &b, "other boot").unwrap();
        assert_eq!(s.runtime_settings(), both);
        assert_eq!(s.verified(), Some(v));
        assert_eq!(StateFile::peek(&p).unwrap().verified, Some(v));
        // The newer copy torn (as by a power cut mid-write): the older
        // one, as of the last completed change, is read.
        s.record_runtime_settings(RuntimeSettings::default())
            .unwrap();
        drop(s);
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
        assert_eq!(s.runtime_settings(), RuntimeSettings::default());
        drop(s);
        overwrite(&p, RuntimeSettings::offset(3) + 30, &[0xee]);
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
        assert_eq!(s.runtime_settings(), both);
    }

    #[test]
    fn acknowledged_writes_are_recovered_on_the_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(64 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create_on_boot(&p, geo, [1; 32], pairing, "boot-a").unwrap();
        s.persist(&SyncBatch {
            blocks: vec![0..4, 1600..1616],
            guest_chunks: vec![],
        })
        .unwrap();
        s.mark_written(2..10).unwrap();
        s.mark_written(100..101).unwrap();
        // A write to blocks already present (chunk 100): nothing to adopt
        // as present, but the chunk is the guest's now.
        s.mark_written(1600..1601).unwrap();
        drop(s); // a crash: nothing synced
        let s = StateFile::open_on_boot(&p, geo, [1; 32], &b, "boot-a").unwrap();
        assert_eq!(s.recovered_writes(), &[4..10, 100..101]);
        assert_eq!(s.recovered_guest_chunks(), &[0, 6, 100]);
        drop(s);
        // After a reboot they are gone, for good.
        let s = StateFile::open_on_boot(&p, geo, [1; 32], &b, "boot-b").unwrap();
        assert!(s.recovered_writes().is_empty());
        assert!(s.recovered_guest_chunks().is_empty());
        drop(s);
        let s = StateFile::open_on_boot(&p, geo, [1; 32], &b, "boot-b").unwrap();
        assert!(s.recovered_writes().is_empty());
        drop(s);
        // An unknown boot never adopts them.
        let mut s = StateFile::open_on_boot(&p, geo, [1; 32], &b, "").unwrap();
        s.mark_written(7..8).unwrap();
        drop(s);
        let s = StateFile::open_on_boot(&p, geo, [1; 32], &b, "").unwrap();
        assert!(s.recovered_writes().is_empty());
    }

    #[test]
    fn large_map_roundtrips_its_last_bit() {
        // 64 GiB at 4 KiB blocks: a 2 MiB bitmap, several pages. Behaviour
        // only; the time to open a 1 TiB map is measured by the map_resume
        // example.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(64 << 30, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let mut s = StateFile::create(&p, geo, [9; 32], pairing).unwrap();
        let last = geo.blocks() - 1;
        let edge = BITS_PER_PAGE as u64;
        s.persist(&SyncBatch {
            blocks: vec![edge - 1..edge + 1, last..last + 1],
            guest_chunks: vec![],
        })
        .unwrap();
        drop(s);
        let s = StateFile::open(&p, geo, [9; 32], &b).unwrap();
        let bits = s.present_bits(geo.blocks());
        assert!(bits[last as usize]);
        assert!(bits[edge as usize - 1] && bits[edge as usize]);
        assert_eq!(bits.count_ones(), 3);
    }

    /// Defect: a bitmap overwritten with 0xff was taken at its word (the
    /// guest read wrong blocks; every block adopted as a guest write;
    /// nothing verified).
    #[test]
    fn a_bitmap_overwritten_with_ones_is_refused_as_damaged() {
        let geo = Geometry::new(64 << 20, 65536);
        let ([(po, _), (go, _), (wo, _)], _) = layout(geo);
        for (map, off) in [("present", po), ("guest", go), ("written", wo)] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s");
            let (b, pairing) = backing(dir.path(), "d", geo);
            let mut s = StateFile::create_on_boot(&p, geo, [1; 32], pairing, "boot-a").unwrap();
            s.persist(&SyncBatch {
                blocks: vec![0..64],
                guest_chunks: vec![1],
            })
            .unwrap();
            s.mark_written(5..6).unwrap();
            drop(s);
            // Both slots of the first page, as a blind `dd` would.
            overwrite(&p, off, &vec![0xff; 2 * PAGE]);
            let e = StateFile::open_on_boot(&p, geo, [1; 32], &b, "boot-a").unwrap_err();
            assert!(
                matches!(&e, StateError::Damaged { map: m, .. } if *m == map),
                "{map}: {e}"
            );
            assert!(e.to_string().contains("damaged"), "{e}");
        }
    }

    #[test]
    fn a_torn_page_write_falls_back_to_the_pages_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(64 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let ([(po, _), _, _], _) = layout(geo);
        let mut s = StateFile::create(&p, geo, [1; 32], pairing).unwrap();
        s.persist(&SyncBatch {
            blocks: vec![0..8],
            guest_chunks: vec![],
        })
        .unwrap(); // version 1, slot 1
        s.persist(&SyncBatch {
            blocks: vec![8..16],
            guest_chunks: vec![],
        })
        .unwrap(); // version 2, slot 0
        drop(s);
        // The next round's write of slot 1 torn by a power cut: half of it
        // new (version 3), half stale.
        let mut torn = vec![0u8; PAGE];
        torn[..2048].fill(0xff);
        torn[SLOT_BITS..SLOT_BITS + 8].copy_from_slice(&3u64.to_le_bytes());
        overwrite(&p, po + PAGE as u64, &torn);
        let s = StateFile::open(&p, geo, [1; 32], &b).unwrap();
        let bits = s.present_bits(geo.blocks());
        assert_eq!(bits.count_ones(), 16, "version 2 is the one to use");
        assert!(bits[..16].all());
        drop(s);
        // Tearing the other slot as well is damage.
        overwrite(&p, po, &torn);
        assert!(matches!(
            StateFile::open(&p, geo, [1; 32], &b),
            Err(StateError::Damaged { .. })
        ));
    }

    /// Defect: another destination's state file of the same source was
    /// accepted, and the guest read zeros where its map said present.
    #[test]
    fn a_state_file_of_another_backing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let geo = Geometry::new(16 << 20, 65536);
        let (a, pa) = backing(dir.path(), "a", geo);
        let (b, pb) = backing(dir.path(), "b", geo);
        let sa = dir.path().join("a.st");
        drop(StateFile::create(&sa, geo, [1; 32], pa).unwrap());
        drop(StateFile::create(&dir.path().join("b.st"), geo, [1; 32], pb).unwrap());
        let e = StateFile::open(&sa, geo, [1; 32], &b).unwrap_err();
        assert!(matches!(e, StateError::NotPaired { .. }), "{e}");
        assert!(e.to_string().contains("does not belong"), "{e}");
        // A page copied from the other file fails its checksum too.
        drop(StateFile::open(&sa, geo, [1; 32], &a).unwrap());
    }

    #[test]
    fn files_are_owner_only_and_a_second_open_is_refused_while_locked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let geo = Geometry::new(16 << 20, 65536);
        let (b, pairing) = backing(dir.path(), "d", geo);
        let s = StateFile::create(&p, geo, [1; 32], pairing).unwrap();
        for f in [&p, &dir.path().join("d")] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let e = StateFile::open(&p, geo, [1; 32], &b).unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        let e = Backing::open(&dir.path().join("d"), geo.disk_size).unwrap_err();
        assert!(matches!(e, crate::BackingError::Locked { .. }), "{e}");
        drop(s);
        drop(StateFile::open(&p, geo, [1; 32], &b).unwrap());
    }
}
