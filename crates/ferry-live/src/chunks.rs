//! A set of chunk indices, one bit per chunk of the disk.

/// A set of chunk indices below [`len`](Self::len), one bit each (a
/// 64 GiB disk of 64 KiB chunks takes 128 KiB).
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for ChunkSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<u64> = self.iter().take(64).collect();
        write!(
            f,
            "ChunkSet {{ {} of {}: {:?}{} }}",
            self.count(),
            self.len,
            shown,
            if self.count() > 64 { " ..." } else { "" }
        )
    }
}

impl ChunkSet {
    /// An empty set over chunks `0..len`.
    pub fn new(len: u64) -> ChunkSet {
        ChunkSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// The number of chunks the set ranges over (not how many it holds).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set ranges over no chunk at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds chunk `i` (ignored past [`len`](Self::len)).
    pub fn insert(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Adds chunks `start..end` (clipped to [`len`](Self::len)).
    pub fn insert_range(&mut self, start: u64, end: u64) {
        for i in start..end.min(self.len) {
            self.insert(i);
        }
    }

    /// Whether chunk `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// How many chunks the set holds.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The chunks held, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, w)| {
            let mut w = *w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// Adds every chunk of `other` (same length).
    pub fn union_with(&mut self, other: &ChunkSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_iter_count() {
        let mut s = ChunkSet::new(130);
        s.insert(0);
        s.insert(63);
        s.insert(64);
        s.insert_range(127, 140);
        s.insert(500);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 127, 128, 129]);
        assert_eq!(s.count(), 6);
        assert!(s.contains(129) && !s.contains(1) && !s.contains(130));
        let mut t = ChunkSet::new(130);
        t.insert(5);
        t.union_with(&s);
        assert_eq!(t.count(), 7);
    }
}
