//! A lazy source: `ferry serve` is ready before it reads any data (the
//! first manifest comes from the image's holes), chunks are hashed as they
//! are sent and the hashes kept for the next run, a migration from it is
//! verified byte for byte, and a source written behind ferry's back fails
//! the pull with a clear error instead of handing out new or stale data.

use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// Bytes the process has read through read(2) and friends so far
/// (`rchar` of /proc/PID/io: counted whether or not the page cache had
/// them).
fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

#[test]
fn serve_is_ready_before_reading_the_disks_data() {
    let w = World::new();
    let src = w.path("src.img");
    // 256 MiB of data in 16 extents over a 1 GiB disk.
    let extents: Vec<(u64, u64)> = (0..16).map(|i| (i * 64 * MIB, 16 * MIB)).collect();
    make_image(&src, 1024 * MIB, &extents, 11);
    let data = 256 * MIB;
    let (serve, _port) = w.serve(&src, &[]);
    let read = rchar(serve.child.id());
    assert!(
        read < data / 100,
        "ferry serve read {read} bytes before it was ready, for {data} bytes of data"
    );
    let log = serve.log_text();
    assert!(
        log.contains("unhashed_chunks=4096"),
        "the first manifest is not the lazy one: {log}"
    );
}

#[test]
fn a_lazy_source_migrates_verified_and_keeps_its_hashes_for_the_next_run() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(
        &src,
        64 * MIB,
        &[(MIB, 8 * MIB), (40 * MIB, 3 * MIB + 4096)],
        12,
    );
    // An allocated range of zeros: unhashed at first, answered as zero.
    apply_write(&src, 20 * MIB, &vec![0u8; 2 * MIB as usize]);
    let (mut serve, port) = w.serve(&src, &[]);
    let _pull = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(120));
    assert_files_equal(&src, &w.path("dst.img"));
    assert!(
        s["wire_rx_bytes"].as_u64().unwrap() < 14 * MIB,
        "more than the data crossed the wire: {s}"
    );
    // The complete manifest asked for at verification is saved.
    let cache = w.path("src.img.ferry-manifest");
    let t0 = Instant::now();
    while !cache.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no hash cache");
        std::thread::sleep(Duration::from_millis(100));
    }
    let side = w.path("src.img.ferry-source");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&side).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the source id is owner-only");
    serve.kill9();
    // Served again: every hash known from the start, the same source id
    // (a destination's state file stays valid).
    let again = w.serve_on(&src, port);
    let log = again.log_text();
    assert!(log.contains("unhashed_chunks=0"), "{log}");
    assert!(log.contains("new_source_id=false"), "{log}");
}

#[test]
fn hash_cache_none_and_a_path_both_work() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 2 * MIB)], 15);
    // Not cached: the id is kept beside the image.
    let (mut serve, port) = w.serve(&src, &["--hash-cache", "none"]);
    let mut pull = w.pull(&w.pull_args(port, "dst.img"));
    w.wait_verified(Duration::from_secs(120));
    assert_files_equal(&src, &w.path("dst.img"));
    assert!(!w.path("src.img.ferry-manifest").exists());
    assert!(w.path("src.img.ferry-source").exists());
    pull.kill9();
    serve.kill9();
    // Cached elsewhere: the id is kept beside the cache.
    std::fs::create_dir(w.path("cache")).unwrap();
    let cache = w.path("cache/disk.ferry-manifest");
    let (_serve, port) = w.serve(&src, &["--hash-cache", cache.to_str().unwrap()]);
    let _pull = w.pull(&w.pull_args_tagged(port, "dst2.img", "2"));
    let t0 = Instant::now();
    loop {
        let s = w.status_of("ctl2.sock");
        if s["verified"] == "ok" {
            break;
        }
        assert!(
            s["phase"] != "error" && t0.elapsed() < Duration::from_secs(120),
            "not verified: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while !cache.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no hash cache at {cache:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(w.path("cache/disk.ferry-source").exists());
    assert_files_equal(&src, &w.path("dst2.img"));
}

/// Waits until the pull reports phase "error"; returns its error.
fn wait_error(w: &World) -> String {
    let s = w.wait_status("the pull to fail", Duration::from_secs(60), |s| {
        assert_ne!(s["verified"], "ok", "verified a changed source: {s}");
        s["phase"] == "error"
    });
    s["error"].as_str().expect("an error").to_string()
}

#[test]
fn a_source_written_behind_ferrys_back_fails_the_pull_and_gives_no_new_data() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    // Data in the first half, a hole in the second.
    make_image(&src, 32 * MIB, &[(0, 16 * MIB)], 13);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let orig = std::fs::read(&src).unwrap();
    let text = w.qemu_io(&["read -v 0 4096"]);
    assert!(text.contains(&qemu_hex(&orig[..16])), "chunk 0: {text}");
    // Someone writes the source: into data not yet at the destination,
    // and into a hole.
    apply_write(&src, 8 * MIB, &[0xee; 65536]);
    apply_write(&src, 24 * MIB, &[0xee; 65536]);
    // A read of absent data fails, never returns the new bytes.
    let (ok, text) = w.qemu_io_with(&[], &["read -v 8388608 4096"]);
    assert!(!ok || text.contains("Input/output error"), "{text}");
    assert!(!text.contains("ee ee ee ee"), "new data served: {text}");
    let why = wait_error(&w);
    assert!(why.contains("SourceChanged"), "{why}");
    assert!(why.contains("src.img"), "{why}");
    assert!(why.contains("it was written"), "{why}");
    // The background copy cannot bring anything of it either.
    w.background("resume");
    std::thread::sleep(Duration::from_secs(2));
    let s = w.status();
    assert_eq!(s["phase"], "error", "{s}");
    assert_ne!(s["verified"], "ok", "{s}");
    let (_, text) = w.qemu_io_with(&[], &["read -v 25165824 4096"]);
    assert!(!text.contains("ee ee ee ee"), "new data served: {text}");
    let dst = std::fs::read(w.path("dst.img")).unwrap();
    assert!(
        !dst.windows(4096)
            .step_by(4096)
            .any(|b| b.iter().all(|x| *x == 0xee)),
        "the new data reached the destination"
    );
}

#[test]
fn a_write_into_a_hole_alone_fails_the_pull_instead_of_being_lost() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 32 * MIB, &[(0, 4 * MIB)], 14);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    w.wait_status("the manifest", Duration::from_secs(60), |s| {
        s["source_data_bytes"].as_u64().unwrap_or(0) > 0
    });
    // Written into a region the destination holds as zeros (a hole).
    apply_write(&src, 24 * MIB, &[0x5a; 65536]);
    w.background("resume");
    let why = wait_error(&w);
    assert!(why.contains("SourceChanged"), "{why}");
    assert!(why.contains("src.img"), "{why}");
}
