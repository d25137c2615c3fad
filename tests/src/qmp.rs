//! A small QMP client (JSON lines over a unix socket) and a
//! qemu-storage-daemon runner for tests (and later xtask): starts the
//! daemon with a raw image, an NBD server and a QMP monitor on sockets in
//! a directory the caller owns, and drives it with `qmp_capabilities` and
//! `execute`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Proc;

/// How long one QMP reply may take (generous: a loaded machine).
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most events skipped while waiting for one reply.
const MAX_EVENTS_PER_REPLY: usize = 10_000;
/// Longest QMP line read.
const MAX_LINE: u64 = 16 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the monitor socket failed.
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed (or timed out).
    #[error("QMP I/O while {during}: {source}")]
    Io {
        /// What the client was doing.
        during: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The monitor closed the connection.
    #[error("QMP monitor closed the connection while {0}")]
    Closed(String),
    /// A line that is not a JSON object (or too long).
    #[error("QMP sent a malformed line while {during}: {line:?}")]
    Malformed {
        /// What the client was doing.
        during: String,
        /// The line (cut to 200 bytes).
        line: String,
    },
    /// The command failed.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// More events than [`MAX_EVENTS_PER_REPLY`] while waiting for a reply.
    #[error("QMP: more than {MAX_EVENTS_PER_REPLY} events while waiting for the reply to {0}")]
    TooManyEvents(String),
}

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and enters
    /// command mode (`qmp_capabilities`).
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |during: &str| {
            let during = during.to_string();
            move |source| QmpError::Io { during, source }
        };
        s.set_read_timeout(Some(QMP_REPLY_TIMEOUT))
            .map_err(io("setting the read timeout"))?;
        s.set_write_timeout(Some(QMP_REPLY_TIMEOUT))
            .map_err(io("setting the write timeout"))?;
        let writer = s.try_clone().map_err(io("cloning the socket"))?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_message("reading the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed {
                during: "reading the greeting".into(),
                line: greeting.to_string(),
            });
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self, during: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                during: during.into(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed(during.into()));
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::Malformed {
                during: during.into(),
                line: line.chars().take(200).collect(),
            }),
        }
    }

    /// Runs `command` with `arguments` (an object; `{}` for none) and
    /// returns its `return` value; events that arrive first are kept in
    /// [`events`](Self::events).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let during = format!("running {command}");
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                during: during.clone(),
                source,
            })?;
        for _ in 0..MAX_EVENTS_PER_REPLY {
            let v = self.read_message(&during)?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Malformed {
                during,
                line: v.to_string(),
            });
        }
        Err(QmpError::TooManyEvents(command.into()))
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

/// A qemu-storage-daemon serving a raw image: node `disk0` over `file0`,
/// an NBD server on `nbd.sock` and a QMP monitor on `qmp.sock`, both in
/// the directory given to [`start`](Self::start). Killed (its PID only)
/// when dropped.
pub struct StorageDaemon {
    /// The daemon.
    pub proc: Proc,
    /// Its monitor.
    pub qmp: Qmp,
    /// The NBD server's socket.
    pub nbd_socket: PathBuf,
}

impl StorageDaemon {
    /// Starts the daemon on `image` with its sockets and log in `dir`, and
    /// connects to its monitor (waiting up to a minute).
    pub fn start(dir: &Path, image: &Path) -> StorageDaemon {
        need_tool("qemu-storage-daemon", "qemu-system-common");
        let nbd_socket = dir.join("nbd.sock");
        let qmp_socket = dir.join("qmp.sock");
        let log = dir.join("qsd.log");
        let err = std::fs::File::create(&log).expect("create the daemon's log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,file=file0,node-name=disk0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_socket.display()))
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_socket.display()
            ))
            .args(["--monitor", "chardev=m0"])
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
            if qmp_socket.exists() && nbd_socket.exists() {
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
