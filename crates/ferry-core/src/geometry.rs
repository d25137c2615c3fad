//! Units of a migrated disk: bytes, blocks (tracking unit) and chunks
//! (transfer and hashing unit).

/// Size of a block, the tracking unit: 4 KiB.
pub const BLOCK_SIZE: u32 = 4096;

/// Default size of a chunk, the transfer and hashing unit: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// The geometry of a disk: its size and how it is cut into blocks and chunks.
///
/// The last block and the last chunk may be short when the disk size is not
/// a multiple of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunk size in bytes; a multiple of [`BLOCK_SIZE`].
    pub chunk_size: u32,
}

impl Geometry {
    /// A geometry with the given size and chunk size.
    ///
    /// # Panics
    /// If `chunk_size` is not a non-zero multiple of [`BLOCK_SIZE`].
    pub fn new(disk_size: u64, chunk_size: u32) -> Self {
        assert!(
            chunk_size >= BLOCK_SIZE && chunk_size.is_multiple_of(BLOCK_SIZE),
            "chunk size {chunk_size} is not a multiple of the block size"
        );
        Self {
            disk_size,
            chunk_size,
        }
    }

    /// Number of blocks (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(BLOCK_SIZE))
    }

    /// Number of chunks (the last may be short).
    pub fn chunks(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.chunk_size))
    }

    /// Blocks per (full) chunk.
    pub fn blocks_per_chunk(&self) -> u64 {
        u64::from(self.chunk_size / BLOCK_SIZE)
    }

    /// Byte range of chunk `chunk`, clipped to the disk.
    pub fn chunk_bytes(&self, chunk: u64) -> std::ops::Range<u64> {
        let start = chunk * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.disk_size)
    }

    /// Length in bytes of chunk `chunk`.
    pub fn chunk_len(&self, chunk: u64) -> u32 {
        let r = self.chunk_bytes(chunk);
        (r.end - r.start) as u32
    }

    /// Block range of chunk `chunk`, clipped to the disk.
    pub fn chunk_blocks(&self, chunk: u64) -> std::ops::Range<u64> {
        let start = chunk * self.blocks_per_chunk();
        start..(start + self.blocks_per_chunk()).min(self.blocks())
    }

    /// The chunk holding block `block`.
    pub fn chunk_of_block(&self, block: u64) -> u64 {
        block / self.blocks_per_chunk()
    }

    /// Byte range of block `block`, clipped to the disk.
    pub fn block_bytes(&self, block: u64) -> std::ops::Range<u64> {
        let start = block * u64::from(BLOCK_SIZE);
        start..(start + u64::from(BLOCK_SIZE)).min(self.disk_size)
    }

    /// Blocks touched by the byte range `offset..offset+len`.
    pub fn blocks_touching(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let bs = u64::from(BLOCK_SIZE);
        offset / bs..(offset + len).div_ceil(bs)
    }

    /// Chunks touched by the byte range `offset..offset+len`.
    pub fn chunks_touching(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let cs = u64::from(self.chunk_size);
        offset / cs..(offset + len).div_ceil(cs)
    }

    /// Whether `offset..offset+len` lies inside the disk.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.disk_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_last_chunk_and_block() {
        let g = Geometry::new(64 * 1024 * 2 + 5000, 64 * 1024);
        assert_eq!(g.chunks(), 3);
        assert_eq!(g.chunk_len(2), 5000);
        assert_eq!(g.blocks(), 32 + 2);
        assert_eq!(g.chunk_blocks(2), 32..34);
        assert_eq!(g.block_bytes(33), (33 * 4096)..g.disk_size);
        assert_eq!(g.blocks_touching(4095, 2), 0..2);
        assert_eq!(g.chunks_touching(65535, 1), 0..1);
        assert!(!g.contains(g.disk_size, 1));
        assert!(g.contains(g.disk_size, 0));
        assert!(!g.contains(u64::MAX, 2));
    }
}
