//! `ublk-mem`: serves an in-memory (or file-backed) device through ublk, for
//! the VM harness (`cargo xtask vm-test`) and manual experiments.
//!
//! Prints `LIVE /dev/ublkbN` on stdout once the device is live, and on
//! SIGUSR1 a line `STATS read=N write=N fua=N flush=N trim=N zeroes=N`
//! counting the requests that reached the device (so checks can prove that
//! FLUSH, FUA, DISCARD and WRITE_ZEROES arrive). SIGTERM or SIGINT stops and
//! deletes the device; SIGKILL leaves it quiesced for `--recover` (the backing
//! file keeps the data across the crash). `--no-user-copy` serves through
//! per-tag buffers even when the driver has `UBLK_F_USER_COPY`.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use ferry_device::{BlockDevice, MemDevice};
use ferry_store::Backing;
use ferry_ublk::{dev_id_of, serve_ublk, stop_ublk, UblkOptions};

#[derive(Parser, Debug)]
#[command(about = "Serve a memory- or file-backed device through ublk")]
struct Args {
    /// Size of the device in MiB (a new backing file is made this size).
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Back the device with this file instead of memory.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Device id (/dev/ublkbN); required with --recover.
    #[arg(long)]
    dev_id: Option<u32>,
    /// Re-attach to device --dev-id left behind by a crashed server.
    #[arg(long)]
    recover: bool,
    /// Hardware queues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    depth: u16,
    /// Largest request in KiB.
    #[arg(long, default_value_t = 1024)]
    io_buf_kib: u32,
    /// Fail every read and write touching this 4 KiB block (index) with an
    /// I/O error, to check how errors reach the block layer.
    #[arg(long)]
    bad_block: Option<u64>,
    /// Do not use UBLK_F_USER_COPY: serve through per-tag buffers.
    #[arg(long)]
    no_user_copy: bool,
    /// While this file exists, every read waits (on the runtime, not the
    /// queue thread) until it is removed: a disk that is slow on command,
    /// to check that a page-cache miss of a server above it stalls only
    /// its own request.
    #[arg(long, value_name = "PATH")]
    hold_reads_while: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let opts = UblkOptions {
        dev_id: args.dev_id,
        queues: args.queues,
        depth: args.depth,
        io_buf_bytes: args.io_buf_kib * 1024,
        recover: args.recover,
        user_copy: !args.no_user_copy,
    };
    let size = args.size_mib << 20;
    match &args.file {
        Some(path) => {
            let device = FileDevice::open(path, size)?;
            let device = Counting::new(device, args.bad_block, args.hold_reads_while.clone());
            serve(Arc::new(device), &rt, opts)
        }
        None => {
            let device = MemDevice::new(size);
            let device = Counting::new(device, args.bad_block, args.hold_reads_while.clone());
            serve(Arc::new(device), &rt, opts)
        }
    }
}

fn serve<D: BlockDevice>(
    device: Arc<Counting<D>>,
    rt: &tokio::runtime::Runtime,
    opts: UblkOptions,
) -> Result<()> {
    let handle = rt.handle().clone();
    let counts = Arc::clone(&device.counts);
    let on_live = move |path: &str| {
        println!("LIVE {path}");
        let _ = io::stdout().flush();
        if let Some(dev_id) = dev_id_of(path) {
            handle.spawn(handle_signals(dev_id, counts));
        }
    };
    serve_ublk(device, rt.handle().clone(), opts, on_live).context("serving the ublk device")?;
    eprintln!("ublk-mem: device stopped");
    Ok(())
}

/// SIGUSR1 prints the request counts; SIGTERM/SIGINT stop the device.
async fn handle_signals(dev_id: u32, counts: Arc<Counts>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        eprintln!("ublk-mem: cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                println!("{}", counts.line());
                let _ = io::stdout().flush();
            }
        }
    }
    eprintln!("ublk-mem: stopping /dev/ublkb{dev_id}");
    match tokio::task::spawn_blocking(move || stop_ublk(dev_id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("ublk-mem: {e}"),
        Err(e) => eprintln!("ublk-mem: stop task failed: {e}"),
    }
}

/// Requests that reached the device, by kind.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    write: AtomicU64,
    fua: AtomicU64,
    flush: AtomicU64,
    trim: AtomicU64,
    zeroes: AtomicU64,
}

impl Counts {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "STATS read={} write={} fua={} flush={} trim={} zeroes={}",
            get(&self.read),
            get(&self.write),
            get(&self.fua),
            get(&self.flush),
            get(&self.trim),
            get(&self.zeroes)
        )
    }
}

/// Wraps a device, counts the requests reaching it and fails those that
/// touch the bad block.
struct Counting<D> {
    inner: D,
    counts: Arc<Counts>,
    bad_block: Option<u64>,
    /// Reads wait while this file exists (`--hold-reads-while`).
    hold: Option<PathBuf>,
}

impl<D> Counting<D> {
    fn new(inner: D, bad_block: Option<u64>, hold: Option<PathBuf>) -> Self {
        Self {
            inner,
            counts: Arc::default(),
            bad_block,
            hold,
        }
    }

    /// Whether reads are held now.
    fn held(&self) -> bool {
        self.hold.as_ref().is_some_and(|p| p.exists())
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.bad_block {
            Some(block) if offset < (block + 1) * 4096 && block * 4096 < offset + len => Err(
                io::Error::other(format!("injected fault: block {block} is bad")),
            ),
            _ => Ok(()),
        }
    }
}

impl<D: BlockDevice> BlockDevice for Counting<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if self.held() {
            return None;
        }
        if let Err(e) = self.check(offset, buf.len() as u64) {
            Counts::bump(&self.counts.read);
            return Some(Err(e));
        }
        // Counted only if served here; a declined read is counted by `read`.
        let done = self.inner.read_now(offset, buf)?;
        Counts::bump(&self.counts.read);
        Some(done)
    }

    fn copy_now(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        if self.held() {
            return None;
        }
        if let Err(e) = self.check(offset, len as u64) {
            Counts::bump(&self.counts.read);
            return Some(Err(e));
        }
        let done = self.inner.copy_now(offset, len, out, out_offset)?;
        Counts::bump(&self.counts.read);
        Some(done)
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        // Held for at most 10 minutes (a check script that died).
        for _ in 0..12_000 {
            if !self.held() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Counts::bump(&self.counts.read);
        self.check(offset, u64::from(len))?;
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        Counts::bump(&self.counts.write);
        if fua {
            Counts::bump(&self.counts.fua);
        }
        self.check(offset, data.len() as u64)?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        Counts::bump(&self.counts.flush);
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        Counts::bump(&self.counts.trim);
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        Counts::bump(&self.counts.zeroes);
        if fua {
            Counts::bump(&self.counts.fua);
        }
        self.inner.write_zeroes(offset, len, fua).await
    }
}

/// A device backed by a regular file, so its contents survive a crash of the
/// server (for the recovery check). Reads are served at once on the queue
/// thread, as `ferry pull`'s are once every block is present, so
/// `cargo xtask vm-bench`'s reference column measures the same path: with
/// user copy `copy_now` (one `pwrite` from the file's mapping to
/// `/dev/ublkcN`), else `read_now` (a pread into the tag's buffer).
struct FileDevice {
    backing: Arc<Backing>,
}

impl FileDevice {
    fn open(path: &PathBuf, size: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        if len != size {
            file.set_len(size)
                .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
        }
        drop(file);
        let backing = Backing::open(path, size)?;
        Ok(Self {
            backing: Arc::new(backing),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Backing) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let backing = Arc::clone(&self.backing);
        tokio::task::spawn_blocking(move || f(&backing))
            .await
            .map_err(io::Error::other)?
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        Some(self.backing.read_at(buf, offset))
    }

    fn copy_now(
        &self,
        offset: u64,
        len: usize,
        out: BorrowedFd<'_>,
        out_offset: u64,
    ) -> Option<io::Result<()>> {
        self.backing.copy_to(offset, len, out, out_offset)
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.blocking(move |b| {
            let mut buf = vec![0; len as usize];
            b.read_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.blocking(move |b| {
            b.write_at(&data, offset)?;
            if fua {
                b.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|b| b.sync()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.blocking(move |b| {
            let zeros = vec![0; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                b.write_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            if fua {
                b.sync()?;
            }
            Ok(())
        })
        .await
    }
}
