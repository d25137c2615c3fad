//! Benchmark: how long resuming a pull of a large disk takes before it can
//! serve — opening the state file (reading its bitmaps) and building the
//! engine's in-memory map. Prints the median of several runs as JSON.
//!
//! `cargo run --release -p ferry-store --example map_resume -- [TiB] [runs]`

use std::sync::Arc;
use std::time::Instant;

use ferry_core::{ChunkKind, Engine, Geometry, Manifest, SyncBatch};
use ferry_store::{Backing, Pairing, StateFile};

fn main() {
    let mut args = std::env::args().skip(1);
    let tib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state");
    let geo = Geometry::new(tib << 40, 65536);
    let id = [7u8; 32];
    // A sparse backing file, for the state file to be bound to.
    let backing = Backing::create(&dir.path().join("disk"), geo.disk_size).expect("backing");
    let pairing = Pairing::bind(&backing).expect("bind");
    {
        let mut s = StateFile::create(&path, geo, id, pairing).expect("create");
        // Half the disk present, in runs, so the bitmap is not all zeros.
        let blocks = geo.blocks();
        let runs: Vec<_> = (0..blocks)
            .step_by(1 << 16)
            .map(|b| b..(b + (1 << 15)).min(blocks))
            .collect();
        s.persist(&SyncBatch {
            blocks: runs,
            guest_chunks: vec![],
        })
        .expect("persist");
    }
    let mut open_ms = Vec::new();
    let mut engine_ms = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let s = StateFile::open(&path, geo, id, &backing).expect("open");
        let present = s.present_bits(geo.blocks());
        let guest = s.guest_bits(geo.chunks());
        let t1 = Instant::now();
        let e = Engine::new(geo, present, guest);
        let t2 = Instant::now();
        assert_eq!(e.present_bytes(), geo.disk_size / 2);
        open_ms.push((t1 - t0).as_secs_f64() * 1e3);
        engine_ms.push((t2 - t1).as_secs_f64() * 1e3);
    }
    // The manifest's arrival marks zero chunks: time it too (all zero).
    let m = Arc::new(Manifest::new(
        geo,
        vec![ChunkKind::Zero; geo.chunks() as usize],
    ));
    let s = StateFile::open(&path, geo, id, &backing).expect("open");
    let mut e = Engine::new(
        geo,
        s.present_bits(geo.blocks()),
        s.guest_bits(geo.chunks()),
    );
    let t = Instant::now();
    e.handle_manifest(m);
    let manifest_ms = t.elapsed().as_secs_f64() * 1e3;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (o, omin, omax) = med(&mut open_ms);
    let (g, gmin, gmax) = med(&mut engine_ms);
    println!(
        "{{\"disk_tib\":{tib},\"runs\":{runs},\"map_bytes\":{},\"open_ms\":{{\"median\":{o:.1},\"min\":{omin:.1},\"max\":{omax:.1}}},\"engine_ms\":{{\"median\":{g:.1},\"min\":{gmin:.1},\"max\":{gmax:.1}}},\"set_manifest_ms\":{manifest_ms:.1}}}",
        geo.blocks() / 8
    );
}
