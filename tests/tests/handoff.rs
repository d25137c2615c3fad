//! The hand-off to the hypervisor at the destination, with QEMU's real
//! block layer: qemu-storage-daemon stands in for the VM's QEMU, started
//! with the `-blockdev` arguments of docs/handoff.md (the NBD node on
//! `ferry pull`'s export with `reconnect-delay`, a raw node on top), and
//! exports that raw node onward over NBD: the guest's device, which qemu-io
//! and a writer thread use. The guest reads and writes during the copy,
//! across a `kill -9` and restart of the pull (its I/O stalls, then
//! completes), during the pivot and after the pull has stopped; the pivot
//! runs the QMP commands of docs/handoff.md as written there (paths
//! replaced), by `blockdev-reopen` or by `blockdev-mirror`. In the end QEMU
//! is on the local file, the pull's NBD server saw no client left when it
//! stopped, and the disk read through QEMU equals the source plus the
//! guest's writes, byte for byte. A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_tests::qmp::{need_tool, NbdWriter, StorageDaemon};
use ferry_tests::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const DOC: &str = include_str!("../../docs/handoff.md");
/// The paths docs/handoff.md uses, replaced by the test's.
const DOC_NBD: &str = "/run/ferry/vm1.nbd";
const DOC_DISK: &str = "/var/lib/ferry/vm1.img";

/// The lines of the fenced block after `<!-- handoff.rs: MARKER -->`.
fn doc_block(marker: &str) -> Vec<&'static str> {
    let tag = format!("<!-- handoff.rs: {marker} -->");
    let at = DOC
        .find(&tag)
        .unwrap_or_else(|| panic!("docs/handoff.md has no {tag}"));
    let mut lines = DOC[at + tag.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty());
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "{tag} is not followed by a code block"
    );
    lines.take_while(|l| !l.starts_with("```")).collect()
}

/// The destination: a world with the source served, the pull, and the
/// daemon standing in for the VM's QEMU with the guest's export `guest`.
struct Dest {
    w: World,
    src: PathBuf,
    pull: Proc,
    pull_args: Vec<String>,
    qsd: StorageDaemon,
    _serve: Proc,
    /// The guest's writes in order: (offset, length, byte).
    writes: Vec<(u64, u64, u8)>,
}

impl Dest {
    /// Serves a 64 MiB source with data and holes, starts the pull (with
    /// `extra` arguments), and the daemon with the doc's `-blockdev`s.
    fn start(extra: &[&str]) -> Dest {
        need_tool("qemu-io", "qemu-utils");
        need_tool("qemu-img", "qemu-utils");
        let w = World::new();
        let src = w.path("src.img");
        make_image(
            &src,
            SIZE,
            &[(MIB, 12 * MIB), (20 * MIB, 6 * MIB), (40 * MIB, MIB + 4096)],
            71,
        );
        let (serve, port) = w.serve(&src, &[]);
        let mut pull_args = w.pull_args(port, "dst.img");
        pull_args.extend(extra.iter().map(|s| s.to_string()));
        let pull = w.pull(&pull_args);
        let nbd = w.path("nbd.sock").display().to_string();
        let blockdevs: Vec<String> = doc_block("blockdev")
            .iter()
            .filter_map(|l| l.trim().strip_prefix("-blockdev "))
            .map(|a| a.trim_end_matches('\\').trim().replace(DOC_NBD, &nbd))
            .collect();
        assert_eq!(
            blockdevs.len(),
            2,
            "the doc's -blockdev lines: {blockdevs:?}"
        );
        assert!(blockdevs[0].contains("reconnect-delay="), "{blockdevs:?}");
        let dir = w.path("q");
        std::fs::create_dir(&dir).expect("make the daemon's directory");
        let mut qsd = StorageDaemon::start_with(&dir, &blockdevs);
        // The guest's device: QEMU's raw node, exported onward.
        qsd.export("guest", "guest", &[], true)
            .expect("export the guest's device");
        Dest {
            w,
            src,
            pull,
            pull_args,
            qsd,
            _serve: serve,
            writes: Vec::new(),
        }
    }

    /// qemu-io through QEMU on the guest's device, as the guest; `limit`
    /// bounds it (a device stuck on a dead NBD server would hang).
    fn guest_io(&self, limit: Duration, cmds: &[&str]) -> (bool, String) {
        guest_io(&self.qsd.nbd_socket, limit, cmds)
    }

    /// A guest write of `len` bytes of `byte` at `off`, checked by reading
    /// it back, and recorded.
    fn guest_write(&mut self, off: u64, len: u64, byte: u8) {
        let (ok, text) = self.guest_io(
            Duration::from_secs(60),
            &[
                &format!("write -P {byte} {off} {len}"),
                &format!("read -P {byte} {off} {len}"),
            ],
        );
        assert!(ok && !text.contains("fail"), "guest write at {off}: {text}");
        self.writes.push((off, len, byte));
    }

    /// A guest read of 16 bytes at `off` through QEMU, which must show the
    /// source's bytes.
    fn guest_reads_source(&self, off: u64) {
        let src = std::fs::read(&self.src).expect("read the source");
        let (ok, text) = self.guest_io(Duration::from_secs(60), &[&format!("read -v {off} 16")]);
        let want = qemu_hex(&src[off as usize..off as usize + 16]);
        assert!(ok && text.contains(&want), "guest read at {off}: {text}");
    }

    /// Runs the doc's pivot block `marker` on QEMU's monitor with the
    /// test's paths; waits for a mirror job to be ready before
    /// `job-complete` and gone after it, as the doc says.
    fn pivot(&mut self, marker: &str, writer: &Writer) {
        let disk = self.w.path("dst.img").display().to_string();
        for line in doc_block(marker) {
            let cmd: Value = serde_json::from_str(&line.replace(DOC_DISK, &disk))
                .unwrap_or_else(|e| panic!("a QMP command in the doc: {e}: {line}"));
            let name = cmd["execute"].as_str().expect("execute");
            if name == "job-complete" {
                self.wait_jobs("the mirror to be ready", |jobs| {
                    jobs.iter().any(|j| j["status"] == "ready")
                });
                // The guest writes through the job (to both sides).
                writer.keeps_writing(1, "with the mirror job ready");
            }
            self.qsd
                .qmp
                .execute(name, cmd["arguments"].clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "job-complete" {
                self.wait_jobs("the mirror to finish", |jobs| jobs.is_empty());
            }
        }
    }

    fn wait_jobs(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let t0 = Instant::now();
        loop {
            let jobs = self
                .qsd
                .qmp
                .execute("query-jobs", json!({}))
                .expect("query-jobs");
            let jobs = jobs.as_array().expect("a list").clone();
            if done(&jobs) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {jobs:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After a pivot: QEMU's guest node is on the local file and no NBD
    /// node is left; `ferry commit`; the pull is stopped as the unit stops
    /// it (SIGTERM) and exits 0 with no NBD client connected; the guest's
    /// I/O then completes at once (it would wait for the dead export
    /// otherwise); the disk read through QEMU and the file equal the
    /// expected image.
    fn after_pivot(mut self, writer: Writer) {
        let nodes = self
            .qsd
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .expect("query-named-block-nodes");
        let nodes = nodes.as_array().expect("a list");
        let disk = self.w.path("dst.img").display().to_string();
        assert!(
            nodes.iter().all(|n| n["drv"] != "nbd"),
            "an NBD node is left: {nodes:?}"
        );
        let export = self
            .qsd
            .qmp
            .execute("query-block-exports", json!({}))
            .expect("query-block-exports");
        let node = export[0]["node-name"].as_str().expect("the export's node");
        let on = nodes
            .iter()
            .find(|n| n["node-name"] == node)
            .expect("the guest's node");
        assert_eq!(on["drv"], "raw", "{on}");
        assert_eq!(on["image"]["filename"], disk.as_str(), "{on}");

        let ctl = self.w.path("ctl.sock").display().to_string();
        let out = self.w.ferry(&["commit", "--control", &ctl]);
        assert!(out.status.success(), "ferry commit: {out:?}");
        let st = Command::new("kill")
            .args(["-TERM", &self.pull.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let code = self.pull.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(0), "the pull: {}", self.pull.log_text());
        let log = self.pull.log_text();
        assert!(
            log.contains("NBD server shutting down open=0"),
            "QEMU still held ferry's export: {log}"
        );

        // The guest goes on, on the local file: the writer a while longer,
        // and qemu-io, which must not wait for the gone export.
        writer.keeps_writing(1, "after the pull stopped");
        let t0 = Instant::now();
        self.guest_write(30 * MIB + 4096, 65536, 0xc3);
        self.guest_reads_source(21 * MIB);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let log = writer.stop();
        assert!(log.len() > 20, "the writer wrote only {} times", log.len());

        let expected = self.w.path("expected.img");
        std::fs::copy(&self.src, &expected).expect("copy the source");
        for (off, len, byte) in self.writes.iter().chain(&log) {
            apply_write(&expected, *off, &vec![*byte; *len as usize]);
        }
        let seen = self.w.path("seen.img");
        let out = Command::new("timeout")
            .args(["120", "qemu-img", "convert", "-O", "raw", "--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={},export=guest",
                self.qsd.nbd_socket.display()
            ))
            .arg(&seen)
            .output()
            .expect("run qemu-img");
        assert!(out.status.success(), "qemu-img convert: {out:?}");
        assert_files_equal(&expected, &seen);
        assert_files_equal(&expected, &self.w.path("dst.img"));
    }
}

fn guest_io(sock: &Path, limit: Duration, cmds: &[&str]) -> (bool, String) {
    qemu_io_nbd(sock, "guest", limit.as_secs(), &[], cmds)
}

/// The guest writing on its own: 64 KiB writes one after another through
/// QEMU, into data and holes of [6, 8) MiB and [48, 50) MiB, each a new
/// byte, logged in order.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    handle: JoinHandle<Vec<(u64, u64, u8)>>,
}

impl Writer {
    fn start(sock: &Path) -> Writer {
        let mut nbd = NbdWriter::connect(sock, "guest");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let done = Arc::new(AtomicUsize::new(0));
        let count = done.clone();
        let handle = std::thread::spawn(move || {
            let mut log = Vec::new();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let base = if i.is_multiple_of(2) {
                    6 * MIB
                } else {
                    48 * MIB
                };
                let off = base + (i * 7) % 32 * 65536;
                let byte = (i % 251) as u8 + 1;
                nbd.write(off, &[byte; 65536]);
                log.push((off, 65536, byte));
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            log
        });
        Writer { stop, done, handle }
    }

    /// Writes acknowledged so far.
    fn count(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits `secs` seconds and checks the guest wrote all along.
    fn keeps_writing(&self, secs: u64, what: &str) {
        let c0 = self.count();
        std::thread::sleep(Duration::from_secs(secs));
        let n = self.count() - c0;
        // ~50 writes a second when nothing stalls them.
        assert!(n as u64 >= 5 * secs, "{n} guest writes in {secs} s {what}");
    }

    fn stop(self) -> Vec<(u64, u64, u8)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the writer panicked")
    }
}

#[test]
fn the_guest_rides_out_a_pull_restart_and_moves_to_the_local_file_by_blockdev_reopen() {
    let mut d = Dest::start(&["--hold-background"]);
    // During the copy: reads of absent data, a write smaller than a chunk
    // into absent data, through QEMU.
    d.guest_reads_source(5 * MIB);
    d.guest_write(2 * MIB + 4096, 8192, 0xa1);

    // The pull dies mid-copy; the guest's I/O waits for it.
    d.pull.kill9();
    let sock = d.qsd.nbd_socket.clone();
    let src = std::fs::read(&d.src).expect("read the source");
    let t0 = Instant::now();
    let io = std::thread::spawn(move || {
        guest_io(
            &sock,
            Duration::from_secs(90),
            &["read -v 22020096 16", "write -P 0xb2 23068672 65536"],
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !io.is_finished(),
        "guest I/O finished with the pull dead: {:?}",
        io.join()
    );
    d.pull = d.w.pull(&d.pull_args);
    let (ok, text) = io.join().expect("qemu-io thread");
    let stalled = t0.elapsed();
    assert!(ok, "guest I/O across the restart: {text}");
    assert!(
        text.contains(&qemu_hex(&src[21 * MIB as usize..21 * MIB as usize + 16])),
        "{text}"
    );
    assert!(stalled >= Duration::from_secs(3), "{stalled:?}");
    d.writes.push((22 * MIB, 65536, 0xb2));
    let qlog = d.qsd.proc.log_text();
    assert!(!qlog.contains("rror"), "QEMU logged an error: {qlog}");

    // The copy finishes with the guest writing all along, then the pivot.
    let writer = Writer::start(&d.qsd.nbd_socket);
    d.w.background("resume");
    let ctl = d.w.path("ctl.sock").display().to_string();
    let out = d.w.ferry(&[
        "status",
        "--control",
        &ctl,
        "--wait",
        "--timeout-secs",
        "120",
    ]);
    assert!(out.status.success(), "ferry status --wait: {out:?}");
    d.pivot("pivot-reopen", &writer);
    d.after_pivot(writer);
}

#[test]
fn the_guest_moves_to_the_local_file_by_blockdev_mirror_while_writing() {
    let mut d = Dest::start(&[]);
    let writer = Writer::start(&d.qsd.nbd_socket);
    d.guest_reads_source(3 * MIB);
    d.guest_write(20 * MIB + 512, 4096, 0xa2);
    let ctl = d.w.path("ctl.sock").display().to_string();
    let out = d.w.ferry(&[
        "status",
        "--control",
        &ctl,
        "--wait",
        "--timeout-secs",
        "120",
    ]);
    assert!(out.status.success(), "ferry status --wait: {out:?}");
    d.pivot("pivot-mirror", &writer);
    d.after_pivot(writer);
}

#[test]
fn the_readmes_workflow_shows_the_commands_the_doc_gives() {
    let readme = include_str!("../../README.md");
    let at = readme
        .find("## Workflow")
        .expect("README has a Workflow section");
    let section = &readme[at..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let mut shown = 0;
    for line in section[..end].lines().map(str::trim) {
        if line.starts_with("{\"execute\"") {
            assert!(DOC.contains(line), "not in docs/handoff.md: {line}");
            shown += 1;
        } else if line.starts_with("-blockdev ") {
            for (i, arg) in line.split(" -").enumerate() {
                let arg = if i == 0 {
                    arg.to_string()
                } else {
                    format!("-{arg}")
                };
                assert!(DOC.contains(&arg), "not in docs/handoff.md: {arg}");
                shown += 1;
            }
        }
    }
    assert_eq!(shown, 6, "the README's workflow shows other commands");
}
