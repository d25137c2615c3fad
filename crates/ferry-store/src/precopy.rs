//! The pre-copy record in the state file's header: the last generation of
//! a live source's changes the destination applied, and whether the
//! switchover is done (docs/decisions/precopy-switchover.md).
//!
//! One copy, in the header page's sector at [`PRECOPY_AT`] (nothing else
//! of the header shares it), with a BLAKE3 checksum, written and synced
//! after the changes it names are durable in the bitmap. A torn or absent
//! record reads as generation 0, not switched: the destination then asks
//! the source for every change since it started (a superset of what it
//! missed) and for the switchover again (the source answers it again).
//! The sector was zero in every version-3 file, so the version stays 3.

/// Offset of the record in the header page.
pub(crate) const PRECOPY_AT: usize = 512;
const MAGIC: &[u8; 8] = b"FERRYPRE";
/// Magic, generation, switched flag.
const BODY: usize = 8 + 8 + 1;
/// Bytes of the record.
pub(crate) const LEN: usize = BODY + 32;

/// Where a pre-copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Precopy {
    /// The last generation of the source's change log whose chunks are
    /// durably marked absent here (0: none yet).
    pub generation: u64,
    /// The switchover's final list was applied: the destination serves
    /// (post-copy from then on).
    pub switched: bool,
}

impl Precopy {
    pub(crate) fn encode(&self) -> [u8; LEN] {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.push(u8::from(self.switched));
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b.try_into().expect("LEN bytes")
    }

    /// The record in a header page, if there is a valid one.
    pub(crate) fn decode(page: &[u8]) -> Option<Precopy> {
        let b = page.get(PRECOPY_AT..PRECOPY_AT + LEN)?;
        if &b[..8] != MAGIC || blake3::hash(&b[..BODY]).as_bytes() != &b[BODY..] {
            return None;
        }
        Some(Precopy {
            generation: u64::from_le_bytes(b[8..16].try_into().ok()?),
            switched: b[16] == 1,
        })
    }
}
