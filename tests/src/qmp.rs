//! A qemu-storage-daemon runner for tests (and later xtask): starts the
//! daemon with a raw image, an NBD server and two QMP monitors on sockets
//! in a directory the caller owns (one for the test, one for the code
//! under test), and drives it through `ferry_live`'s QMP client; and
//! [`NbdWriter`], the guest's writes through an export.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use ferry_live::QmpError;
use serde_json::{json, Value};

use crate::Proc;

/// [`ferry_live::Qmp`] driven from synchronous test code: the client with
/// a single-threaded runtime of its own.
pub struct Qmp {
    rt: tokio::runtime::Runtime,
    inner: ferry_live::Qmp,
}

impl Qmp {
    /// Connects to the monitor at `path` and enters command mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| QmpError::Io {
                during: "starting a runtime for the QMP client".into(),
                source,
            })?;
        let inner = rt.block_on(ferry_live::Qmp::connect(path))?;
        Ok(Qmp { rt, inner })
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.rt.block_on(self.inner.execute(command, arguments))
    }
}

/// Panics with a clear message when `tool` is not installed: the tests
/// that need it are not skipped.
pub fn need_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test but not installed (Debian package {package}; \
         `cargo xtask ci` installs it)"
    );
}

/// A qemu-storage-daemon serving a raw image: node `disk0` over `file0`
/// (or the nodes given to [`start_with`](Self::start_with)), an NBD
/// server on `nbd.sock` and QMP monitors on `qmp.sock` (held by
/// [`qmp`](Self::qmp)) and `ferry-qmp.sock` (free for the code under
/// test: a monitor takes one client at a time), all in the directory
/// given to [`start`](Self::start). Killed (its PID only) when dropped.
pub struct StorageDaemon {
    /// The daemon.
    pub proc: Proc,
    /// Its monitor.
    pub qmp: Qmp,
    /// The NBD server's socket.
    pub nbd_socket: PathBuf,
    /// The second monitor's socket.
    pub ferry_qmp_socket: PathBuf,
}

impl StorageDaemon {
    /// The dirty bitmaps of node `disk0`, by name.
    pub fn dirty_bitmaps(&mut self) -> Vec<String> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .expect("query-named-block-nodes");
        nodes
            .as_array()
            .expect("a list")
            .iter()
            .filter(|n| n["node-name"] == "disk0")
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(String::from))
            .collect()
    }

    /// Starts the daemon on `image` with its sockets and log in `dir`, and
    /// connects to its monitor (waiting up to a minute).
    pub fn start(dir: &Path, image: &Path) -> StorageDaemon {
        StorageDaemon::start_with(
            dir,
            &[
                format!("driver=file,filename={},node-name=file0", image.display()),
                "driver=raw,file=file0,node-name=disk0".into(),
            ],
        )
    }

    /// Starts the daemon with one `--blockdev` per entry of `blockdevs`
    /// (QEMU's `-blockdev` syntax), its sockets and log in `dir`, and
    /// connects to its monitor (waiting up to a minute).
    pub fn start_with(dir: &Path, blockdevs: &[String]) -> StorageDaemon {
        need_tool("qemu-storage-daemon", "qemu-system-common");
        let nbd_socket = dir.join("nbd.sock");
        let qmp_socket = dir.join("qmp.sock");
        let ferry_qmp_socket = dir.join("ferry-qmp.sock");
        let log = dir.join("qsd.log");
        let err = std::fs::File::create(&log).expect("create the daemon's log");
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        let child = cmd
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_socket.display()))
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_socket.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=m1,path={},server=on,wait=off",
                ferry_qmp_socket.display()
            ))
            .args(["--monitor", "chardev=m1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start qemu-storage-daemon");
        let mut proc = Proc { child, log };
        let t0 = Instant::now();
        let qmp = loop {
            if let Ok(Some(st)) = proc.child.try_wait() {
                panic!(
                    "qemu-storage-daemon exited ({st}) at start: {}",
                    proc.log_text()
                );
            }
            if qmp_socket.exists() && nbd_socket.exists() && ferry_qmp_socket.exists() {
                match Qmp::connect(&qmp_socket) {
                    Ok(q) => break q,
                    Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                        panic!("QMP of qemu-storage-daemon: {e}; log: {}", proc.log_text())
                    }
                    Err(_) => {}
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "qemu-storage-daemon's sockets did not appear within 60 s: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        StorageDaemon {
            proc,
            qmp,
            nbd_socket,
            ferry_qmp_socket,
        }
    }

    /// The `nbd+unix://` URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd_socket.display())
    }

    /// Adds dirty bitmap `bitmap` (64 KiB granularity) to `disk0` and
    /// exports `disk0` (writable, so tests can write through it) as
    /// `disk0` with that bitmap, as libvirt's backup API does.
    pub fn export_with_bitmap(&mut self, bitmap: &str) {
        self.qmp
            .execute(
                "block-dirty-bitmap-add",
                json!({ "node": "disk0", "name": bitmap, "granularity": 65536 }),
            )
            .expect("block-dirty-bitmap-add");
        self.export("e0", "disk0", &[bitmap], true)
            .expect("block-export-add");
    }

    /// Exports node `disk0` as NBD export `name` (export id `id`) with the
    /// dirty `bitmaps`.
    pub fn export(
        &mut self,
        id: &str,
        name: &str,
        bitmaps: &[&str],
        writable: bool,
    ) -> Result<(), QmpError> {
        self.qmp
            .execute(
                "block-export-add",
                json!({ "type": "nbd", "id": id, "node-name": "disk0", "name": name,
                        "writable": writable, "bitmaps": bitmaps }),
            )
            .map(drop)
    }
}

/// A minimal NBD client that writes (the guest's writes in tests): one
/// connection to an export, `NBD_OPT_EXPORT_NAME`, simple replies, one
/// write at a time, each acknowledged before the next.
pub struct NbdWriter {
    s: UnixStream,
    handle: u64,
}

impl NbdWriter {
    /// Connects to `export` on the NBD server at unix socket `sock`.
    pub fn connect(sock: &Path, export: &str) -> NbdWriter {
        let mut s = UnixStream::connect(sock).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("server greeting");
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
        // Client flags: fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt).expect("export name");
        let mut info = [0u8; 10];
        s.read_exact(&mut info)
            .unwrap_or_else(|e| panic!("export {export:?} refused: {e}"));
        NbdWriter { s, handle: 1 }
    }

    /// Writes `data` at `offset` and waits for the server's
    /// acknowledgement (panics on an error reply).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req).expect("write request");
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply).expect("write reply");
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes(), "reply magic");
        assert_eq!(&reply[4..8], &[0; 4], "write at {offset} failed");
        assert_eq!(&reply[8..], &self.handle.to_be_bytes(), "reply handle");
    }
}
