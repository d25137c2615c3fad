//! Shared helpers of the integration tests: a server running in its own
//! runtime, real-client runners with timeouts, and a raw protocol client.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use ferry_device::BlockDevice;
use ferry_nbd::{serve, NbdError, NbdListener, NbdServerConfig};

pub(crate) const EXPORT: &str = "disk";

// Wire constants, written out independently of the crate under test.
pub(crate) const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub(crate) const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x3e889045565a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x25609513;
pub(crate) const REPLY_MAGIC: u32 = 0x67446698;
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_POLICY: u32 = 0x8000_0002;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_FLAG_FUA: u16 = 1;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 2;
pub(crate) const FLAG_HAS_FLAGS: u16 = 1;
pub(crate) const FLAG_READ_ONLY: u16 = 2;
pub(crate) const FLAG_SEND_FLUSH: u16 = 4;
pub(crate) const FLAG_SEND_FUA: u16 = 8;
pub(crate) const FLAG_SEND_TRIM: u16 = 32;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 64;
pub(crate) const FLAG_CAN_MULTI_CONN: u16 = 256;
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;

/// True when `tool` runs. Otherwise says "SKIPPED" loudly, or panics when
/// FERRY_REQUIRE_ALL=1 (as in CI).
pub(crate) fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("SKIPPED: {tool} not found");
        if std::env::var("FERRY_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{msg}, and FERRY_REQUIRE_ALL=1 forbids skipping");
        }
        // Written to the stderr handle directly: libtest captures eprintln!
        // of passing tests, and a skip must be seen.
        let _ = writeln!(io::stderr(), "\n********** {msg} **********\n");
    }
    ok
}

/// Runs `tool args` under `timeout 60`.
pub(crate) fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("60")
        .arg(tool)
        .args(args)
        .output()
        .expect("run timeout");
    eprintln!(
        "$ {tool} {}\n-> {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Combined stdout and stderr.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qemu-io with one `-c` per command and asserts it succeeded with no
/// pattern mismatch nor failed command.
pub(crate) fn qemu_io_ok(url: &str, cmds: &[&str]) -> String {
    let out = qemu_io(url, cmds, false);
    let t = text(&out);
    assert!(out.status.success(), "qemu-io failed: {t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");
    assert!(!t.contains("failed"), "{t}");
    t
}

/// Runs qemu-io (read-only with `-r`) without checking the result.
pub(crate) fn qemu_io(url: &str, cmds: &[&str], read_only: bool) -> Output {
    // Writeback, so that only `write -f` sends FUA (qemu-io's default
    // writethrough mode sets FUA on every write).
    let mut args = vec!["-f", "raw", "-t", "writeback"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(url);
    run("qemu-io", &args)
}

/// Where a test server listens.
#[derive(Debug, Clone)]
pub(crate) enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A server on its own runtime; stopped on drop.
pub(crate) struct TestServer<D: BlockDevice> {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) device: Arc<D>,
    pub(crate) addr: Addr,
    pub(crate) describe: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
    _dir: tempfile::TempDir,
}

impl<D: BlockDevice> TestServer<D> {
    pub(crate) fn start(device: Arc<D>, unix: bool, read_only: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let spec = if unix {
            format!("unix:{}", sock.display())
        } else {
            "127.0.0.1:0".to_owned()
        };
        let listener = rt.block_on(NbdListener::bind(&spec)).expect("bind");
        let describe = listener.describe();
        let addr = match &listener {
            NbdListener::Tcp(l) => Addr::Tcp(l.local_addr().expect("local addr")),
            NbdListener::Unix(_, p) => Addr::Unix(p.clone()),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = NbdServerConfig {
            export_name: EXPORT.into(),
            read_only,
            tls: None,
        };
        let handle = rt.spawn(serve(listener, device.clone(), config, async {
            let _ = rx.await;
        }));
        Self {
            rt,
            device,
            addr,
            describe,
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// The qemu URL of export `name` ("" for the default export).
    pub(crate) fn url(&self, name: &str) -> String {
        match &self.addr {
            Addr::Tcp(a) => format!("nbd://{a}/{name}"),
            Addr::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }

    /// A raw protocol client connected to the server.
    pub(crate) fn raw(&self) -> RawClient {
        RawClient::connect(&self.addr)
    }

    /// Stops the server and returns what `serve` returned.
    pub(crate) fn stop(&mut self) -> Result<(), NbdError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), h).await })
                .expect("serve stops within 10 s")
                .expect("serve task"),
            None => Ok(()),
        }
    }
}

impl<D: BlockDevice> Drop for TestServer<D> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A minimal blocking NBD client for protocol-level tests. Every read has
/// a 10 s timeout so a hung server fails the test instead of hanging it.
pub(crate) struct RawClient {
    s: Box<dyn Stream>,
}

impl RawClient {
    pub(crate) fn connect(addr: &Addr) -> Self {
        let timeout = Some(Duration::from_secs(10));
        let s: Box<dyn Stream> = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).expect("connect");
                s.set_read_timeout(timeout).unwrap();
                Box::new(s)
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p).expect("connect");
                s.set_read_timeout(timeout).unwrap();
                Box::new(s)
            }
        };
        Self { s }
    }

    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    pub(crate) fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).expect("recv");
        b
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the greeting; returns the handshake flags.
    pub(crate) fn greeting(&mut self) -> u16 {
        assert_eq!(&self.recv(8)[..], NBDMAGIC);
        assert_eq!(&self.recv(8)[..], IHAVEOPT);
        self.u16()
    }

    /// Greeting plus client flags FIXED_NEWSTYLE|NO_ZEROES.
    pub(crate) fn start(&mut self) {
        assert_eq!(self.greeting(), 0b11);
        self.send(&3u32.to_be_bytes());
    }

    pub(crate) fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub(crate) fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (opt, kind, self.recv(len))
    }

    /// Sends NBD_OPT_INFO/GO for `name` asking for `infos`; returns the
    /// info replies up to the final reply type.
    pub(crate) fn info(&mut self, opt: u32, name: &str, infos: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(opt, &d);
        let mut got = Vec::new();
        loop {
            let (o, kind, data) = self.option_reply();
            assert_eq!(o, opt);
            if kind == REP_INFO {
                got.push(data);
            } else {
                return (got, kind);
            }
        }
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub(crate) fn go(&mut self, name: &str) -> (u64, u16) {
        self.start();
        let (infos, kind) = self.info(OPT_GO, name, &[]);
        assert_eq!(kind, REP_ACK);
        let export = infos
            .iter()
            .find(|i| i[0..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        (
            u64::from_be_bytes(export[2..10].try_into().unwrap()),
            u16::from_be_bytes(export[10..12].try_into().unwrap()),
        )
    }

    pub(crate) fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    pub(crate) fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32);
        self.send(data);
    }

    /// Reads one simple reply header: (error, handle).
    pub(crate) fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), REPLY_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    /// True when the server closed the connection (EOF or reset), false if
    /// data arrives; panics on a timeout.
    pub(crate) fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }

    /// A READ that must succeed; returns the data.
    pub(crate) fn read_ok(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, handle, offset, len);
        assert_eq!(self.reply(), (0, handle));
        self.recv(len as usize)
    }
}

/// A deterministic, non-trivial pattern.
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Operations seen by a [`Recording`] device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// A read served at once by `read_now`.
    ReadNow(u64, usize),
    Read(u64, u32),
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Flush,
    Trim(u64, u64),
    Zeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
}

/// Wraps a MemDevice; records every call, can gate reads of the first 4 KiB
/// until a read elsewhere has completed, and can fail requests at offsets at
/// or past `fail_at` with `fail_kind`. Reads ending at or below `present`
/// are served at once by `read_now` (none by default).
pub(crate) struct Recording {
    pub(crate) mem: ferry_device::MemDevice,
    pub(crate) present: u64,
    pub(crate) ops: std::sync::Mutex<Vec<Op>>,
    pub(crate) gate: Option<tokio::sync::watch::Sender<bool>>,
    pub(crate) fail_at: u64,
    pub(crate) fail_kind: io::ErrorKind,
}

impl Recording {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self {
            mem: ferry_device::MemDevice::from_bytes(bytes),
            present: 0,
            ops: Default::default(),
            gate: None,
            fail_at: u64::MAX,
            fail_kind: io::ErrorKind::Other,
        }
    }

    pub(crate) fn gated(mut self) -> Self {
        self.gate = Some(tokio::sync::watch::channel(false).0);
        self
    }

    pub(crate) fn present_below(mut self, end: u64) -> Self {
        self.present = end;
        self
    }

    pub(crate) fn failing(mut self, at: u64, kind: io::ErrorKind) -> Self {
        self.fail_at = at;
        self.fail_kind = kind;
        self
    }

    pub(crate) fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    fn check(&self, offset: u64) -> io::Result<()> {
        if offset >= self.fail_at {
            Err(io::Error::new(self.fail_kind, "injected failure"))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if offset + buf.len() as u64 > self.present {
            return None;
        }
        self.record(Op::ReadNow(offset, buf.len()));
        if let Err(e) = self.check(offset) {
            return Some(Err(e));
        }
        self.mem.read_now(offset, buf)
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.record(Op::Read(offset, len));
        self.check(offset)?;
        if let Some(gate) = &self.gate {
            if offset < 4096 {
                let mut rx = gate.subscribe();
                rx.wait_for(|open| *open).await.expect("gate sender alive");
            }
        }
        let data = self.mem.read(offset, len).await?;
        if let Some(gate) = &self.gate {
            if offset >= 4096 {
                gate.send_replace(true);
            }
        }
        Ok(data)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.record(Op::Write {
            offset,
            len: data.len(),
            fua,
        });
        self.check(offset)?;
        self.mem.write(offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.record(Op::Flush);
        self.mem.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Op::Trim(offset, len));
        self.check(offset)?;
        self.mem.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.record(Op::Zeroes { offset, len, fua });
        self.check(offset)?;
        self.mem.write_zeroes(offset, len, fua).await
    }
}
