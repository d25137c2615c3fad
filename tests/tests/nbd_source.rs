//! `ferry serve --nbd-source URI --qmp SOCKET` against the real
//! qemu-storage-daemon: a disk read through QEMU's NBD export migrates
//! verified, byte for byte, with its holes not crossing the wire; a write
//! through QEMU after serve started fails the pull with a clear error and
//! never reaches the destination; bad options are refused. A missing tool
//! fails the test.

use std::time::Duration;

use ferry_tests::qmp::{NbdWriter, StorageDaemon};
use ferry_tests::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// A qemu-storage-daemon on `image` in the world's directory `q`, with a
/// read-only export `src` (what ferry reads) and a writable one `w` (the
/// VM's writes).
fn daemon(w: &World, image: &std::path::Path) -> StorageDaemon {
    let dir = w.path("q");
    std::fs::create_dir(&dir).expect("make the daemon's directory");
    let mut qsd = StorageDaemon::start(&dir, image);
    qsd.export("src", "src", &[], false).expect("export src");
    qsd.export("w", "w", &[], true).expect("export w");
    qsd
}

/// `ferry serve` of export `src` through the daemon's second monitor.
fn serve(w: &World, qsd: &StorageDaemon) -> (Proc, u16) {
    let uri = qsd.uri("src");
    let qmp = qsd.ferry_qmp_socket.display().to_string();
    w.serve_from(&["--nbd-source", &uri, "--qmp", &qmp], &[])
}

#[test]
fn a_disk_read_through_qemus_nbd_export_migrates_verified() {
    let w = World::new();
    let src = w.path("src.img");
    let extents = [(MIB, 8 * MIB), (40 * MIB, 3 * MIB + 4096)];
    make_image(&src, 64 * MIB, &extents, 61);
    // Allocated zeros: data to base:allocation, answered as zero.
    apply_write(&src, 20 * MIB, &vec![0u8; 2 * MIB as usize]);
    let allocated_chunks: u64 = [
        (MIB, 8 * MIB),
        (40 * MIB, 3 * MIB + 4096),
        (20 * MIB, 2 * MIB),
    ]
    .iter()
    .map(|(off, len)| (off + len).div_ceil(CHUNK) - off / CHUNK)
    .sum();
    let mut qsd = daemon(&w, &src);
    let (serve, port) = serve(&w, &qsd);
    let log = serve.log_text();
    assert!(
        log.contains(&format!("unhashed_chunks={allocated_chunks}")),
        "the first manifest is not the export's allocation ({allocated_chunks} chunks): {log}"
    );
    let watching = qsd.dirty_bitmaps();
    assert!(
        watching.len() == 1 && watching[0].starts_with("ferry-serve-"),
        "no bitmap watches the node: {watching:?}"
    );
    let _pull = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(120));
    assert_files_equal(&src, &w.path("dst.img"));
    let data = 8 * MIB + 3 * MIB + 4096;
    let rx = s["wire_rx_bytes"].as_u64().expect("wire_rx_bytes");
    assert!(
        rx < data + 3 * MIB,
        "more than the data crossed the wire: {rx} bytes for {data}: {s}"
    );
    assert!(
        !serve.log_text().contains("changed"),
        "{}",
        serve.log_text()
    );
}

#[test]
fn a_write_through_qemu_after_serve_started_fails_the_pull_and_gives_no_new_data() {
    let w = World::new();
    let src = w.path("src.img");
    // Data in the first half, a hole in the second.
    make_image(&src, 32 * MIB, &[(0, 16 * MIB)], 62);
    let orig = std::fs::read(&src).expect("read the image");
    let qsd = daemon(&w, &src);
    let (_serve, port) = serve(&w, &qsd);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let text = w.qemu_io(&["read -v 0 4096"]);
    assert!(text.contains(&qemu_hex(&orig[..16])), "chunk 0: {text}");

    // The VM writes after all: into data the destination lacks, and into
    // a hole.
    let mut vm = NbdWriter::connect(&qsd.nbd_socket, "w");
    vm.write(8 * MIB, &[0xee; 65536]);
    vm.write(24 * MIB, &[0xee; 65536]);
    // A read of absent data fails, never returns the new bytes.
    let (ok, text) = w.qemu_io_with(&[], &["read -v 8388608 4096"]);
    assert!(!ok || text.contains("Input/output error"), "{text}");
    assert!(!text.contains("ee ee ee ee"), "new data served: {text}");
    let s = w.wait_status("the pull to fail", Duration::from_secs(60), |s| {
        assert_ne!(s["verified"], "ok", "verified a changed source: {s}");
        s["phase"] == "error"
    });
    let why = s["error"].as_str().expect("an error");
    assert!(why.contains("SourceChanged"), "{why}");
    assert!(why.contains("NBD export \"src\" was written"), "{why}");
    // The background copy cannot bring anything of it either.
    w.background("resume");
    std::thread::sleep(Duration::from_secs(2));
    let s = w.status();
    assert_eq!(s["phase"], "error", "{s}");
    assert_ne!(s["verified"], "ok", "{s}");
    let (_, text) = w.qemu_io_with(&[], &["read -v 25165824 4096"]);
    assert!(!text.contains("ee ee ee ee"), "new data served: {text}");
    let dst = std::fs::read(w.path("dst.img")).expect("read the destination");
    assert!(
        !dst.windows(4096)
            .step_by(4096)
            .any(|b| b.iter().all(|x| *x == 0xee)),
        "the new data reached the destination"
    );
}

#[test]
fn bad_nbd_source_options_are_refused() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 63);
    let qsd = daemon(&w, &src);
    let uri = qsd.uri("src");
    let qmp = qsd.ferry_qmp_socket.display().to_string();
    let id = w.path("src-id").display().to_string();
    let common = [
        "serve",
        "--listen",
        "127.0.0.1:1",
        "--identity",
        &id,
        "--trust-peer",
        &w.dst_fp,
    ];
    let run = |extra: &[&str]| {
        let mut a = common.to_vec();
        a.extend_from_slice(extra);
        let out = w.ferry(&a);
        assert!(!out.status.success(), "ferry serve {extra:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Without the monitor ferry could not see writes: refused.
    let err = run(&["--nbd-source", &uri]);
    assert!(err.contains("--qmp"), "{err}");
    // --live is for a VM's export only.
    let err = run(&["--disk", "x.img", "--live"]);
    assert!(err.contains("--nbd-source"), "{err}");
    // A file and an export at once.
    let err = run(&["--nbd-source", &uri, "--qmp", &qmp, "--disk", "x.img"]);
    assert!(err.contains("cannot be used with"), "{err}");
    // An export the daemon lacks: its exports are named.
    let other = qsd.uri("nosuch");
    let err = run(&["--nbd-source", &other, "--qmp", &qmp]);
    assert!(
        err.contains("\"nosuch\"") && err.contains("--nbd-node"),
        "{err}"
    );
    // Not an NBD URI.
    let err = run(&["--nbd-source", "http://x/y", "--qmp", &qmp]);
    assert!(
        err.contains("--nbd-source") && err.contains("http://x/y"),
        "{err}"
    );
}
