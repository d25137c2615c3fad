//! Support for ferry's end-to-end tests: finds the built `ferry` binary,
//! makes identities and images in a temporary directory, runs `ferry serve`
//! and `ferry pull` as child processes (killed when dropped), drives real
//! NBD clients (qemu-io, qemu-img) and polls `ferry status --json`.
#![forbid(unsafe_code)]

pub mod qmp;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `ferry` binary: `$FERRY_BIN`, else the workspace's
/// `target/debug/ferry` (built by `cargo xtask ci` before the tests).
pub fn ferry_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ws.join("target"));
    let bin = target.join("debug").join("ferry");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "ferry", "--bin", "ferry"])
            .current_dir(ws)
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cannot build the ferry binary");
    }
    bin
}

/// Runs qemu-io (under `timeout limit_secs`) with `options` on export
/// `export` of the NBD server at unix socket `sock`, with the given
/// commands; returns whether it succeeded and its stdout and stderr.
pub fn qemu_io_nbd(
    sock: &Path,
    export: &str,
    limit_secs: u64,
    options: &[&str],
    cmds: &[&str],
) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.arg(limit_secs.to_string())
        .arg("qemu-io")
        .args(options)
        .arg("--image-opts");
    c.arg(format!(
        "driver=nbd,server.type=unix,server.path={},export={export}",
        sock.display()
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether a tool is on PATH; if not, says SKIPPED loudly, and panics when
/// `FERRY_REQUIRE_ALL=1` (as under `cargo xtask ci`).
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("FERRY_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{tool} is required (FERRY_REQUIRE_ALL=1) but not installed");
        }
        eprintln!("\n!!!!!! SKIPPED: {tool} not found; install it to run this test !!!!!!\n");
    }
    found
}

/// Whether we run as root (for tests that mount); if not, says SKIPPED
/// loudly, and panics when `FERRY_REQUIRE_ALL=1` (as under `cargo xtask
/// ci`, which runs as root).
pub fn require_root(why: &str) -> bool {
    let probe = tempfile::NamedTempFile::new().expect("temporary file");
    let root = std::os::unix::fs::MetadataExt::uid(&probe.as_file().metadata().expect("stat")) == 0;
    if !root {
        if std::env::var("FERRY_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("root is required (FERRY_REQUIRE_ALL=1) to {why}");
        }
        eprintln!("\n!!!!!! SKIPPED: not root, cannot {why} !!!!!!\n");
    }
    root
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for it to exit; returns its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A test world in a temporary directory.
pub struct World {
    /// The directory.
    pub dir: tempfile::TempDir,
    /// Source identity's fingerprint.
    pub src_fp: String,
    /// Destination identity's fingerprint.
    pub dst_fp: String,
    bin: PathBuf,
}

/// A free UDP port on 127.0.0.1 (bound and released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp")
        .port()
}

impl World {
    /// Makes the directory and two identities.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = ferry_bin();
        let mut w = Self {
            dir,
            src_fp: String::new(),
            dst_fp: String::new(),
            bin,
        };
        w.src_fp = w.keygen("src-id");
        w.dst_fp = w.keygen("dst-id");
        w
    }

    /// A path inside the world.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `ferry keygen` into `name` and returns the fingerprint.
    pub fn keygen(&self, name: &str) -> String {
        let out = self.ferry(&[
            "keygen",
            "--identity",
            self.path(name).to_str().expect("utf8"),
        ]);
        assert!(out.status.success(), "keygen failed: {out:?}");
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string()
    }

    /// Runs ferry to completion.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// Starts ferry in the background, stderr and stdout to `NAME-N.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("{name}-{n}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(&self.bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn ferry");
        Proc { child, log }
    }

    /// Starts `ferry serve` of `disk` on a free port; returns it and the port.
    pub fn serve(&self, disk: &Path, extra: &[&str]) -> (Proc, u16) {
        self.serve_from(&["--disk", disk.to_str().expect("utf8")], extra)
    }

    /// Starts `ferry serve` of the disk that `source` names (`--disk PATH`,
    /// `--nbd-source URI --qmp SOCKET`) on a free port; returns it and the
    /// port.
    pub fn serve_from(&self, source: &[&str], extra: &[&str]) -> (Proc, u16) {
        for _ in 0..5 {
            let port = free_udp_port();
            let listen = format!("127.0.0.1:{port}");
            let id = self.dir.path().join("src-id");
            let mut args = vec!["serve"];
            args.extend_from_slice(source);
            args.extend([
                "--listen",
                &listen,
                "--identity",
                id.to_str().expect("utf8"),
                "--trust-peer",
                &self.dst_fp,
            ]);
            args.extend_from_slice(extra);
            let mut p = self.spawn("serve", &args);
            // Ready when it prints its banner.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if p.log_text().contains("ferry serve: exporting") {
                    return (p, port);
                }
                if p.wait_exit(Duration::from_millis(50)).is_some() {
                    break;
                }
            }
            eprintln!("serve did not start on port {port}: {}", p.log_text());
        }
        panic!("cannot start ferry serve");
    }

    /// Starts `ferry serve` of `disk` again on `port` (after the first one
    /// on that port was stopped) and waits until it exports.
    pub fn serve_on(&self, disk: &Path, port: u16) -> Proc {
        let listen = format!("127.0.0.1:{port}");
        let id = self.dir.path().join("src-id");
        let args = [
            "serve",
            "--disk",
            disk.to_str().expect("utf8"),
            "--listen",
            &listen,
            "--identity",
            id.to_str().expect("utf8"),
            "--trust-peer",
            &self.dst_fp,
        ];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            let mut p = self.spawn("serve", &args);
            while t0.elapsed() < Duration::from_secs(60) {
                if p.log_text().contains("ferry serve: exporting") {
                    return p;
                }
                if p.wait_exit(Duration::from_millis(50)).is_some() {
                    break;
                }
            }
            // The port may not be free again yet.
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("cannot start ferry serve again on port {port}");
    }

    /// Arguments of `ferry pull` from the source at `port` into `disk`.
    pub fn pull_args(&self, port: u16, disk: &str) -> Vec<String> {
        self.pull_args_tagged(port, disk, "")
    }

    /// Like [`World::pull_args`], with sockets named after `tag`, for
    /// several pulls at once.
    pub fn pull_args_tagged(&self, port: u16, disk: &str, tag: &str) -> Vec<String> {
        vec![
            "pull".into(),
            "--source".into(),
            format!("127.0.0.1:{port}"),
            "--disk".into(),
            self.path(disk).display().to_string(),
            "--nbd".into(),
            format!("unix:{}", self.path(&format!("nbd{tag}.sock")).display()),
            "--control".into(),
            self.path(&format!("ctl{tag}.sock")).display().to_string(),
            "--identity".into(),
            self.path("dst-id").display().to_string(),
            "--trust-peer".into(),
            self.src_fp.clone(),
        ]
    }

    /// Serves two disks, `a` = `src_a` and `b` = `src_b`, in one `ferry
    /// serve`; makes the `nbd` directory their pull serves them in.
    pub fn serve_two(&self, src_a: &Path, src_b: &Path) -> (Proc, u16) {
        let a = format!("a={}", src_a.display());
        let b = format!("b={}", src_b.display());
        let served = self.serve_from(&["--disk", &a, "--disk", &b], &[]);
        std::fs::create_dir_all(self.path("nbd")).expect("mkdir nbd");
        served
    }

    /// `ferry pull` of the two disks [`World::serve_two`] serves, from
    /// `port` (`None`: no `--source` nor `--trust-peer`), into `dst-a.img`
    /// and `dst-b.img`, served at `nbd/a.sock` and `nbd/b.sock`, then
    /// `extra`.
    pub fn pull_two_args(&self, port: Option<u16>, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "pull".into(),
            "--disk".into(),
            format!("a={}", self.path("dst-a.img").display()),
            "--disk".into(),
            format!("b={}", self.path("dst-b.img").display()),
            "--nbd".into(),
            format!("unix:{}", self.path("nbd").display()),
            "--control".into(),
            self.path("ctl.sock").display().to_string(),
            "--identity".into(),
            self.path("dst-id").display().to_string(),
        ];
        if let Some(port) = port {
            v.extend([
                "--source".into(),
                format!("127.0.0.1:{port}"),
                "--trust-peer".into(),
                self.src_fp.clone(),
            ]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts `ferry pull` with `args` and waits until it serves.
    pub fn pull(&self, args: &[String]) -> Proc {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = self.spawn("pull", &a);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if p.log_text().contains("ferry pull: serving") {
                return p;
            }
            if let Some(code) = p.wait_exit(Duration::from_millis(50)) {
                panic!("ferry pull exited ({code}): {}", p.log_text());
            }
        }
        panic!("ferry pull did not start: {}", p.log_text());
    }

    /// `ferry status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        self.status_of("ctl.sock")
    }

    /// `ferry status --json` of the pull whose control socket is `ctl`.
    pub fn status_of(&self, ctl: &str) -> serde_json::Value {
        let out = self.ferry(&[
            "status",
            "--control",
            self.path(ctl).to_str().expect("utf8"),
            "--json",
        ]);
        // Exit code 2: the pull reports phase error (the status is printed).
        assert!(
            out.status.success() || out.status.code() == Some(2),
            "status failed: {out:?}"
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
        assert_eq!(
            out.status.code() == Some(2),
            s["phase"] == "error",
            "status exit code {:?} does not match {s}",
            out.status.code()
        );
        s
    }

    /// Polls status until `pred` holds, or panics after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}; last status {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the pull to be complete and verified.
    pub fn wait_verified(&self, timeout: Duration) -> serde_json::Value {
        let s = self.wait_status("complete and verified", timeout, |s| {
            // `refetching` is on the way to `ok` or `failed`, not an end.
            s["phase"] == "complete" && (s["verified"] == "ok" || s["verified"] == "failed")
        });
        assert_eq!(s["verified"], "ok", "verification failed: {s}");
        s
    }

    /// `ferry background --control … ACTION`.
    pub fn background(&self, action: &str) {
        let out = self.ferry(&[
            "background",
            "--control",
            self.path("ctl.sock").to_str().expect("utf8"),
            action,
        ]);
        assert!(out.status.success(), "background {action} failed: {out:?}");
    }

    /// A whole-disk read of the pre-copying pull's NBD export
    /// (`nbd.sock`) into `out`, started now: the export takes the client
    /// and holds its requests until the switchover. Checks that it is
    /// still waiting 500 ms later; the caller waits for it after the
    /// switchover and compares `out`.
    pub fn held_read(&self, out: &Path) -> Child {
        let mut c = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!(
                "nbd+unix:///ferry?socket={}",
                self.path("nbd.sock").display()
            ))
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-img");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            c.try_wait().expect("qemu-img").is_none(),
            "the destination answered a read before the switchover"
        );
        c
    }

    /// Runs qemu-io with `options` (e.g. `-t writeback`) on the pull's NBD
    /// export with the given commands; returns whether it succeeded and
    /// its output (stdout and stderr).
    pub fn qemu_io_with(&self, options: &[&str], cmds: &[&str]) -> (bool, String) {
        qemu_io_nbd(&self.path("nbd.sock"), "ferry", 120, options, cmds)
    }

    /// Runs qemu-io on the pull's NBD export with the given commands, which
    /// must all succeed.
    pub fn qemu_io(&self, cmds: &[&str]) -> String {
        let (ok, text) = self.qemu_io_with(&[], cmds);
        assert!(ok, "qemu-io failed: {text}");
        assert!(
            !text.contains("Pattern verification failed"),
            "qemu-io: {text}"
        );
        assert!(!text.contains("failed"), "qemu-io: {text}");
        text
    }
}

/// `bytes` as qemu-io's `read -v` prints them: hex pairs, space apart.
pub fn qemu_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Makes a sparse image of `size` bytes with `extents` of pseudo-random
/// data (offset, length), deterministic in `seed`.
pub fn make_image(path: &Path, size: u64, extents: &[(u64, u64)], seed: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut x = seed | 1;
    for (off, len) in extents {
        let mut buf = vec![0u8; *len as usize];
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        f.write_all_at(&buf, *off).expect("write image");
    }
    f.sync_all().expect("sync image");
}

/// Applies a write to a file (to build expected images).
pub fn apply_write(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(data, offset).expect("write");
    f.flush().expect("flush");
}

/// Whether two files are byte-for-byte equal (names the first difference).
pub fn assert_files_equal(a: &Path, b: &Path) {
    let fa = std::fs::File::open(a).expect("open a");
    let fb = std::fs::File::open(b).expect("open b");
    let la = fa.metadata().expect("meta").len();
    let lb = fb.metadata().expect("meta").len();
    assert_eq!(la, lb, "sizes differ: {} vs {}", a.display(), b.display());
    let mut off = 0u64;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    while off < la {
        let n = (la - off).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off).expect("read a");
        fb.read_exact_at(&mut bb[..n], off).expect("read b");
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|i| ba[*i] != bb[*i]).expect("a difference");
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// Writes `data` at `offset` through the NBD export at unix socket `sock`
/// with a minimal client that sends no FLUSH (qemu's clients flush when
/// they close), then hangs up without NBD_CMD_DISC. Returns the server's
/// error code for the write (0 = acknowledged).
pub fn nbd_write_without_flush(sock: &Path, offset: u64, data: &[u8]) -> u32 {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the NBD socket");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("server greeting");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    // Client flags: fixed newstyle, no zeroes.
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    let name = b"ferry";
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    s.write_all(&opt).expect("export name");
    let mut export = [0u8; 10];
    s.read_exact(&mut export).expect("export info");
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // no FUA
    req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&(data.len() as u32).to_be_bytes());
    req.extend_from_slice(data);
    s.write_all(&req).expect("write request");
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("write reply");
    assert_eq!(
        u32::from_be_bytes(reply[..4].try_into().expect("4")),
        0x6744_6698
    );
    u32::from_be_bytes(reply[4..8].try_into().expect("4"))
}
