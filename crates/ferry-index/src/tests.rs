//! Unit tests of building, updating and reading an index.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;
use crate::build::{build_with, update_with};

const CS: usize = CHUNK_SIZE as usize;

/// A chunk of bytes made from `seed` (never all zeros).
fn chunk(seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CS);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < CS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// Writes a file of the given chunks (`None`: a zero chunk).
fn image(dir: &Path, name: &str, chunks: &[Option<u64>]) -> PathBuf {
    let mut data = Vec::new();
    for c in chunks {
        match c {
            Some(s) => data.extend(chunk(*s)),
            None => data.extend(vec![0u8; CS]),
        }
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn chunks_are_found_where_they_are_and_zeros_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a", &[Some(1), None, Some(2), Some(1)]);
    let b = image(dir.path(), "b", &[Some(3), Some(2)]);
    let idx = dir.path().join("idx");
    let r = build_with(&idx, &[a.clone(), b.clone()], 2).unwrap();
    assert_eq!(r.files_hashed, 2);
    assert_eq!(r.bytes_hashed, 6 * CS as u64);
    // a: 1 and 2 (1 twice counts once); b: 3 and 2.
    assert_eq!(r.records, 4);
    let index = Index::open(&idx).unwrap();
    assert_eq!(index.files()[0].path, a);
    assert_eq!(index.files()[1].path, b);
    let at = |seed| index.lookup(&hash(&chunk(seed))).unwrap();
    assert!(
        matches!(at(1), Some(Location { file: 0, offset }) if offset == 0 || offset == 3 * CS as u64)
    );
    assert_eq!(at(3), Some(Location { file: 1, offset: 0 }));
    assert!(at(2).is_some());
    assert_eq!(at(9), None);
    assert_eq!(index.lookup(&hash(&vec![0u8; CS])).unwrap(), None);
    let s = index.stats().unwrap();
    assert_eq!((s.files, s.records, s.distinct_hashes), (2, 4, 3));
    assert_eq!(
        std::fs::metadata(&idx).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn matches_answers_every_wanted_chunk_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Option<u64>> = (0..40).map(Some).collect();
    let a = image(dir.path(), "a", &seeds);
    let idx = dir.path().join("idx");
    // Runs of 7 records: several spilled runs merged.
    build_with(&idx, &[a], 7).unwrap();
    let index = Index::open(&idx).unwrap();
    assert_eq!(index.records(), 40);
    // Wanted: seeds 5, 5 again (two destination chunks), 17, 99 (absent).
    let mut wanted: Vec<([u8; 32], u64)> = [(5, 100), (5, 101), (17, 102), (99, 103)]
        .iter()
        .map(|&(s, k)| (hash(&chunk(s)), k))
        .collect();
    wanted.sort();
    let mut got = index.matches(&wanted).unwrap();
    got.sort_by_key(|m| m.0);
    let off = |s: u64| Location {
        file: 0,
        offset: s * CS as u64,
    };
    assert_eq!(got, vec![(100, off(5)), (101, off(5)), (102, off(17))]);
}

#[test]
fn update_rehashes_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a", &[Some(1), Some(2)]);
    let b = image(dir.path(), "b", &[Some(3), Some(4)]);
    let c = image(dir.path(), "c", &[Some(5)]);
    let idx = dir.path().join("idx");
    build_with(&idx, &[a.clone(), b.clone(), c.clone()], 3).unwrap();
    let before = std::fs::read(&idx).unwrap();

    let r = update_with(&idx, 3).unwrap();
    assert_eq!(
        (
            r.files_hashed,
            r.files_unchanged,
            r.bytes_hashed,
            r.rewritten
        ),
        (0, 3, 0, false)
    );
    assert_eq!(std::fs::read(&idx).unwrap(), before);

    // b changes (new content), c goes away.
    image(dir.path(), "b", &[Some(6), Some(3)]);
    std::fs::remove_file(&c).unwrap();
    let r = update_with(&idx, 3).unwrap();
    assert_eq!(
        (r.files_hashed, r.files_unchanged, r.files_gone, r.rewritten),
        (1, 1, 1, true)
    );
    assert_eq!(r.bytes_hashed, 2 * CS as u64);
    let index = Index::open(&idx).unwrap();
    assert_eq!(index.files().len(), 2);
    let at = |seed| index.lookup(&hash(&chunk(seed))).unwrap();
    assert_eq!(at(1), Some(Location { file: 0, offset: 0 }));
    assert_eq!(
        at(3),
        Some(Location {
            file: 1,
            offset: CS as u64
        })
    );
    assert_eq!(at(6), Some(Location { file: 1, offset: 0 }));
    assert_eq!(at(4), None, "b's old content is gone");
    assert_eq!(at(5), None, "c's content is gone");
    assert_eq!(index.records(), 4);
}

#[test]
fn a_damaged_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a", &[Some(1)]);
    let idx = dir.path().join("idx");
    build_with(&idx, &[a], 8).unwrap();
    let good = std::fs::read(&idx).unwrap();
    // A flipped bit in the file table, a truncated file, not an index.
    let mut bad = good.clone();
    bad[HEADER_LEN + 3] ^= 1;
    std::fs::write(&idx, &bad).unwrap();
    assert!(matches!(Index::open(&idx), Err(IndexError::Corrupt { .. })));
    std::fs::write(&idx, &good[..good.len() - 1]).unwrap();
    assert!(matches!(Index::open(&idx), Err(IndexError::Corrupt { .. })));
    std::fs::write(&idx, b"hello").unwrap();
    assert!(matches!(Index::open(&idx), Err(IndexError::Corrupt { .. })));
    std::fs::write(&idx, &good).unwrap();
    assert!(Index::open(&idx).is_ok());
}

#[test]
fn a_short_last_chunk_is_hashed_as_the_source_hashes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = chunk(1);
    data.extend_from_slice(&chunk(2)[..1000]);
    let p = dir.path().join("a");
    std::fs::write(&p, &data).unwrap();
    let idx = dir.path().join("idx");
    build_with(&idx, &[p], 8).unwrap();
    let index = Index::open(&idx).unwrap();
    let geo = ferry_core::Geometry::new(data.len() as u64, CHUNK_SIZE);
    let last = geo.chunk_bytes(1);
    let kind = ferry_core::ChunkKind::of(&data[last.start as usize..last.end as usize]);
    let ferry_core::ChunkKind::Data(h) = kind else {
        panic!("data")
    };
    assert_eq!(
        index.lookup(&h).unwrap(),
        Some(Location {
            file: 0,
            offset: CS as u64
        })
    );
}
