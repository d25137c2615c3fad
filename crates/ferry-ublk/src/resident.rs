//! Which parts of a device's file were wholly in the page cache a moment
//! ago: one bit per 64 KiB granule of the device (ferry's default chunk),
//! shared by the device's queues.
//!
//! A READ whose granules all have their bit is copied at once from the page
//! cache ([`ferry_device::BlockDevice::copy_now`]) with no further system
//! call. Otherwise one `mincore(2)` over the granules the READ touches
//! ([`Residency::check`]) sets the bits of those wholly in the page cache
//! and says whether the READ's own pages all are; if not, the queue reads
//! them on its io_uring, so that a page-cache miss stalls only its tag.
//!
//! A bit is a hint, not a promise: pages may be evicted after it was set,
//! and then a copy waits on storage as it always did before the ring path.
//! To bound that, every bit is cleared a few seconds after it was set
//! ([`EPOCH_SECS`], by a timer on the queue's ring); a READ of a cleared
//! granule asks the kernel again. See `docs/decisions/ublk-target-io.md`.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::pagecache::Mapping;

/// log2 of the granule: 64 KiB.
pub(crate) const GRANULE_SHIFT: u32 = 16;

/// Seconds after which the bits set since are cleared.
pub(crate) const EPOCH_SECS: u64 = 5;

/// Pages asked per `mincore` call (a 1 MiB READ is one call).
const PAGES_PER_CALL: usize = 256;

/// What answers "which pages are in the page cache" (the file's mapping;
/// in tests, a fake).
pub(crate) trait PageCache {
    /// The page size in bytes.
    fn page_size(&self) -> u64;
    /// One byte per page from the page-aligned `start` into `out` (bit 0
    /// set: in the page cache), as `mincore(2)`.
    fn mincore(&self, start: u64, out: &mut [u8]) -> io::Result<()>;
}

/// What [`Residency::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Every page of the range is in the page cache; `marked`: a granule's
    /// bit was set that was clear (the epoch timer must run).
    Resident {
        /// Some bit went from clear to set.
        marked: bool,
    },
    /// Some page of the range is not.
    NotResident,
}

/// The bits of one device, with the mapping `mincore` asks.
pub(crate) struct Residency {
    /// Size of the device in bytes.
    size: u64,
    /// One bit per granule: wholly in the page cache when last asked.
    bits: Box<[AtomicU64]>,
    /// The device's file mapped for `mincore`, made on the first check
    /// (from the descriptor that check is given), or why it could not be.
    map: OnceLock<Result<Box<dyn PageCache + Send + Sync>, String>>,
    /// `mincore` rounds so far (for tests and diagnostics).
    checks: AtomicU64,
    /// Of those, the ones that found the range not in the page cache.
    misses: AtomicU64,
}

impl Residency {
    /// All bits clear, for a device of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        let granules = size.div_ceil(1 << GRANULE_SHIFT);
        let words = usize::try_from(granules.div_ceil(64)).unwrap_or(0);
        Self {
            size,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            map: OnceLock::new(),
            checks: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// As [`Residency::new`], asking `pc` instead of the file's mapping.
    #[cfg(test)]
    pub(crate) fn with_page_cache(size: u64, pc: impl PageCache + Send + Sync + 'static) -> Self {
        let r = Self::new(size);
        let _ = r.map.set(Ok(Box::new(pc)));
        r
    }

    /// The granules touching `len` bytes at `offset` (none if empty or
    /// outside the device).
    fn granules(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.size => {
                (offset >> GRANULE_SHIFT)..=((end - 1) >> GRANULE_SHIFT)
            }
            #[allow(clippy::reversed_empty_ranges)]
            _ => 1..=0,
        }
    }

    fn bit(g: u64) -> (usize, u64) {
        ((g / 64) as usize, 1 << (g % 64))
    }

    /// Whether every granule of `len` bytes at `offset` has its bit: found
    /// wholly in the page cache since the last clear. No system call.
    pub(crate) fn recent(&self, offset: u64, len: u64) -> bool {
        let granules = self.granules(offset, len);
        !granules.is_empty()
            && granules.into_iter().all(|g| {
                let (w, b) = Self::bit(g);
                self.bits[w].load(Ordering::Relaxed) & b != 0
            })
    }

    /// Sets granule `g`'s bit; whether it was clear.
    fn mark(&self, g: u64) -> bool {
        let (w, b) = Self::bit(g);
        self.bits[w].fetch_or(b, Ordering::Relaxed) & b == 0
    }

    /// Clears every bit (the end of an epoch).
    pub(crate) fn clear(&self) {
        for w in self.bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// `mincore` rounds so far.
    pub(crate) fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Rounds that found the range not in the page cache (each sent a READ
    /// to a queue's ring).
    pub(crate) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Asks the page cache about `len` bytes at `offset` of `fd`, the file
    /// holding the device's bytes at their own offsets (mapped on the first
    /// call; the same file every time): sets the bits of the granules
    /// touched that are wholly in it, and says whether the range is.
    pub(crate) fn check(&self, fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Found> {
        let map = self.map.get_or_init(|| {
            Mapping::new(fd, self.size)
                .map(|m| Box::new(m) as Box<dyn PageCache + Send + Sync>)
                .map_err(|e| {
                    let e = format!("mapping the device's file for mincore failed: {e}");
                    tracing::warn!("ublk: {e}; present reads are copied from it at once as before");
                    e
                })
        });
        match map {
            Ok(map) => self.check_with(&**map, offset, len),
            Err(e) => Err(io::Error::other(e.clone())),
        }
    }

    /// [`Residency::check`] against `pc`.
    pub(crate) fn check_with(
        &self,
        pc: &(impl PageCache + ?Sized),
        offset: u64,
        len: u64,
    ) -> io::Result<Found> {
        let granules = self.granules(offset, len);
        if granules.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are not a range of the {}-byte device",
                    self.size
                ),
            ));
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        let (g0, g1) = (*granules.start(), *granules.end());
        let end = offset + len;
        // The granules' span, the device's end included.
        let (a, b) = (
            g0 << GRANULE_SHIFT,
            ((g1 + 1) << GRANULE_SHIFT).min(self.size),
        );
        let page = pc.page_size().max(1);
        let mut whole = vec![true; (g1 - g0 + 1) as usize];
        let mut range = true;
        let mut vec = [0u8; PAGES_PER_CALL];
        let mut at = a - a % page;
        while at < b {
            let pages = ((b - at).div_ceil(page)).min(PAGES_PER_CALL as u64) as usize;
            pc.mincore(at, &mut vec[..pages])?;
            for (i, v) in vec[..pages].iter().enumerate() {
                if v & 1 != 0 {
                    continue;
                }
                let (ps, pe) = (at + i as u64 * page, at + (i as u64 + 1) * page);
                let (first, last) = (ps.max(a) >> GRANULE_SHIFT, (pe.min(b) - 1) >> GRANULE_SHIFT);
                for g in first..=last {
                    whole[(g - g0) as usize] = false;
                }
                if ps < end && pe > offset {
                    range = false;
                }
            }
            at += pages as u64 * page;
        }
        let mut marked = false;
        for (g, whole) in (g0..=g1).zip(whole) {
            if whole {
                marked |= self.mark(g);
            }
        }
        Ok(if range {
            Found::Resident { marked }
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            Found::NotResident
        })
    }
}

/// A page cache holding every page of the file, or none (for tests).
#[cfg(test)]
pub(crate) struct Uniform(pub(crate) bool);

#[cfg(test)]
impl PageCache for Uniform {
    fn page_size(&self) -> u64 {
        4096
    }
    fn mincore(&self, _start: u64, out: &mut [u8]) -> io::Result<()> {
        out.fill(u8::from(self.0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;

    const G: u64 = 1 << GRANULE_SHIFT;

    /// A page cache of 4 KiB pages holding the pages in `resident`, which
    /// records every `mincore` call.
    #[derive(Default)]
    struct Fake {
        resident: BTreeSet<u64>,
        calls: RefCell<Vec<(u64, usize)>>,
    }

    impl Fake {
        /// Every page of `from..to` (bytes) is resident.
        fn with(mut self, from: u64, to: u64) -> Self {
            self.resident.extend(from / 4096..to.div_ceil(4096));
            self
        }
    }

    impl PageCache for Fake {
        fn page_size(&self) -> u64 {
            4096
        }
        fn mincore(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
            assert_eq!(start % 4096, 0, "unaligned mincore");
            self.calls.borrow_mut().push((start, out.len()));
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from(self.resident.contains(&(start / 4096 + i as u64)));
            }
            Ok(())
        }
    }

    #[test]
    fn a_wholly_resident_granule_is_marked_and_then_needs_no_call() {
        let r = Residency::new(16 * G);
        let pc = Fake::default().with(0, 16 * G);
        assert!(!r.recent(G + 4096, 4096));
        assert_eq!(
            r.check_with(&pc, G + 4096, 4096).unwrap(),
            Found::Resident { marked: true }
        );
        // One call over the whole granule, not only the READ's page.
        assert_eq!(*pc.calls.borrow(), [(G, 16)]);
        assert!(r.recent(G, G), "the whole granule");
        assert!(r.recent(G + 8192, 512));
        assert!(!r.recent(0, 4096), "its neighbour was not asked");
        assert!(!r.recent(G, G + 1), "a range reaching the next granule");
        // Asked again: already set, nothing new to time out.
        assert_eq!(
            r.check_with(&pc, G, 4096).unwrap(),
            Found::Resident { marked: false }
        );
        assert_eq!(r.checks(), 2);
    }

    #[test]
    fn a_partly_resident_granule_is_not_marked_but_its_resident_pages_read_at_once() {
        let r = Residency::new(4 * G);
        // Granule 1: its first half only.
        let pc = Fake::default().with(G, G + G / 2);
        assert_eq!(
            r.check_with(&pc, G, 8192).unwrap(),
            Found::Resident { marked: false }
        );
        assert!(!r.recent(G, 8192));
        assert_eq!(
            r.check_with(&pc, G + G / 2, 4096).unwrap(),
            Found::NotResident
        );
        // A range straddling the resident edge is not resident.
        assert_eq!(
            r.check_with(&pc, G + G / 2 - 512, 1024).unwrap(),
            Found::NotResident
        );
        assert!(!r.recent(G, 4096));
        assert_eq!((r.checks(), r.misses()), (3, 2));
    }

    #[test]
    fn a_read_over_several_granules_marks_those_wholly_resident() {
        let r = Residency::new(8 * G);
        // Granules 2 and 3 resident, 4 only up to its last page.
        let pc = Fake::default().with(2 * G, 5 * G - 4096);
        // A 1 MiB-like read of granules 2..=3, unaligned: resident.
        assert_eq!(
            r.check_with(&pc, 2 * G + 512, 2 * G - 1024).unwrap(),
            Found::Resident { marked: true }
        );
        assert!(r.recent(2 * G, 2 * G));
        // Granules 3..=4: 4 is not wholly resident, so the range is not.
        assert_eq!(r.check_with(&pc, 3 * G, 2 * G).unwrap(), Found::NotResident);
        assert!(!r.recent(4 * G, 4096));
        // The resident part of granule 4 still reads at once.
        assert_eq!(
            r.check_with(&pc, 4 * G, 4096).unwrap(),
            Found::Resident { marked: false }
        );
    }

    #[test]
    fn many_pages_take_several_calls() {
        let r = Residency::new(64 * G);
        let pc = Fake::default().with(0, 64 * G);
        // 2 MiB + one page, unaligned: 34 granules, 544 pages.
        assert_eq!(
            r.check_with(&pc, 4096, 32 * G).unwrap(),
            Found::Resident { marked: true }
        );
        let calls = pc.calls.borrow();
        let pages: usize = calls.iter().map(|c| c.1).sum();
        assert_eq!(pages, 33 * 16, "granules 0..=32");
        assert!(calls.iter().all(|c| c.1 <= PAGES_PER_CALL));
        assert_eq!(calls.len(), 3);
        assert!(r.recent(0, 33 * G));
    }

    #[test]
    fn the_last_granule_ends_with_the_device() {
        // 2.5 granules: the last is half a granule, resident as a whole.
        let size = 2 * G + G / 2;
        let r = Residency::new(size);
        let pc = Fake::default().with(2 * G, size);
        assert_eq!(
            r.check_with(&pc, size - 4096, 4096).unwrap(),
            Found::Resident { marked: true }
        );
        assert_eq!(*pc.calls.borrow(), [(2 * G, 8)]);
        assert!(r.recent(2 * G, G / 2));
        // Beyond the device, or empty: never recent, and not asked.
        assert!(!r.recent(size - 4096, 8192));
        assert!(!r.recent(0, 0));
        for (offset, len) in [(size, 1), (0, 0), (u64::MAX, 2), (size - 1, 2)] {
            let e = r.check_with(&pc, offset, len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{offset}+{len}");
        }
    }

    #[test]
    fn an_epoch_clears_every_bit() {
        let size = 200 * G;
        let r = Residency::new(size);
        let pc = Fake::default().with(0, size);
        for g in [0, 63, 64, 65, 199] {
            r.check_with(&pc, g * G, 4096).unwrap();
            assert!(r.recent(g * G, 4096), "granule {g}");
        }
        assert!(!r.recent(G, 4096));
        r.clear();
        for g in [0, 63, 64, 65, 199] {
            assert!(!r.recent(g * G, 4096), "granule {g} after the clear");
        }
        // Found again after the clear: marked anew (the timer re-arms).
        assert_eq!(
            r.check_with(&pc, 0, 4096).unwrap(),
            Found::Resident { marked: true }
        );
    }

    #[test]
    fn mincore_errors_come_back_and_mark_nothing() {
        struct Failing;
        impl PageCache for Failing {
            fn page_size(&self) -> u64 {
                4096
            }
            fn mincore(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            }
        }
        let r = Residency::new(4 * G);
        let e = r.check_with(&Failing, 0, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        assert!(!r.recent(0, 4096));
    }

    #[test]
    fn check_maps_the_file_once_and_asks_the_real_page_cache() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&vec![1; 2 * G as usize], 0).unwrap();
        let r = Residency::new(2 * G);
        // Just written: resident, whatever the filesystem.
        assert_eq!(
            r.check(f.as_fd(), 4096, 4096).unwrap(),
            Found::Resident { marked: true }
        );
        assert!(r.recent(0, G));
        assert!(r.map.get().is_some_and(Result::is_ok));
        r.clear();
        // The same mapping again (another descriptor would not be used).
        assert_eq!(
            r.check(f.as_fd(), 0, 4096).unwrap(),
            Found::Resident { marked: true }
        );
        // A device of size 0 cannot be mapped: an error, not a panic.
        let empty = Residency::new(0);
        assert!(empty.check(f.as_fd(), 0, 1).is_err());
    }
}
