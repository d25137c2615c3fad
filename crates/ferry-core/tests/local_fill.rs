//! The engine's local fills: chunks a local copy holds are filled from it
//! through the same checks as fetched ones, never fetched over the WAN
//! meanwhile, and fetched after all when the local copy is stale.

use std::sync::Arc;

use bitvec::prelude::*;
use ferry_core::engine::{Arrival, FetchKind, Payload, ReadPlan, WritePlan};
use ferry_core::{ChunkKind, Engine, Geometry, Manifest};

const CS: u32 = 65536;

fn bytes(seed: u8) -> Vec<u8> {
    (0..CS)
        .map(|i| ((i as u8).wrapping_mul(7) ^ seed) | 1)
        .collect()
}

/// Four data chunks with contents 1..=4.
fn engine() -> Engine {
    let geo = Geometry::new(4 * u64::from(CS), CS);
    let kinds = (1..=4).map(|s| ChunkKind::of(&bytes(s))).collect();
    Engine::with_manifest(
        Arc::new(Manifest::new(geo, kinds)),
        BitVec::new(),
        BitVec::new(),
    )
}

fn data(seed: u8) -> Payload {
    let b = bytes(seed);
    Payload::Data {
        hash: *blake3::hash(&b).as_bytes(),
        bytes: b,
    }
}

fn fill(e: &mut Engine, chunk: u64, seed: u8) {
    match e.handle_fetched(chunk, &data(seed)) {
        Arrival::Fill(_) => e.handle_fill_done(chunk),
        other => panic!("chunk {chunk}: {other:?}"),
    }
}

#[test]
fn a_guest_read_of_a_matched_chunk_is_filled_locally_not_fetched() {
    let mut e = engine();
    assert_eq!(e.handle_local_matches(&[1, 2]), 2);
    assert_eq!(e.plan_read(u64::from(CS), 4096), ReadPlan::Wait);
    assert_eq!(e.poll_fetch(), None, "nothing goes to the source");
    assert_eq!(e.poll_fill_local(), Some(1));
    // A second read of it waits for the local fill, fetches nothing.
    assert_eq!(e.plan_read(u64::from(CS) + 8192, 4096), ReadPlan::Wait);
    assert_eq!(e.poll_fetch(), None);
    assert_eq!(e.poll_fill_local(), None);
    fill(&mut e, 1, 2);
    assert_eq!(e.plan_read(u64::from(CS), 4096), ReadPlan::Ready);
    let c = e.counters();
    assert_eq!((c.filled_local, c.fetched_on_demand), (u64::from(CS), 0));
}

#[test]
fn the_copier_leaves_matched_chunks_to_the_local_filler() {
    let mut e = engine();
    e.handle_local_matches(&[1, 2]);
    // The copier gets chunk 0, then 3: not 1 and 2.
    assert_eq!(e.poll_background(16), Some(0..1));
    assert_eq!(e.poll_background(16), Some(3..4));
    assert_eq!(e.poll_background(16), None);
    assert!(e.local_pending());
    // Holding the copier back does not hold local fills back.
    e.set_background_paused(true);
    assert_eq!(e.poll_local_background(16), vec![1, 2]);
    assert!(!e.local_pending());
    assert_eq!(e.poll_local_background(16), Vec::<u64>::new());
    // A guest read of a chunk being filled locally waits for it.
    assert_eq!(e.plan_read(2 * u64::from(CS), 512), ReadPlan::Wait);
    assert_eq!(e.poll_fetch(), None);
    fill(&mut e, 1, 2);
    fill(&mut e, 2, 3);
    assert_eq!(e.counters().filled_local, 2 * u64::from(CS));
    assert_eq!(e.counters().fetched_background, 0);
}

#[test]
fn a_stale_local_copy_is_fetched_from_the_source() {
    let mut e = engine();
    e.handle_local_matches(&[1, 2]);
    assert_eq!(e.plan_read(u64::from(CS), 4096), ReadPlan::Wait);
    assert_eq!(e.poll_fill_local(), Some(1));
    // The local bytes did not match: the chunk goes to the source.
    e.handle_local_failed(1);
    assert_eq!(e.counters().local_stale, 1);
    assert_eq!(e.plan_read(u64::from(CS), 4096), ReadPlan::Wait);
    let f = e.poll_fetch().expect("a fetch");
    assert_eq!((f.chunks, f.kind), (1..2, FetchKind::OnDemand));
    assert_eq!(e.poll_fill_local(), None);
    // The background filler's stale chunk goes back to the copier.
    assert_eq!(e.poll_local_background(16), vec![2]);
    e.handle_local_failed(2);
    assert_eq!(e.poll_background(16), Some(0..1));
    assert_eq!(e.poll_background(16), Some(2..4));
}

#[test]
fn a_local_fill_never_overwrites_a_guest_write() {
    let mut e = engine();
    e.handle_local_matches(&[1]);
    assert_eq!(e.poll_local_background(16), vec![1]);
    // The guest writes the first block of chunk 1 meanwhile.
    let blocks = match e.plan_write(u64::from(CS), 4096) {
        WritePlan::Ready(b) => b,
        other => panic!("{other:?}"),
    };
    e.handle_write_done(blocks.clone());
    match e.handle_fetched(1, &data(2)) {
        Arrival::Fill(plan) => assert_eq!(plan.runs, vec![blocks.end..blocks.start + 16]),
        other => panic!("{other:?}"),
    }
    // A chunk the guest wrote is never matched afterwards.
    let mut e = engine();
    let WritePlan::Ready(b) = e.plan_write(0, 4096) else {
        panic!("write not ready")
    };
    e.handle_write_done(b);
    assert_eq!(e.handle_local_matches(&[0]), 0);
}

#[test]
fn local_bytes_are_checked_like_fetched_ones() {
    let mut e = engine();
    e.handle_local_matches(&[1]);
    assert_eq!(e.poll_local_background(16), vec![1]);
    // Wrong bytes under the right hash are rejected, never written.
    let mut wrong = bytes(2);
    wrong[0] ^= 0xff;
    let p = Payload::Data {
        hash: *blake3::hash(&bytes(2)).as_bytes(),
        bytes: wrong,
    };
    assert_eq!(e.handle_fetched(1, &p), Arrival::Corrupt { chunk: 1 });
    assert_eq!(e.counters().filled_local, 0);
}
