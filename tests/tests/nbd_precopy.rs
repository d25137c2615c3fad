//! Pre-copy from a running VM's disk read through QEMU: `ferry serve
//! --nbd-source URI --qmp SOCKET --live` against the real
//! qemu-storage-daemon while a writer (the VM) writes random blocks
//! through the daemon's writable export; `ferry pull --precopy` copies
//! meanwhile, the writer stops (the VM paused), `ferry switchover` runs,
//! and the destination disk read through its NBD export is the source's
//! byte for byte: every block written, nothing stale. A write after the
//! switchover stops the source with a clear error. With a real QEMU
//! (`qemu-system-x86_64 -M none`: a run state, no guest), the switchover
//! is refused while QMP says the VM runs and goes through once it is
//! stopped. A missing tool fails the test under FERRY_REQUIRE_ALL=1.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::qmp::{NbdWriter, Qmp, StorageDaemon};
use ferry_tests::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const CHUNK: u64 = 64 * 1024;

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// One write of the VM: 64 KiB at a chunk boundary (three in four) or
/// 4 KiB anywhere 4 KiB-aligned, random bytes.
fn one_write(rng: &mut u64) -> (u64, Vec<u8>) {
    let (len, off) = if !next(rng).is_multiple_of(4) {
        (CHUNK, (next(rng) % (DISK / CHUNK)) * CHUNK)
    } else {
        (4096, (next(rng) % (DISK / 4096)) * 4096)
    };
    let mut data = vec![0u8; len as usize];
    for w in data.chunks_mut(8) {
        w.copy_from_slice(&next(rng).to_le_bytes());
    }
    (off, data)
}

/// The VM's writes, in order: (offset, bytes).
type Writes = Vec<(u64, Vec<u8>)>;

/// The VM: writes through export `w` until stopped, each write
/// acknowledged before the next; returns every write in order.
struct Vm {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Writes>>,
}

impl Vm {
    fn start(sock: PathBuf, seed: u64) -> Vm {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut nbd = NbdWriter::connect(&sock, "w");
            let mut rng = seed;
            let mut log = Vec::new();
            let t0 = Instant::now();
            // Bounded in count and time whatever happens.
            while !s.load(Ordering::Relaxed) && log.len() < 20_000 && t0.elapsed().as_secs() < 300 {
                let (off, data) = one_write(&mut rng);
                nbd.write(off, &data);
                log.push((off, data));
                d.fetch_add(1, Ordering::Relaxed);
                // About 3 MB/s of 64 KiB writes: the pre-copy (4 MB/s)
                // copies chunks that are written again after.
                std::thread::sleep(Duration::from_millis(15));
            }
            log
        });
        Vm {
            stop,
            done,
            thread: Some(thread),
        }
    }

    fn writes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops writing (the VM is paused): every write is acknowledged.
    fn pause(mut self) -> Writes {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the VM's writer")
    }
}

fn convert(from: &str, to: &std::path::Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", from])
        .arg(to)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert {from} failed");
}

fn wait_log(p: &Proc, what: &str) {
    let t0 = Instant::now();
    while !p.log_text().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {what:?} in {}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_writing_through_qemu_during_precopy_finds_every_write_at_the_destination() {
    if !require_tool("qemu-img") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, DISK, &[(MIB, 6 * MIB), (20 * MIB, 5 * MIB)], 71);
    let mut expected = std::fs::read(&src).expect("read the image");
    let dir = w.path("q");
    std::fs::create_dir(&dir).expect("the daemon's directory");
    let mut qsd = StorageDaemon::start(&dir, &src);
    qsd.export("src", "src", &[], false).expect("export src");
    qsd.export("w", "w", &[], true).expect("export w");
    let uri = qsd.uri("src");
    let qmp = qsd.ferry_qmp_socket.display().to_string();
    let (serve, port) = w.serve_from(&["--nbd-source", &uri, "--qmp", &qmp, "--live"], &[]);
    assert!(
        serve.log_text().contains("live: pre-copy rounds"),
        "{}",
        serve.log_text()
    );

    // A pull that would not follow the VM's writes is refused.
    let plain = w.pull_args(port, "plain.img");
    let a: Vec<&str> = plain.iter().map(String::as_str).collect();
    let out = w.ferry(&a);
    assert!(!out.status.success(), "a plain pull of a live source ran");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pull it with --precopy"),
        "{out:?}"
    );

    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--precopy".into(), "--rate".into(), "4M".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let pull = w.spawn("pull", &a);
    wait_log(&pull, "pre-copying");
    let vm = Vm::start(qsd.nbd_socket.clone(), 0x2545_f491_4f6c_dd1d);
    let s = w.wait_status(
        "change rounds applied while data is copied",
        Duration::from_secs(120),
        |s| {
            vm.writes() >= 100
                && s["precopy_generation"].as_u64().unwrap_or(0) >= 3
                && s["present_bytes"].as_u64().unwrap_or(0) > 8 * MIB
        },
    );
    assert_eq!(s["precopy"], "copying", "{s}");
    let held_out = w.path("held-read.raw");
    let mut early = w.held_read(&held_out);
    // The bitmaps ferry keeps on the node: one recording generation (a
    // round's frozen one may be there for a moment).
    let gens = qsd.dirty_bitmaps();
    assert!(
        !gens.is_empty() && gens.iter().all(|g| g.starts_with("ferry-serve-")),
        "{gens:?}"
    );

    // The VM is paused; the switchover.
    let writes = vm.pause();
    for (off, data) in &writes {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let ctl = w.path("ctl.sock");
    let out = w.ferry(&["switchover", "--control", ctl.to_str().unwrap()]);
    assert!(out.status.success(), "switchover failed: {out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON reply");
    assert_eq!(reply["ok"], true, "{reply}");
    let ms = reply["switchover_ms"].as_f64().expect("switchover_ms");
    eprintln!(
        "switchover (freeze to serving): {ms:.1} ms after {} writes; generation {}",
        writes.len(),
        reply["generation"]
    );
    wait_log(&serve, "the VM's disk is frozen");
    let text = serve.log_text();
    let frozen = text
        .lines()
        .find(|l| l.contains("the VM's disk is frozen"))
        .unwrap_or_default();
    eprintln!(
        "source: {}",
        &frozen[frozen.find("final_chunks").unwrap_or(0)..]
    );

    // The source as the VM left it is what it wrote, replayed.
    let at_source = w.path("source-read.raw");
    convert(&uri, &at_source);
    assert!(
        std::fs::read(&at_source).unwrap() == expected,
        "the source disk is not the VM's writes replayed"
    );
    // The destination, read through its NBD export, is the source.
    let back = w.path("read-back.raw");
    convert(
        &format!("nbd+unix:///ferry?socket={}", w.path("nbd.sock").display()),
        &back,
    );
    assert_files_equal(&at_source, &back);
    assert!(early.wait().unwrap().success(), "the held read failed");
    assert_files_equal(&at_source, &held_out);
    let s = w.wait_verified(Duration::from_secs(180));
    assert_eq!(s["precopy"], "switched", "{s}");
    assert_eq!(s["verified_chunks"], DISK / CHUNK, "{s}");
    assert_files_equal(&at_source, &w.path("dst.img"));
    let human = w.ferry(&["status", "--control", ctl.to_str().unwrap()]);
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(human.contains("pre-copy:    switched over in"), "{human}");
    assert!(
        !serve.log_text().contains("source disk changed"),
        "{}",
        serve.log_text()
    );

    // A write after the switchover (the VM was not paused after all):
    // the source stops with a clear error, never serves it silently.
    let mut late = NbdWriter::connect(&qsd.nbd_socket, "w");
    late.write(3 * MIB, &[0xee; 4096]);
    let t0 = Instant::now();
    while !serve.log_text().contains("written after the switchover") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "a write after the switchover went unnoticed: {}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        serve.log_text().contains("the VM must stay paused"),
        "{}",
        serve.log_text()
    );
}

/// A QEMU with no guest (`-M none`) but a run state, the VM's disk as node
/// `disk0` over `image`, two QMP monitors (the test's and ferry's) and an
/// NBD server exporting `src` (read-only) and `w` (writable), all in
/// `dir`; running. Killed (its PID only) when dropped.
struct Vmm {
    _proc: Proc,
    qmp: Qmp,
    ferry_qmp: PathBuf,
    nbd: PathBuf,
}

fn start_qemu(dir: &std::path::Path, image: &std::path::Path) -> Vmm {
    let (m0, m1, nbd) = (
        dir.join("qmp.sock"),
        dir.join("ferry-qmp.sock"),
        dir.join("nbd.sock"),
    );
    let log = dir.join("qemu.log");
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "none", "-nodefaults", "-display", "none"])
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            image.display()
        ))
        .args(["-blockdev", "driver=raw,file=file0,node-name=disk0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            m0.display()
        ))
        .args(["-mon", "chardev=m0,mode=control"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=m1,path={},server=on,wait=off",
            m1.display()
        ))
        .args(["-mon", "chardev=m1,mode=control"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("qemu's log"))
        .spawn()
        .expect("start qemu-system-x86_64");
    let proc = Proc { child, log };
    let t0 = Instant::now();
    let mut qmp = loop {
        if m0.exists() && m1.exists() {
            if let Ok(q) = Qmp::connect(&m0) {
                break q;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "qemu's monitor did not come up: {}",
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    qmp.execute(
        "nbd-server-start",
        serde_json::json!({ "addr": { "type": "unix", "data": { "path": nbd.display().to_string() } } }),
    )
    .expect("nbd-server-start");
    for (id, writable) in [("src", false), ("w", true)] {
        qmp.execute(
            "block-export-add",
            serde_json::json!({ "type": "nbd", "id": id, "node-name": "disk0", "name": id,
                                "writable": writable }),
        )
        .expect("block-export-add");
    }
    let st = qmp
        .execute("query-status", serde_json::json!({}))
        .expect("query-status");
    assert_eq!(st["running"], true, "{st}");
    Vmm {
        _proc: proc,
        qmp,
        ferry_qmp: m1,
        nbd,
    }
}

#[test]
fn the_switchover_is_refused_while_qemu_says_the_vm_runs() {
    if !require_tool("qemu-system-x86_64") || !require_tool("qemu-img") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, 2 * MIB)], 72);
    let dir = w.path("q");
    std::fs::create_dir(&dir).expect("qemu's directory");
    let mut vmm = start_qemu(&dir, &src);
    let uri = format!("nbd+unix:///src?socket={}", vmm.nbd.display());
    let qmp = vmm.ferry_qmp.display().to_string();
    let (serve, port) = w.serve_from(&["--nbd-source", &uri, "--qmp", &qmp, "--live"], &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--precopy".into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let pull = w.spawn("pull", &a);
    wait_log(&pull, "pre-copying");
    let mut guest = NbdWriter::connect(&vmm.nbd, "w");
    guest.write(4 * MIB, &[0x11; 65536]);
    w.wait_status("the guest's write applied", Duration::from_secs(60), |s| {
        s["precopy_generation"].as_u64().unwrap_or(0) >= 1
    });
    // The VM runs: refused, the pre-copy goes on, nothing served (a read
    // made before stays held).
    let held_out = w.path("held-read.raw");
    let mut early = w.held_read(&held_out);
    let ctl = w.path("ctl.sock");
    let out = w.ferry(&["switchover", "--control", ctl.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "switched over a running VM: {text}");
    assert!(text.contains("source VM is running"), "{text}");
    let s = w.status();
    assert_eq!(s["precopy"], "copying", "{s}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        early.try_wait().unwrap().is_none(),
        "served after a refused switchover"
    );
    // Paused: the switchover goes through; the guest's last write is there.
    guest.write(5 * MIB, &[0x22; 65536]);
    vmm.qmp
        .execute("stop", serde_json::json!({}))
        .expect("stop the VM");
    let out = w.ferry(&["switchover", "--control", ctl.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "switchover of a paused VM failed: {out:?}"
    );
    let at_source = w.path("source-read.raw");
    convert(&uri, &at_source);
    let back = w.path("read-back.raw");
    convert(
        &format!("nbd+unix:///ferry?socket={}", w.path("nbd.sock").display()),
        &back,
    );
    assert_files_equal(&at_source, &back);
    assert!(early.wait().unwrap().success(), "the held read failed");
    assert_files_equal(&at_source, &held_out);
    let bytes = std::fs::read(&back).unwrap();
    assert!(bytes[5 * MIB as usize..5 * MIB as usize + 65536]
        .iter()
        .all(|b| *b == 0x22));
    // Every chunk was here before the switchover (8 MiB copy unpaced):
    // verification waited for it, so it covers the frozen disk.
    let s = w.wait_verified(Duration::from_secs(120));
    assert_eq!(s["verified_chunks"], 8 * MIB / CHUNK, "{s}");
    drop(serve);
}
