//! The manifest of a source disk: its geometry, its id and, for every
//! chunk, whether it holds only zeros (or is unallocated), data with a
//! BLAKE3 hash, or allocated data whose hash the source has not computed
//! yet.
//!
//! The source builds its first manifest without reading any data (holes
//! from SEEK_DATA/SEEK_HOLE are zero chunks, allocated ranges are
//! [`ChunkKind::Unhashed`] unless its hash cache knows them) and learns a
//! chunk's hash when it first reads it to send it. The destination receives
//! the manifest when it connects, never fetches zero chunks (invariant 7)
//! and checks every fetched chunk against its hash before marking it
//! present (invariant 5): the manifest's hash for [`ChunkKind::Data`], the
//! hash sent with the chunk for [`ChunkKind::Unhashed`]. Verification asks
//! for the complete manifest ([`Manifest::is_complete`]) at the end.
//! [`Manifest::source_id`] identifies the source (a random id the source
//! keeps beside the image while the image is unchanged): a state file made
//! for one source is refused for another.

use crate::geometry::Geometry;

/// What a chunk of the source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Only zeros, or unallocated: never crosses the wire.
    Zero,
    /// Data, with the BLAKE3 hash of the chunk's bytes.
    Data([u8; 32]),
    /// Allocated at the source but not read yet: data (or written zeros)
    /// whose hash the source has not computed. The source sends the hash
    /// with the chunk's bytes (or a `Zero` answer); the complete manifest
    /// has none of these.
    Unhashed,
}

impl ChunkKind {
    /// What a chunk's bytes are: only zeros, or data with their hash.
    pub fn of(data: &[u8]) -> Self {
        if data.iter().all(|b| *b == 0) {
            ChunkKind::Zero
        } else {
            ChunkKind::Data(*blake3::hash(data).as_bytes())
        }
    }

    /// Whether the chunk may hold data (it has to be fetched).
    pub fn is_allocated(self) -> bool {
        !matches!(self, ChunkKind::Zero)
    }
}

/// Errors decoding a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The encoding ended early.
    #[error("manifest truncated at byte {0}")]
    Truncated(usize),
    /// The encoding is inconsistent.
    #[error("manifest malformed: {0}")]
    Malformed(&'static str),
    /// Bytes left over after the manifest.
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
}

/// The manifest of a source disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    geometry: Geometry,
    chunks: Vec<ChunkKind>,
    source_id: [u8; 32],
    /// Bytes in data and unhashed chunks, counted once (status reports ask
    /// often).
    data_bytes: u64,
}

const MAGIC: &[u8; 8] = b"FERRYMF2";
/// Magic, disk size, chunk size, chunk count, source id.
const HEADER_LEN: usize = 8 + 8 + 4 + 8 + 32;

impl Manifest {
    /// A manifest from a geometry and one kind per chunk, whose source id
    /// is the hash of its encoding (for sources whose content is fixed and
    /// known, e.g. in tests).
    ///
    /// # Panics
    /// If `chunks.len()` differs from `geometry.chunks()`.
    pub fn new(geometry: Geometry, chunks: Vec<ChunkKind>) -> Self {
        let mut m = Self::with_source_id(geometry, chunks, [0; 32]);
        m.source_id = *blake3::hash(&m.encode()).as_bytes();
        m
    }

    /// A manifest with the given source id.
    ///
    /// # Panics
    /// If `chunks.len()` differs from `geometry.chunks()`.
    pub fn with_source_id(geometry: Geometry, chunks: Vec<ChunkKind>, source_id: [u8; 32]) -> Self {
        assert_eq!(chunks.len() as u64, geometry.chunks());
        let data_bytes = (0..geometry.chunks())
            .filter(|&c| chunks[c as usize].is_allocated())
            .map(|c| u64::from(geometry.chunk_len(c)))
            .sum();
        Self {
            geometry,
            chunks,
            source_id,
            data_bytes,
        }
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Kind of chunk `chunk`.
    pub fn chunk(&self, chunk: u64) -> ChunkKind {
        self.chunks[chunk as usize]
    }

    /// All chunk kinds in order.
    pub fn chunks(&self) -> &[ChunkKind] {
        &self.chunks
    }

    /// Sets what chunk `chunk` holds (the source learned its hash).
    pub fn set_chunk(&mut self, chunk: u64, kind: ChunkKind) {
        let len = u64::from(self.geometry.chunk_len(chunk));
        let old = std::mem::replace(&mut self.chunks[chunk as usize], kind);
        match (old.is_allocated(), kind.is_allocated()) {
            (true, false) => self.data_bytes -= len,
            (false, true) => self.data_bytes += len,
            _ => {}
        }
    }

    /// Identifies the source (see the module documentation).
    pub fn source_id(&self) -> [u8; 32] {
        self.source_id
    }

    /// Bytes in chunks that may hold data (data and unhashed chunks).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Chunks whose hash is not known yet.
    pub fn unhashed(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| matches!(c, ChunkKind::Unhashed))
            .count() as u64
    }

    /// Whether every chunk is known: zero or data with its hash.
    pub fn is_complete(&self) -> bool {
        self.unhashed() == 0
    }

    /// Checks that `self`, a later manifest of the same source, can follow
    /// `earlier`: same geometry and id, every zero chunk still zero, every
    /// data chunk still with its hash (an unhashed one may have become
    /// anything). `Err` names the first chunk that differs.
    pub fn follows(&self, earlier: &Manifest) -> Result<(), String> {
        if self.geometry != earlier.geometry || self.source_id != earlier.source_id {
            return Err("another geometry or source id".into());
        }
        for (c, (now, before)) in self.chunks.iter().zip(&earlier.chunks).enumerate() {
            let ok = match before {
                ChunkKind::Unhashed => true,
                _ => now == before,
            };
            if !ok {
                return Err(format!("chunk {c} was {before:?}, is now {now:?}"));
            }
        }
        Ok(())
    }

    /// The largest encoding of a manifest of `geometry` whose first
    /// version had `allocated` data or unhashed chunks: later versions
    /// only turn unhashed chunks into data or zero ones.
    pub fn max_encoded_len(geometry: Geometry, allocated: u64) -> u64 {
        HEADER_LEN as u64 + geometry.chunks().div_ceil(4) + 32 * allocated
    }

    /// Encodes: magic, disk size, chunk size, chunk count, source id, two
    /// bits per chunk (0 zero, 1 data, 2 unhashed), then the hashes of the
    /// data chunks in order.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.chunks.len();
        let data = self
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkKind::Data(_)))
            .count();
        let mut out = Vec::with_capacity(HEADER_LEN + n.div_ceil(4) + 32 * data);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.geometry.disk_size.to_le_bytes());
        out.extend_from_slice(&self.geometry.chunk_size.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&self.source_id);
        let mut kinds = vec![0u8; n.div_ceil(4)];
        for (i, c) in self.chunks.iter().enumerate() {
            let k = match c {
                ChunkKind::Zero => 0,
                ChunkKind::Data(_) => 1,
                ChunkKind::Unhashed => 2,
            };
            kinds[i / 4] |= k << (2 * (i % 4));
        }
        out.extend_from_slice(&kinds);
        for c in &self.chunks {
            if let ChunkKind::Data(h) = c {
                out.extend_from_slice(h);
            }
        }
        out
    }

    /// Decodes what [`Manifest::encode`] made.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], ManifestError> {
            let s = pos
                .checked_add(n)
                .and_then(|end| bytes.get(pos..end))
                .ok_or(ManifestError::Truncated(bytes.len()))?;
            pos += n;
            Ok(s)
        };
        if take(8)? != MAGIC {
            return Err(ManifestError::Malformed("bad magic"));
        }
        let disk_size = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let chunk_size = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let n = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let source_id: [u8; 32] = take(32)?.try_into().expect("32 bytes");
        if chunk_size < crate::geometry::BLOCK_SIZE
            || !chunk_size.is_multiple_of(crate::geometry::BLOCK_SIZE)
            || chunk_size > 64 * 1024 * 1024
        {
            return Err(ManifestError::Malformed("bad chunk size"));
        }
        let geometry = Geometry::new(disk_size, chunk_size);
        if n != geometry.chunks() {
            return Err(ManifestError::Malformed("chunk count does not match size"));
        }
        let n = usize::try_from(n).map_err(|_| ManifestError::Malformed("too many chunks"))?;
        let kinds = take(n.div_ceil(4))?.to_vec();
        let mut chunks = Vec::with_capacity(n);
        for i in 0..n {
            chunks.push(match (kinds[i / 4] >> (2 * (i % 4))) & 3 {
                0 => ChunkKind::Zero,
                1 => ChunkKind::Data(take(32)?.try_into().expect("32 bytes")),
                2 => ChunkKind::Unhashed,
                _ => return Err(ManifestError::Malformed("unknown chunk kind")),
            });
        }
        // The unused bits of the last byte are zero.
        if n % 4 != 0 && kinds[n / 4] >> (2 * (n % 4)) != 0 {
            return Err(ManifestError::Malformed("padding bits set"));
        }
        if pos != bytes.len() {
            return Err(ManifestError::Trailing(bytes.len() - pos));
        }
        Ok(Self::with_source_id(geometry, chunks, source_id))
    }
}

/// A source's manifest as it learns hashes, shared between the threads
/// that read chunks: each chunk read to be sent for the first time has its
/// kind filled in ([`SharedManifest::learn`]).
#[derive(Debug)]
pub struct SharedManifest {
    geometry: Geometry,
    source_id: [u8; 32],
    inner: std::sync::Mutex<Inner>,
    /// Bumped by every [`SharedManifest::learn`] that changed a chunk.
    version: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Inner {
    manifest: Manifest,
    /// Bumped when a write through a presented device begins and ends
    /// ([`SharedManifest::begin_write`]).
    writes: u64,
    /// Writes begun and not yet ended.
    writing: u64,
}

/// What a reader saw of the writes to a live source before it read
/// ([`SharedManifest::token`]): a hash it computes may be learned, and a
/// known hash trusted for the bytes it read, only if no write ran
/// meanwhile ([`SharedManifest::steady_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadToken {
    writes: u64,
    writing: u64,
}

impl SharedManifest {
    /// Starts from `first` (the manifest the source begins with).
    pub fn new(first: Manifest) -> Self {
        Self {
            geometry: first.geometry(),
            source_id: first.source_id(),
            inner: std::sync::Mutex::new(Inner {
                manifest: first,
                writes: 0,
                writing: 0,
            }),
            version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The source's id.
    pub fn source_id(&self) -> [u8; 32] {
        self.source_id
    }

    /// What is known of chunk `chunk` now.
    pub fn chunk(&self, chunk: u64) -> ChunkKind {
        self.lock().manifest.chunk(chunk)
    }

    /// The manifest as known now.
    pub fn snapshot(&self) -> Manifest {
        self.lock().manifest.clone()
    }

    /// The source read chunk `chunk` and found `kind` (data with its hash,
    /// or only zeros). Only an unhashed chunk is changed: what was known
    /// stays as it was. Returns whether the chunk changed. On a live
    /// source use [`SharedManifest::learn_read`].
    pub fn learn(&self, chunk: u64, kind: ChunkKind) -> bool {
        let mut inner = self.lock();
        Self::learn_locked(&mut inner, &self.version, chunk, kind)
    }

    fn learn_locked(
        inner: &mut Inner,
        version: &std::sync::atomic::AtomicU64,
        chunk: u64,
        kind: ChunkKind,
    ) -> bool {
        if inner.manifest.chunk(chunk) != ChunkKind::Unhashed || kind == ChunkKind::Unhashed {
            return false;
        }
        inner.manifest.set_chunk(chunk, kind);
        version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Taken before reading chunks of a live source: see [`ReadToken`].
    pub fn token(&self) -> ReadToken {
        let inner = self.lock();
        ReadToken {
            writes: inner.writes,
            writing: inner.writing,
        }
    }

    /// Whether no write to the source began, ran or ended since `token`
    /// was taken: bytes read since then are what the manifest describes.
    pub fn steady_since(&self, token: ReadToken) -> bool {
        let inner = self.lock();
        token.writing == 0 && inner.writing == 0 && inner.writes == token.writes
    }

    /// [`SharedManifest::learn`] for a chunk read after `token` was taken:
    /// learned only if no write ran meanwhile (a hash of bytes a write
    /// replaced, or of a torn mix, must never be learned).
    pub fn learn_read(&self, chunk: u64, kind: ChunkKind, token: ReadToken) -> bool {
        let mut inner = self.lock();
        if token.writing != 0 || inner.writing != 0 || inner.writes != token.writes {
            return false;
        }
        Self::learn_locked(&mut inner, &self.version, chunk, kind)
    }

    /// A write to `chunks` begins (a live source: the VM writes through
    /// ferry's presented device): their hashes are forgotten (unhashed),
    /// and no hash is learned until [`SharedManifest::end_write`].
    pub fn begin_write(&self, chunks: std::ops::Range<u64>) {
        let mut inner = self.lock();
        inner.writing += 1;
        inner.writes += 1;
        for c in chunks {
            inner.manifest.set_chunk(c, ChunkKind::Unhashed);
        }
    }

    /// The write begun by [`SharedManifest::begin_write`] on `chunks`
    /// ended: their hashes are forgotten again (anything learned while it
    /// ran may describe the old bytes).
    pub fn end_write(&self, chunks: std::ops::Range<u64>) {
        let mut inner = self.lock();
        inner.writing = inner.writing.saturating_sub(1);
        inner.writes += 1;
        for c in chunks {
            inner.manifest.set_chunk(c, ChunkKind::Unhashed);
        }
    }

    /// How many chunks were learned so far (a saver compares it with what
    /// it last saved).
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let g = Geometry::new(4 * 65536 + 100, 65536);
        Manifest::new(
            g,
            vec![
                ChunkKind::Data([1; 32]),
                ChunkKind::Zero,
                ChunkKind::Unhashed,
                ChunkKind::Zero,
                ChunkKind::Data([9; 32]),
            ],
        )
    }

    #[test]
    fn roundtrip_and_identity() {
        let m = sample();
        let d = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.chunk(2), ChunkKind::Unhashed);
        assert_eq!(m.data_bytes(), 2 * 65536 + 100);
        assert_eq!(m.unhashed(), 1);
        assert!(!m.is_complete());
        let other = Manifest::new(m.geometry(), vec![ChunkKind::Zero; 5]);
        assert_ne!(other.source_id(), m.source_id());
        // The id is carried as given, not recomputed.
        let given = Manifest::with_source_id(m.geometry(), m.chunks().to_vec(), [5; 32]);
        assert_eq!(
            Manifest::decode(&given.encode()).unwrap().source_id(),
            [5; 32]
        );
        assert!(
            given.encode().len() as u64 <= Manifest::max_encoded_len(m.geometry(), 3),
            "bound"
        );
    }

    #[test]
    fn three_kinds_each_encode_as_two_bits() {
        // Every kind at every position of a byte, and a trailing partial
        // byte: each decodes as what was encoded.
        let kinds = [
            ChunkKind::Zero,
            ChunkKind::Data([7; 32]),
            ChunkKind::Unhashed,
        ];
        let chunks: Vec<ChunkKind> = (0..11).map(|i| kinds[(i * 5 + i / 3) % 3]).collect();
        let g = Geometry::new(11 * 4096, 4096);
        let m = Manifest::with_source_id(g, chunks.clone(), [1; 32]);
        let e = m.encode();
        let data = chunks
            .iter()
            .filter(|c| matches!(c, ChunkKind::Data(_)))
            .count();
        assert_eq!(data, 3);
        assert_eq!(e.len(), HEADER_LEN + 3 + 32 * data);
        assert_eq!(Manifest::decode(&e).unwrap().chunks(), &chunks[..]);
        // Kind 3 is not one, and padding bits must be clear.
        let mut bad = e.clone();
        bad[HEADER_LEN] |= 3;
        assert!(Manifest::decode(&bad).is_err());
        let mut pad = e.clone();
        pad[HEADER_LEN + 2] |= 0x80;
        assert_eq!(
            Manifest::decode(&pad),
            Err(ManifestError::Malformed("padding bits set"))
        );
    }

    #[test]
    fn learned_hashes_follow_and_changes_do_not() {
        let first = sample();
        let mut later = first.clone();
        later.set_chunk(2, ChunkKind::Data([3; 32]));
        assert!(later.is_complete());
        assert_eq!(later.data_bytes(), first.data_bytes());
        assert_eq!(later.follows(&first), Ok(()));
        let mut zeroed = first.clone();
        zeroed.set_chunk(2, ChunkKind::Zero);
        assert_eq!(zeroed.data_bytes(), 65536 + 100);
        assert_eq!(zeroed.follows(&first), Ok(()));
        // A hole that became data, or data with another hash: changed.
        let mut hole = later.clone();
        hole.set_chunk(1, ChunkKind::Data([4; 32]));
        assert!(hole.follows(&first).unwrap_err().contains("chunk 1"));
        let mut rehashed = later.clone();
        rehashed.set_chunk(0, ChunkKind::Data([8; 32]));
        assert!(rehashed.follows(&first).unwrap_err().contains("chunk 0"));
    }

    #[test]
    fn a_shared_manifest_learns_only_unhashed_chunks() {
        let s = SharedManifest::new(sample());
        assert!(!s.learn(0, ChunkKind::Data([2; 32])), "known data stays");
        assert!(!s.learn(1, ChunkKind::Data([2; 32])), "a hole stays");
        assert_eq!(s.version(), 0);
        assert!(s.learn(2, ChunkKind::Data([2; 32])));
        assert!(!s.learn(2, ChunkKind::Zero), "learned once");
        assert_eq!(s.version(), 1);
        assert_eq!(s.chunk(2), ChunkKind::Data([2; 32]));
        assert!(s.snapshot().is_complete());
        assert_eq!(s.source_id(), sample().source_id());
    }

    #[test]
    fn truncated_and_trailing_are_rejected() {
        let e = sample().encode();
        for cut in 0..e.len() {
            assert!(Manifest::decode(&e[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = e.clone();
        long.push(0);
        assert_eq!(Manifest::decode(&long), Err(ManifestError::Trailing(1)));
    }

    #[test]
    fn a_hash_read_while_a_write_ran_is_never_learned() {
        let s = SharedManifest::new(sample());
        // A write forgets the hash of a known chunk.
        let t = s.token();
        s.begin_write(0..1);
        assert_eq!(s.chunk(0), ChunkKind::Unhashed);
        assert!(!s.steady_since(t));
        // Read while it runs: not learned, before or after it ends.
        let during = s.token();
        assert!(!s.learn_read(0, ChunkKind::Data([5; 32]), during));
        s.end_write(0..1);
        assert!(!s.learn_read(0, ChunkKind::Data([5; 32]), during));
        assert!(!s.learn_read(0, ChunkKind::Data([5; 32]), t));
        assert_eq!(s.chunk(0), ChunkKind::Unhashed);
        // Read after it ended: learned.
        let after = s.token();
        assert!(s.steady_since(after));
        assert!(s.learn_read(0, ChunkKind::Data([6; 32]), after));
        assert_eq!(s.chunk(0), ChunkKind::Data([6; 32]));
        // A zero chunk written becomes unhashed too.
        s.begin_write(1..2);
        s.end_write(1..2);
        assert_eq!(s.chunk(1), ChunkKind::Unhashed);
    }
}
