//! Block devices at both ends (loop devices the test makes on sparse files
//! in its temporary directory, detached when it ends): `ferry serve` of a
//! block device, `ferry pull --disk` into one (its old contents zeroed,
//! the disk byte for byte the source's, verified, resumed after a restart
//! with an unflushed guest write kept,
//! the rest of a larger device left alone), and the refusals: a device
//! smaller than the source, a device without `--state`, a state file of a
//! device used with a file.
//!
//! These tests need root and `losetup` (util-linux); without them they
//! fail, they are not skipped.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;
/// What the destination devices hold before a pull: not zeros, so a zero
/// chunk of the source that showed the old contents would be seen.
const OLD: u8 = 0xab;

/// A loop device attached by this test, detached on drop (only this one).
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("cannot run losetup: this test needs util-linux's losetup (and root)");
        assert!(
            out.status.success(),
            "losetup --find --show {} failed (this test needs root): {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let made = Self {
            dev: PathBuf::from(&dev),
        };
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        made
    }

    fn path(&self) -> &str {
        self.dev.to_str().expect("utf8")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A file of `size` bytes, every byte [`OLD`].
fn old_contents(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create");
    let buf = vec![OLD; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        f.write_all_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
    f.sync_all().expect("sync");
}

/// `len` bytes of `path` at `offset`.
fn read(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read");
    buf
}

/// `ferry pull` arguments from the source at `port` into `disk`, with
/// `state` when given.
fn pull_args(w: &World, port: u16, disk: &str, state: Option<&Path>) -> Vec<String> {
    let mut args = w.pull_args(port, "unused.img");
    let i = args.iter().position(|a| a == "--disk").expect("--disk") + 1;
    args[i] = disk.to_string();
    if let Some(s) = state {
        args.extend(["--state".to_string(), s.display().to_string()]);
    }
    args
}

/// Runs a `ferry pull` that must refuse to start: its exit code and log.
fn refused(w: &World, args: &[String]) -> (Option<i32>, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = w.spawn("refused-pull", &a);
    let code = p.wait_exit(Duration::from_secs(60));
    if code.is_none() {
        p.kill9();
    }
    (code, p.log_text())
}

/// Feature: a block device as `ferry pull --disk` (a loop device here),
/// served from a block device. Before, the pull refused it as a backing
/// file of size 0.
#[test]
fn a_block_device_is_pulled_from_a_block_device_verified_and_resumed() {
    let w = World::new();
    let size = 8 * MIB;
    let src_img = w.path("src.img");
    make_image(
        &src_img,
        size,
        &[(0, 64 * 1024), (MIB + 4096, 300 * 1024), (5 * MIB, MIB)],
        7,
    );
    // The destination device is 1 MiB larger than the source, full of old
    // bytes; its last MiB is not the disk's and must be left alone.
    let dst_img = w.path("dst-device.img");
    old_contents(&dst_img, size + MIB);
    let src_dev = LoopDev::attach(&src_img);
    let dst_dev = LoopDev::attach(&dst_img);
    let manifest = w.path("src.manifest");
    let (_serve, port) = w.serve(
        &src_dev.dev,
        &["--hash-cache", manifest.to_str().expect("utf8")],
    );
    let state = w.path("dst.state");
    let args = pull_args(&w, port, dst_dev.path(), Some(&state));
    let pull = w.pull(&args);
    let s = w.wait_verified(Duration::from_secs(180));
    assert_eq!(s["total_bytes"], size, "{s}");
    // The device's first 8 MiB are the source's, byte for byte (its old
    // bytes zeroed where the source has zero chunks, which are never
    // fetched); the rest is as it was.
    let got = read(&dst_dev.dev, 0, size);
    let want = std::fs::read(&src_img).expect("read source");
    if let Some(i) = (0..size as usize).find(|i| got[*i] != want[*i]) {
        panic!(
            "the device differs from the source at byte {i}: {:#x} != {:#x}",
            got[i], want[i]
        );
    }
    assert!(
        read(&dst_dev.dev, size, MIB).iter().all(|b| *b == OLD),
        "the device's bytes past the disk were changed"
    );
    // A guest write, acknowledged and never flushed, then the pull is
    // killed: the restart (same boot) resumes from the state file,
    // complete and verified at once, and keeps the write.
    let guest = vec![0x5a_u8; 8192];
    assert_eq!(
        nbd_write_without_flush(&w.path("nbd.sock"), 3 * MIB, &guest),
        0,
        "the guest write failed"
    );
    let mut pull = pull;
    pull.kill9();
    drop(pull);
    let _pull = w.pull(&args);
    let s = w.wait_verified(Duration::from_secs(60));
    assert_eq!(s["total_bytes"], size, "{s}");
    assert_eq!(s["guest_written_chunks"], 1, "{s}");
    assert_eq!(read(&dst_dev.dev, 3 * MIB, 8192), guest);
    drop(_pull);
    // That state file belongs to a block device: a file as --disk is
    // refused, even one of the right size.
    let file = w.path("file.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .expect("file");
    let (code, log) = refused(
        &w,
        &pull_args(&w, port, file.to_str().expect("utf8"), Some(&state)),
    );
    assert!(code.is_some_and(|c| c != 0), "not refused: {log}");
    assert!(
        log.contains("made for a block device"),
        "unclear refusal: {log}"
    );
    drop(dst_dev);
    drop(src_dev);
}

/// A block device smaller than the source, and one without `--state`, are
/// refused with messages that say so, and nothing is written to them.
#[test]
fn a_small_block_device_or_one_without_state_is_refused_untouched() {
    let w = World::new();
    let size = 8 * MIB;
    let src_img = w.path("src.img");
    make_image(&src_img, size, &[(0, MIB)], 3);
    let (_serve, port) = w.serve(&src_img, &[]);
    let small_img = w.path("small.img");
    old_contents(&small_img, 4 * MIB);
    let small = LoopDev::attach(&small_img);
    let state = w.path("small.state");
    let (code, log) = refused(&w, &pull_args(&w, port, small.path(), Some(&state)));
    assert!(code.is_some_and(|c| c != 0), "not refused: {log}");
    assert!(
        log.contains(&format!(
            "holds {} bytes, but the source's disk is {size} bytes",
            4 * MIB
        )),
        "unclear refusal: {log}"
    );
    assert!(
        !state.exists(),
        "a state file was made for a refused device"
    );
    assert!(
        read(&small.dev, 0, 4 * MIB).iter().all(|b| *b == OLD),
        "the refused device was written to"
    );
    let big_img = w.path("big.img");
    old_contents(&big_img, size);
    let big = LoopDev::attach(&big_img);
    let (code, log) = refused(&w, &pull_args(&w, port, big.path(), None));
    assert!(code.is_some_and(|c| c != 0), "not refused: {log}");
    assert!(
        log.contains("is a block device: pass --state PATH"),
        "unclear refusal: {log}"
    );
    assert!(
        read(&big.dev, 0, size).iter().all(|b| *b == OLD),
        "the refused device was written to"
    );
    // A source that does not trust us stops a fresh pull, which then
    // removes what it created: its state file, never the device node.
    let other = w.keygen("other-id");
    let port2 = free_udp_port();
    let listen = format!("127.0.0.1:{port2}");
    let id = w.path("src-id");
    let serve2 = w.spawn(
        "serve-other",
        &[
            "serve",
            "--disk",
            src_img.to_str().expect("utf8"),
            "--listen",
            &listen,
            "--identity",
            id.to_str().expect("utf8"),
            "--trust-peer",
            &other,
        ],
    );
    let t0 = std::time::Instant::now();
    while !serve2.log_text().contains("ferry serve: exporting") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "serve did not start: {}",
            serve2.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let state2 = w.path("big.state");
    let (code, log) = refused(&w, &pull_args(&w, port2, big.path(), Some(&state2)));
    assert!(code.is_some_and(|c| c != 0), "not refused: {log}");
    // The refusal is seen either at the handshake (the source's TLS alert)
    // or on the Welcome stream, whichever comes first.
    assert!(
        log.contains("did not accept") || log.contains("refused our certificate"),
        "unclear refusal: {log}"
    );
    assert!(!state2.exists(), "the refused pull left its state file");
    assert!(
        big.dev.exists(),
        "the refused pull removed the device node {}",
        big.dev.display()
    );
    drop(big);
    drop(small);
}

/// Defect: `ferry pull --start-over` after an abort removed the disk and
/// the state file; with a block device as `--disk` that removed the device
/// node (and the fresh pull then made a regular file in its place). Now
/// only the state file goes; the device is taken anew and zeroed.
#[test]
fn an_aborted_block_device_starts_over_on_the_same_device() {
    let w = World::new();
    let size = 8 * MIB;
    let src_img = w.path("src.img");
    make_image(&src_img, size, &[(0, MIB), (6 * MIB, 512 * 1024)], 11);
    let (_serve, port) = w.serve(&src_img, &[]);
    let dst_img = w.path("dst-device.img");
    old_contents(&dst_img, size);
    let dst = LoopDev::attach(&dst_img);
    let state = w.path("dst.state");
    let mut args = pull_args(&w, port, dst.path(), Some(&state));
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    let ctl = w.path("ctl.sock");
    let out = w.ferry(&["abort", "--control", ctl.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "abort failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pull.wait_exit(Duration::from_secs(60)), Some(4));
    drop(pull);
    // The writes directory is beside the state file, not in /dev.
    assert!(w.path("dst.state.ferry-writes").is_dir());

    let mut over = pull_args(&w, port, dst.path(), Some(&state));
    over.push("--start-over".into());
    let _pull = w.pull(&over);
    let s = w.wait_verified(Duration::from_secs(180));
    assert_eq!(s["total_bytes"], size, "{s}");
    assert!(
        ferry_store_is_block_device(&dst.dev),
        "{} is no longer a block device",
        dst.path()
    );
    let got = read(&dst.dev, 0, size);
    let want = std::fs::read(&src_img).expect("read source");
    assert!(got == want, "the device is not the source's disk");
    drop(_pull);
    drop(dst);
}

fn ferry_store_is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}
