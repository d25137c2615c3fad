//! `ferry index` and `ferry pull --index`: chunks the destination already
//! holds in a local template are filled from it instead of crossing the
//! WAN, the result is the source byte for byte, a template changed after
//! indexing never puts wrong data on the disk, and `index update` hashes
//! only what changed.

use std::path::Path;
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 65536;

/// A 32 MiB template of pseudo-random data (a few holes).
fn template(path: &Path) {
    make_image(path, 32 * MIB, &[(0, 20 * MIB), (24 * MIB, 8 * MIB)], 41);
}

/// A source derived from `template`: chunks 16..32 changed, chunks
/// 64..96 moved 3 chunks on (whole chunks: they still match), chunks
/// 128..160 moved 4 KiB on (no 64 KiB chunk matches), chunks 200..210
/// zeroed, the rest equal.
fn derive(template: &Path, source: &Path) {
    let t = std::fs::read(template).unwrap();
    let mut s = t.clone();
    let c = |n: u64| (n * CHUNK) as usize;
    make_image(&w_tmp(source), 16 * CHUNK, &[(0, 16 * CHUNK)], 77);
    let fresh = std::fs::read(w_tmp(source)).unwrap();
    s[c(16)..c(32)].copy_from_slice(&fresh);
    s[c(67)..c(99)].copy_from_slice(&t[c(64)..c(96)]);
    s[c(128) + 4096..c(160) + 4096].copy_from_slice(&t[c(128)..c(160)]);
    s[c(200)..c(210)].fill(0);
    std::fs::write(source, s).unwrap();
    std::fs::remove_file(w_tmp(source)).unwrap();
}

fn w_tmp(source: &Path) -> std::path::PathBuf {
    source.with_extension("fresh")
}

/// The source's data chunks whose exact content some chunk of `template`
/// holds (zero chunks never count: they are never fetched).
fn matching_chunks(template: &Path, source: &Path) -> Vec<u64> {
    let t = std::fs::read(template).unwrap();
    let s = std::fs::read(source).unwrap();
    let known: std::collections::HashSet<[u8; 32]> = t
        .chunks(CHUNK as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    s.chunks(CHUNK as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0) && known.contains(blake3::hash(c).as_bytes()))
        .map(|(i, _)| i as u64)
        .collect()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ferry failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn pull_verified(
    w: &World,
    port: u16,
    disk: &str,
    tag: &str,
    extra: &[String],
) -> serde_json::Value {
    let mut args = w.pull_args_tagged(port, disk, tag);
    args.extend_from_slice(extra);
    let _pull = w.pull(&args);
    let ctl = format!("ctl{tag}.sock");
    let t0 = std::time::Instant::now();
    loop {
        let s = w.status_of(&ctl);
        if s["verified"] == "ok" {
            return s;
        }
        assert!(
            s["phase"] != "error" && t0.elapsed() < Duration::from_secs(180),
            "not verified: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pull_with_an_index_fills_matches_locally_and_equals_the_source() {
    let w = World::new();
    let (tpl, src) = (w.path("template.img"), w.path("src.img"));
    template(&tpl);
    derive(&tpl, &src);
    let matched = matching_chunks(&tpl, &src);
    // Equal chunks and those moved by whole chunks; not the changed or
    // the 4 KiB-shifted ones.
    assert!(matched.contains(&0) && matched.contains(&70) && !matched.contains(&20));
    assert!(!matched.contains(&140));
    let idx = w.path("tpl.ferry-index");
    let built = json(&w.ferry(&[
        "index",
        "build",
        "--json",
        "--out",
        idx.to_str().unwrap(),
        tpl.to_str().unwrap(),
    ]));
    assert_eq!(built["files_hashed"], 1, "{built}");

    let (_serve, port) = w.serve(&src, &[]);
    // Without the index: everything crosses the wire.
    let plain = pull_verified(&w, port, "plain.img", "p", &[]);
    assert_files_equal(&src, &w.path("plain.img"));
    assert_eq!(plain["filled_local_bytes"], 0, "{plain}");

    // With it, the copier held back: the local filler alone fills every
    // match, and nothing else.
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--index".into(), idx.display().to_string()]);
    args.push("--hold-background".into());
    let pull = w.pull(&args);
    let want = matched.len() as u64 * CHUNK;
    let s = w.wait_status("the local fills", Duration::from_secs(120), |s| {
        s["filled_local_bytes"].as_u64().unwrap_or(0) >= want
    });
    assert_eq!(s["filled_local_bytes"].as_u64().unwrap(), want, "{s}");
    assert_eq!(s["fetched_background_bytes"], 0, "{s}");
    assert_eq!(s["local_stale_chunks"], 0, "{s}");
    w.background("resume");
    let s = w.wait_verified(Duration::from_secs(180));
    assert_files_equal(&src, &w.path("dst.img"));
    assert_eq!(s["filled_local_bytes"].as_u64().unwrap(), want, "{s}");
    let data = s["source_data_bytes"].as_u64().unwrap();
    let fetched = s["fetched_background_bytes"].as_u64().unwrap()
        + s["fetched_on_demand_bytes"].as_u64().unwrap();
    assert_eq!(fetched + want, data, "{s}");
    // The final report says what was filled locally.
    let log = pull.log_text();
    assert!(
        log.contains(&format!("filled_local_bytes={want}")),
        "no local fills in the final report: {log}"
    );
    // The data is random (incompressible): the wire carries what was
    // fetched, so the index saves about what it filled.
    let (wire, wire_plain) = (
        s["wire_rx_bytes"].as_u64().unwrap(),
        plain["wire_rx_bytes"].as_u64().unwrap(),
    );
    assert!(
        wire + want * 9 / 10 < wire_plain,
        "{wire} bytes on the wire with the index, {wire_plain} without; {want} filled locally"
    );
}

#[test]
fn a_template_changed_after_indexing_never_puts_wrong_data_on_the_disk() {
    let w = World::new();
    let (tpl, src) = (w.path("template.img"), w.path("src.img"));
    template(&tpl);
    derive(&tpl, &src);
    let matched = matching_chunks(&tpl, &src);
    let idx = w.path("tpl.ferry-index");
    json(&w.ferry(&[
        "index",
        "build",
        "--json",
        "--out",
        idx.to_str().unwrap(),
        tpl.to_str().unwrap(),
    ]));
    // The template changes after indexing: chunks 0..8 (equal in the
    // source) now hold something else.
    apply_write(&tpl, 0, &vec![0x6b; 8 * CHUNK as usize]);
    let stale = matched.iter().filter(|c| **c < 8).count() as u64;
    assert_eq!(stale, 8);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--index".into(), idx.display().to_string()]);
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let want = (matched.len() as u64 - stale) * CHUNK;
    let s = w.wait_status("the local fills", Duration::from_secs(120), |s| {
        s["filled_local_bytes"].as_u64().unwrap_or(0) >= want
            && s["local_stale_chunks"].as_u64().unwrap_or(0) >= stale
    });
    assert_eq!(s["filled_local_bytes"].as_u64().unwrap(), want, "{s}");
    assert_eq!(s["local_stale_chunks"].as_u64().unwrap(), stale, "{s}");
    w.background("resume");
    let s = w.wait_verified(Duration::from_secs(180));
    assert_files_equal(&src, &w.path("dst.img"));
    assert_eq!(s["verified"], "ok", "{s}");
}

#[test]
fn index_update_hashes_only_files_that_changed() {
    let w = World::new();
    let (a, b) = (w.path("a.img"), w.path("b.img"));
    make_image(&a, 4 * MIB, &[(0, 4 * MIB)], 51);
    make_image(&b, 4 * MIB, &[(0, 2 * MIB)], 52);
    let idx = w.path("i.ferry-index");
    let built = json(&w.ferry(&[
        "index",
        "build",
        "--json",
        "--out",
        idx.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]));
    assert_eq!(built["files_hashed"], 2, "{built}");
    assert_eq!(built["records"], 96, "{built}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&idx).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the index is owner-only");
    let up = json(&w.ferry(&["index", "update", "--json", idx.to_str().unwrap()]));
    assert_eq!(up["files_hashed"], 0, "{up}");
    assert_eq!(up["bytes_hashed"], 0, "{up}");
    assert_eq!(up["files_unchanged"], 2, "{up}");
    assert_eq!(up["rewritten"], false, "{up}");
    // b changes: only b is hashed again.
    apply_write(&b, 3 * MIB, &[0x11; CHUNK as usize]);
    let up = json(&w.ferry(&["index", "update", "--json", idx.to_str().unwrap()]));
    assert_eq!(up["files_hashed"], 1, "{up}");
    assert_eq!(up["bytes_hashed"], 4 * MIB, "{up}");
    assert_eq!(up["files_unchanged"], 1, "{up}");
    assert_eq!(up["records"], 97, "{up}");
    let stats = json(&w.ferry(&["index", "stats", "--json", idx.to_str().unwrap()]));
    assert_eq!(stats["files"], 2, "{stats}");
    assert_eq!(stats["records"], 97, "{stats}");
}
