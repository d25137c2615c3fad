//! The destination's backing file and state file are trusted only when
//! they can be: guest writes keep their mark across a crash, a damaged or
//! foreign state file is refused, a second pull of the same disk is
//! refused, the files are owner-only, and a failed verification fetches
//! the differing chunks again.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// How a `ferry pull` that should refuse to start ended: its exit code
/// (None: still running after a minute, then killed) and its log.
struct Ended {
    code: Option<i32>,
    log: String,
}

impl Ended {
    fn refused(&self) -> bool {
        self.code.is_some_and(|c| c != 0)
    }
}

fn run_pull(w: &World, args: &[String]) -> Ended {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = w.spawn("refused-pull", &a);
    let code = p.wait_exit(Duration::from_secs(60));
    if code.is_none() {
        p.kill9();
    }
    Ended {
        code,
        log: p.log_text(),
    }
}

/// Defect: a guest write to an already-present block, acknowledged but not
/// flushed, lost its guest mark when the pull was killed before the next
/// sync round; on restart the chunk was compared with the source and the
/// verification failed for good.
#[test]
fn an_unflushed_write_to_a_present_block_keeps_its_guest_mark_across_a_crash() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 21);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    let at = 100 * 65536;
    // Chunk 100 fetched, then persisted present by a sync round (every
    // second while anything is unsynced).
    w.qemu_io(&[&format!("read {at} 65536")]);
    std::thread::sleep(Duration::from_millis(2500));
    let err = nbd_write_without_flush(&w.path("nbd.sock"), at, &[0x42; 4096]);
    assert_eq!(err, 0, "the write was not acknowledged");
    pull.kill9();
    let _pull2 = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(120));
    assert!(s["guest_written_chunks"].as_u64().unwrap() >= 1, "{s}");
    let dst = std::fs::read(w.path("dst.img")).unwrap();
    let srcb = std::fs::read(&src).unwrap();
    let at = at as usize;
    assert!(dst[at..at + 4096].iter().all(|b| *b == 0x42), "the write");
    assert_eq!(dst[at + 4096..at + 65536], srcb[at + 4096..at + 65536]);
}

/// Defect: a failed verification never fetched the differing chunks again.
#[test]
fn a_chunk_found_differing_at_verification_is_fetched_again() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, 4 * MIB)], 22);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    // Chunk 5 fetched and persisted present (a sync round every second).
    w.qemu_io(&[&format!("read {} 65536", 5 * 65536)]);
    std::thread::sleep(Duration::from_millis(2500));
    pull.kill9();
    // Bit rot behind ferry's back: in that data chunk, and in a zero chunk
    // (100) of the backing file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("dst.img"))
        .unwrap();
    f.write_all_at(&[0xaa; 512], 5 * 65536 + 4096).unwrap();
    f.write_all_at(&[0xbb; 512], 100 * 65536).unwrap();
    drop(f);
    let _pull2 = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(60));
    assert_eq!(s["verify_refetched_chunks"], 2, "{s}");
    assert_files_equal(&src, &w.path("dst.img"));
}

/// Defect: `--state` naming another destination's state file of the same
/// source was accepted; the guest read zeros where that map said present.
#[test]
fn another_destinations_state_file_is_refused() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, 4 * MIB)], 23);
    let (_serve, port) = w.serve(&src, &[]);
    for d in ["one.img", "two.img"] {
        let mut args = w.pull_args(port, d);
        args.push("--hold-background".into());
        let mut p = w.pull(&args);
        if d == "one.img" {
            w.background("resume");
            w.wait_verified(Duration::from_secs(60));
        }
        p.kill9();
    }
    let mut args = w.pull_args(port, "two.img");
    args.extend([
        "--state".to_string(),
        w.path("one.img.ferry-state").display().to_string(),
    ]);
    let before = std::fs::read(w.path("one.img.ferry-state")).unwrap();
    let out = run_pull(&w, &args);
    assert!(out.refused(), "{}", out.log);
    assert!(
        out.log.contains("does not belong to the backing file"),
        "{}",
        out.log
    );
    assert_eq!(
        std::fs::read(w.path("one.img.ferry-state")).unwrap(),
        before
    );
}

/// Defect: a state file's bitmaps overwritten with 0xff were believed:
/// present (the guest read wrong blocks), written (every block adopted as
/// the guest's, `verified ok` while the disk differed), guest (`verified
/// ok` with nothing checked).
#[test]
fn a_state_file_with_a_bitmap_overwritten_is_refused() {
    let w = World::new();
    let src = w.path("src.img");
    // 16 MiB: 4096 blocks and 256 chunks, one bitmap page each (two slots).
    make_image(&src, 16 * MIB, &[(0, 8 * MIB)], 24);
    let (_serve, port) = w.serve(&src, &[]);
    let state = w.path("dst.img.ferry-state");
    for (name, off) in [("present", 4096), ("guest", 12288), ("written", 20480)] {
        let _ = std::fs::remove_file(w.path("dst.img"));
        let _ = std::fs::remove_file(&state);
        let mut args = w.pull_args(port, "dst.img");
        args.push("--hold-background".into());
        let mut p = w.pull(&args);
        // Something in every map: a read (present), a write (written;
        // guest once synced).
        let err = nbd_write_without_flush(&w.path("nbd.sock"), 65536, &[0x42; 4096]);
        assert_eq!(err, 0);
        std::thread::sleep(Duration::from_millis(2500));
        p.kill9();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&state)
            .unwrap();
        f.write_all_at(&[0xff; 8192], off).unwrap();
        drop(f);
        let out = run_pull(&w, &w.pull_args(port, "dst.img"));
        assert!(out.refused(), "{name}: {}", out.log);
        assert!(
            out.log
                .contains(&format!("of its {name} bitmap fail their checksums")),
            "{name}: {}",
            out.log
        );
    }
}

/// Defects: a second `ferry pull` of the same disk started and served it
/// too; the files were created with the umask's mode (world-readable).
#[test]
fn a_second_pull_of_the_same_disk_is_refused_naming_the_first_and_files_are_owner_only() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, 4 * MIB)], 25);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let first = w.pull(&args);
    for f in ["dst.img", "dst.img.ferry-state"] {
        let mode = std::fs::metadata(w.path(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
    let out = run_pull(&w, &w.pull_args_tagged(port, "dst.img", "-2"));
    assert!(out.refused(), "{}", out.log);
    let pid = first.child.id();
    assert!(
        out.log.contains(&format!("in use by PID {pid}")),
        "{}",
        out.log
    );
    // The first one still serves.
    assert_eq!(w.status()["phase"], "copying");
}
