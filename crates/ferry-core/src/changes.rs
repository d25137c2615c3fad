//! The change log of a live source: which chunks the running VM wrote, by
//! generation, so a destination pre-copying the disk learns what went
//! stale (docs/decisions/precopy-switchover.md).
//!
//! Every write is recorded once it has completed, labelled with the
//! generation about to be published (the current one plus one). A round
//! ([`ChangeLog::end_round`]) publishes it: the generation goes up when
//! anything was written since the last round. [`ChangeLog::since`] names
//! every chunk written after a generation a destination has applied, so a
//! destination that restarts (or asks for the final list at the
//! switchover) gets exactly what it has not applied yet, whatever it missed.
//! The log is kept in memory for the source process's lifetime: a source
//! that restarts after its VM wrote has another source id (the image's
//! identity changed), so no destination can ask it for an older history.

use std::collections::HashMap;
use std::ops::Range;

/// Chunks written, by the generation that published them. See the module
/// documentation.
#[derive(Debug, Default, Clone)]
pub struct ChangeLog {
    generation: u64,
    /// Chunk → the label of its latest write (at most `generation + 1`).
    last_written: HashMap<u64, u64>,
    /// Something was written since the last published generation.
    pending: bool,
}

impl ChangeLog {
    /// An empty log at generation 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last published generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether chunks were written since the last published generation.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// A write to `chunks` has completed.
    pub fn record(&mut self, chunks: Range<u64>) {
        let label = self.generation + 1;
        for c in chunks {
            self.last_written.insert(c, label);
        }
        self.pending = true;
    }

    /// Ends a round: publishes the writes recorded since the last one as a
    /// new generation (also with none when `force`, as at the
    /// switchover). Returns the generation now published.
    pub fn end_round(&mut self, force: bool) -> u64 {
        if self.pending || force {
            self.generation += 1;
            self.pending = false;
        }
        self.generation
    }

    /// The chunks written after generation `applied` (published or not
    /// yet), as sorted runs; `None` if this log cannot tell (it never
    /// published `applied`: it is not the log the destination followed).
    pub fn since(&self, applied: u64) -> Option<Vec<Range<u64>>> {
        if applied > self.generation {
            return None;
        }
        let mut chunks: Vec<u64> = self
            .last_written
            .iter()
            .filter(|(_, label)| **label > applied)
            .map(|(c, _)| *c)
            .collect();
        chunks.sort_unstable();
        Some(runs(&chunks))
    }
}

/// Sorted chunk numbers as runs of consecutive ones.
pub fn runs(sorted: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &c in sorted {
        match out.last_mut() {
            Some(r) if r.end == c => r.end += 1,
            Some(r) if r.end > c => {}
            _ => out.push(c..c + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_gets_every_write_after_what_it_applied() {
        let mut log = ChangeLog::new();
        assert_eq!(log.since(0), Some(vec![]));
        assert_eq!(
            log.end_round(false),
            0,
            "nothing written: no new generation"
        );
        log.record(3..5);
        log.record(9..10);
        // Not published yet, but already named (a destination that applies
        // it early only fetches it once more).
        assert_eq!(log.since(0), Some(vec![3..5, 9..10]));
        assert_eq!(log.end_round(false), 1);
        log.record(4..5);
        log.record(5..6);
        assert_eq!(log.end_round(false), 2);
        // Applied 1: chunk 4 was written again after, and 5.
        assert_eq!(log.since(1), Some(vec![4..6]));
        assert_eq!(log.since(2), Some(vec![]));
        // A destination that applied nothing gets all of it.
        assert_eq!(log.since(0), Some(vec![3..6, 9..10]));
        // A generation this log never published: it cannot tell.
        assert_eq!(log.since(3), None);
        // The switchover bumps it even with nothing written.
        assert_eq!(log.end_round(true), 3);
        assert_eq!(log.since(3), Some(vec![]));
    }

    #[test]
    fn runs_merge_consecutive_chunks() {
        assert_eq!(runs(&[]), Vec::<Range<u64>>::new());
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10]), vec![1..4, 7..9, 10..11]);
        assert_eq!(runs(&[1, 1, 2]), vec![1..3]);
    }
}
