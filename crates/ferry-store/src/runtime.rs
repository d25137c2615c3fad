//! Changes made to a running pull's background copy (`ferry background
//! pause|resume|rate=`), kept in the state file's header so that a restart
//! keeps them (see `docs/decisions/runtime-settings-persist.md`).
//!
//! The record has two copies, each in a 512-byte sector of the header page
//! of its own (nothing else of the header shares those sectors), with a
//! sequence number and a BLAKE3 checksum. A change is written into the copy
//! holding the older sequence number and synced, so a write torn by a power
//! cut damages only the copy being written: the valid copy with the higher
//! number wins. No valid copy reads as no record (the command line applies,
//! as before runtime changes were kept). The sectors were zero in every
//! version-3 file, so the format version stays 3: an older ferry ignores
//! the record.

/// Offsets of the two copies in the header page.
pub(crate) const RUNTIME_AT: [usize; 2] = [1536, 2560];
const MAGIC: &[u8; 8] = b"FERRYRUN";
/// Magic, sequence, then the two settings (see [`RuntimeSettings::encode`]).
const BODY: usize = 8 + 8 + (1 + 1 + 8 + 1) + (1 + 8 + 8 + 8);
/// Bytes of one copy.
pub(crate) const LEN: usize = BODY + 32;

/// One setting changed at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeSetting<T> {
    /// The value set.
    pub value: T,
    /// When, in seconds since the Unix epoch.
    pub set_at_unix: u64,
    /// The command line's value it replaced (`--hold-background`,
    /// `--rate`): a restart with another value there is a newer decision
    /// of the operator, and wins.
    pub command_line: T,
}

/// What was changed at runtime and is still in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeSettings {
    /// `ferry background pause` (true) or `resume` (false).
    pub paused: Option<RuntimeSetting<bool>>,
    /// `ferry background rate=`: bytes per second, 0 unlimited.
    pub rate: Option<RuntimeSetting<u64>>,
}

impl RuntimeSettings {
    /// The record as copy number `seq`.
    pub(crate) fn encode(&self, seq: u64) -> [u8; LEN] {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&seq.to_le_bytes());
        let p = self.paused;
        b.push(u8::from(p.is_some()));
        b.push(u8::from(p.is_some_and(|p| p.value)));
        b.extend_from_slice(&p.map_or(0, |p| p.set_at_unix).to_le_bytes());
        b.push(u8::from(p.is_some_and(|p| p.command_line)));
        let r = self.rate;
        b.push(u8::from(r.is_some()));
        b.extend_from_slice(&r.map_or(0, |r| r.value).to_le_bytes());
        b.extend_from_slice(&r.map_or(0, |r| r.set_at_unix).to_le_bytes());
        b.extend_from_slice(&r.map_or(0, |r| r.command_line).to_le_bytes());
        debug_assert_eq!(b.len(), BODY);
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b.try_into().expect("LEN bytes")
    }

    /// One copy, if valid: the settings and its sequence number.
    fn decode_copy(b: &[u8]) -> Option<(Self, u64)> {
        let b = b.get(..LEN)?;
        if &b[..8] != MAGIC || blake3::hash(&b[..BODY]).as_bytes() != &b[BODY..] {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let seq = u64_at(8);
        let paused = (b[16] == 1).then(|| RuntimeSetting {
            value: b[17] == 1,
            set_at_unix: u64_at(18),
            command_line: b[26] == 1,
        });
        let rate = (b[27] == 1).then(|| RuntimeSetting {
            value: u64_at(28),
            set_at_unix: u64_at(36),
            command_line: u64_at(44),
        });
        Some((Self { paused, rate }, seq))
    }

    /// The record in a header page: the valid copy with the higher
    /// sequence number, and that number (none: empty settings, 0).
    pub(crate) fn decode(page: &[u8]) -> (Self, u64) {
        RUNTIME_AT
            .iter()
            .filter_map(|&at| Self::decode_copy(page.get(at..)?))
            .max_by_key(|(_, seq)| *seq)
            .unwrap_or_default()
    }

    /// Where copy number `seq` goes (alternating, so it never overwrites
    /// copy `seq - 1`).
    pub(crate) fn offset(seq: u64) -> u64 {
        RUNTIME_AT[(seq % 2) as usize] as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RuntimeSettings {
        RuntimeSettings {
            paused: Some(RuntimeSetting {
                value: true,
                set_at_unix: 1_700_000_000,
                command_line: false,
            }),
            rate: Some(RuntimeSetting {
                value: 50_000_000,
                set_at_unix: 1_700_000_100,
                command_line: 0,
            }),
        }
    }

    fn page_with(copies: &[(RuntimeSettings, u64)]) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        for (s, seq) in copies {
            let at = RuntimeSettings::offset(*seq) as usize;
            page[at..at + LEN].copy_from_slice(&s.encode(*seq));
        }
        page
    }

    #[test]
    fn a_record_reads_back_and_zeros_read_as_none() {
        assert_eq!(
            RuntimeSettings::decode(&[0u8; 4096]),
            (RuntimeSettings::default(), 0)
        );
        let page = page_with(&[(sample(), 1)]);
        assert_eq!(RuntimeSettings::decode(&page), (sample(), 1));
    }

    #[test]
    fn the_newer_copy_wins_and_a_torn_one_falls_back_to_the_older() {
        let older = sample();
        let newer = RuntimeSettings {
            paused: None,
            ..sample()
        };
        let mut page = page_with(&[(older, 1), (newer, 2)]);
        assert_eq!(RuntimeSettings::decode(&page), (newer, 2));
        // Copy 2 torn: copy 1 is still whole.
        let at = RuntimeSettings::offset(2) as usize;
        page[at + 20] ^= 0xff;
        assert_eq!(RuntimeSettings::decode(&page), (older, 1));
    }
}
