//! The manifest of a source disk: its geometry and, for every chunk, whether
//! it holds only zeros (or is unallocated) or data with a BLAKE3 hash.
//!
//! The source computes it once (and caches it); the destination receives it
//! when it connects, never fetches zero chunks (invariant 7) and checks every
//! fetched chunk against its hash before marking it present (invariant 5).
//! [`Manifest::source_id`] identifies the source's content: a state file made
//! for one source is refused for another.

use crate::geometry::Geometry;

/// What a chunk of the source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Only zeros, or unallocated: never crosses the wire.
    Zero,
    /// Data, with the BLAKE3 hash of the chunk's bytes.
    Data([u8; 32]),
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
    /// Bytes in data chunks, counted once (status reports ask often).
    data_bytes: u64,
}

const MAGIC: &[u8; 8] = b"FERRYMF1";

impl Manifest {
    /// A manifest from a geometry and one kind per chunk.
    ///
    /// # Panics
    /// If `chunks.len()` differs from `geometry.chunks()`.
    pub fn new(geometry: Geometry, chunks: Vec<ChunkKind>) -> Self {
        assert_eq!(chunks.len() as u64, geometry.chunks());
        let data_bytes = (0..geometry.chunks())
            .filter(|&c| matches!(chunks[c as usize], ChunkKind::Data(_)))
            .map(|c| u64::from(geometry.chunk_len(c)))
            .sum();
        let mut m = Self {
            geometry,
            chunks,
            source_id: [0; 32],
            data_bytes,
        };
        m.source_id = *blake3::hash(&m.encode()).as_bytes();
        m
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

    /// Hash of the whole manifest: identifies the source's content.
    pub fn source_id(&self) -> [u8; 32] {
        self.source_id
    }

    /// Bytes in data (non-zero) chunks.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Encodes: magic, disk size, chunk size, chunk count, a bitmap of data
    /// chunks, then the hashes of the data chunks in order.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.chunks.len();
        let data = self
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkKind::Data(_)))
            .count();
        let mut out = Vec::with_capacity(28 + n.div_ceil(8) + 32 * data);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.geometry.disk_size.to_le_bytes());
        out.extend_from_slice(&self.geometry.chunk_size.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        for (i, c) in self.chunks.iter().enumerate() {
            if matches!(c, ChunkKind::Data(_)) {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bitmap);
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
            let s = bytes
                .get(pos..pos + n)
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
        let bitmap = take(n.div_ceil(8))?.to_vec();
        let mut chunks = Vec::with_capacity(n);
        for i in 0..n {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                chunks.push(ChunkKind::Data(take(32)?.try_into().expect("32 bytes")));
            } else {
                chunks.push(ChunkKind::Zero);
            }
        }
        if pos != bytes.len() {
            return Err(ManifestError::Trailing(bytes.len() - pos));
        }
        Ok(Self::new(geometry, chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let g = Geometry::new(3 * 65536 + 100, 65536);
        Manifest::new(
            g,
            vec![
                ChunkKind::Data([1; 32]),
                ChunkKind::Zero,
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
        assert_eq!(m.data_bytes(), 65536 + 100);
        let other = Manifest::new(m.geometry(), vec![ChunkKind::Zero; 4]);
        assert_ne!(other.source_id(), m.source_id());
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
}
