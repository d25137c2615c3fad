//! `cargo xtask bench --live`: migrating a disk that its VM keeps writing,
//! over the emulated 200 Mbit/s, 50 ms link (issue 26, item 6).
//!
//! The "VM" is a deterministic writer in this module ([`Writer`]): random
//! 64 KiB writes at a fixed rate (open loop: each write is due at its slot,
//! so a slow write delays the next ones and shows as lost throughput), 80%
//! of them into a hot tenth of the disk, over one NBD connection, each
//! write's latency recorded. It writes through ferry's presented source
//! (`ferry serve --present`) or through qemu-storage-daemon's export.
//!
//! Parts, all in one run on one link:
//! - **writer**: per write rate (idle, 4, 16 MB/s) and mode, ferry from a
//!   live source: `postcopy` (pre-copy started, switched over at once: the
//!   VM pauses at t0 and everything is post-copied) and `precopy` (switched
//!   over once the destination lacks no more than about two seconds of
//!   writes, or at `--precopy-cap-secs`). At the switch the writer stops
//!   (the freeze), `ferry switchover` is called, a 4 KiB read is made
//!   through the destination's export (downtime: freeze to that read's
//!   answer), and the writer carries on at the destination until ferry
//!   reports the disk complete. Also the writer alone on a presented
//!   source without a pull (the baseline of the slowdown).
//! - **downtime**: switchover downtime on a 4 GiB and a 64 GiB sparse disk
//!   holding the same 1 GiB of data, the writer at 4 MB/s, switched after a
//!   fixed pre-copy time; the first read is of a data block at the far end
//!   of the disk (not yet copied).
//! - **mirror**: QEMU's drive-mirror as the peer: qemu-storage-daemon at
//!   the source (the image, the writer on its NBD export, QMP) and at the
//!   target (an NBD export of a sparse image, across the link);
//!   `blockdev-mirror sync=full` until the job is ready or a bound passes;
//!   also the writer alone on the source daemon (its baseline).
//!
//! The results go into the `live` section of BENCHMARKS.md and
//! `target/bench/live/live.json`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::nbd::NbdClient;
use super::{chrono_now, git_head, link_args, machine, steal, write_section, BenchArgs};
use crate::setup::{target_dir, tool, workspace_root, Need};
use crate::stats::{median, mmm, percentile};
use crate::wan::procs::{self, FerryIds, Proc};
use crate::wan::{counter, LinkOpts, Wan, DST_ADDR, SRC_ADDR};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The writer's block.
pub(crate) const WRITE_BYTES: u64 = 64 * 1024;
const FERRY_PORT: u16 = 7700;
const MIRROR_PORT: u16 = 10810;

/// What the live bench needs beyond ferry.
const NEEDS: &[Need] = &[
    tool("qemu-storage-daemon", "qemu-system-common"),
    tool("ip", "iproute2"),
];

/// The writer's pattern: `rate` bytes a second of 64 KiB writes, 80% of
/// them into `hot` (a tenth of the disk), the others anywhere, from `seed`.
#[derive(Clone, Debug)]
pub(crate) struct WriterSpec {
    pub(crate) rate: u64,
    pub(crate) size: u64,
    pub(crate) hot: std::ops::Range<u64>,
    pub(crate) seed: u64,
}

impl WriterSpec {
    /// The spec for a disk of `size` bytes: the hot tenth starts at a
    /// third of the disk (inside the data of the bench's images).
    pub(crate) fn new(rate: u64, size: u64, seed: u64) -> Self {
        let align = |x: u64| x / WRITE_BYTES * WRITE_BYTES;
        let start = align(size / 3);
        let len = align(size / 10).max(WRITE_BYTES);
        Self {
            rate,
            size,
            hot: start..(start + len).min(align(size)),
            seed: seed | 1,
        }
    }

    /// Time between two writes.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs_f64(WRITE_BYTES as f64 / self.rate.max(1) as f64)
    }
}

/// The writer's deterministic sequence of offsets (64 KiB aligned).
pub(crate) struct Offsets {
    x: u64,
    spec: WriterSpec,
}

impl Offsets {
    pub(crate) fn new(spec: &WriterSpec) -> Self {
        Self {
            x: spec.seed,
            spec: spec.clone(),
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }
}

impl Iterator for Offsets {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let hot = self.next_u64() % 10 < 8;
        let (base, len) = if hot {
            (self.spec.hot.start, self.spec.hot.end - self.spec.hot.start)
        } else {
            (0, self.spec.size)
        };
        let blocks = (len / WRITE_BYTES).max(1);
        Some(base + (self.next_u64() % blocks) * WRITE_BYTES)
    }
}

/// What a writer did: every write's start (s since the writer's t0) and
/// latency (ms), and the offset of its last write.
#[derive(Default, Clone, Debug)]
pub(crate) struct WriterLog {
    pub(crate) writes: Vec<(f64, f64)>,
    pub(crate) last_offset: Option<u64>,
    /// When it stopped, s since its t0.
    pub(crate) ran_s: f64,
}

/// Latency and throughput over a window of a writer's log.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct WriteStats {
    pub(crate) n: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_ms: f64,
    /// Bytes written a second over the window.
    pub(crate) mb_s: f64,
}

impl WriterLog {
    /// The writes started in `[from, to)` (s since t0).
    pub(crate) fn stats(&self, from: f64, to: f64) -> WriteStats {
        let lat: Vec<f64> = self
            .writes
            .iter()
            .filter(|w| w.0 >= from && w.0 < to)
            .map(|w| w.1)
            .collect();
        if lat.is_empty() || to <= from {
            return WriteStats::default();
        }
        WriteStats {
            n: lat.len(),
            p50_ms: percentile(&lat, 50.0).unwrap_or(f64::NAN),
            p99_ms: percentile(&lat, 99.0).unwrap_or(f64::NAN),
            mean_ms: lat.iter().sum::<f64>() / lat.len() as f64,
            mb_s: lat.len() as f64 * WRITE_BYTES as f64 / (to - from) / 1e6,
        }
    }
}

/// A running writer thread; [`Writer::stop`] ends it after its current
/// write.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<WriterLog>>>,
}

impl Writer {
    /// Connects to `sock` (export `export`) and writes per `spec` from
    /// now, times counted from `t0`, starting at write number `skip` of
    /// the sequence.
    pub(crate) fn start(
        sock: &Path,
        export: &str,
        spec: WriterSpec,
        t0: Instant,
        skip: usize,
        cpus: Option<Vec<usize>>,
    ) -> Result<Writer> {
        let mut c = NbdClient::connect(sock, export, Duration::from_secs(60))?;
        if c.size < spec.size {
            bail!("export of {} bytes, the writer wants {}", c.size, spec.size);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || -> Result<WriterLog> {
            if let Some(c) = &cpus {
                pin_this_thread(c)?;
            }
            let mut log = WriterLog::default();
            let mut offs = Offsets::new(&spec).skip(skip);
            let mut fill = spec.seed ^ (skip as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut buf = vec![0u8; WRITE_BYTES as usize];
            let interval = spec.interval();
            let mut due = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(20)));
                    continue;
                }
                let off = offs.next().expect("endless");
                for w in buf.chunks_exact_mut(8) {
                    fill ^= fill << 13;
                    fill ^= fill >> 7;
                    fill ^= fill << 17;
                    w.copy_from_slice(&fill.to_le_bytes());
                }
                let t = Instant::now();
                c.write(off, &buf)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                log.writes.push((t.duration_since(t0).as_secs_f64(), ms));
                log.last_offset = Some(off);
                due += interval;
            }
            log.ran_s = t0.elapsed().as_secs_f64();
            Ok(log)
        });
        Ok(Writer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops it after the write in progress; its log.
    pub(crate) fn stop(mut self) -> Result<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One QMP connection (line-delimited JSON; events skipped).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                    return Err(e).with_context(|| format!("QMP at {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let msg = json!({ "execute": name, "arguments": args });
        writeln!(self.w, "{msg}")?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {name}");
            }
            let v: Value = serde_json::from_str(&line).context("QMP reply")?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

/// One cell's run of ferry.
#[derive(Default, Clone, Debug)]
struct FerryRun {
    /// Pull start to the switchover call (the freeze), s.
    t_switch: f64,
    /// Freeze (writer stopped) to the answer of the first read at the
    /// destination, ms.
    downtime_ms: f64,
    /// ferry's own switchover time (request to serving), ms.
    switchover_ms: f64,
    /// Freeze to `ferry switchover` (the command) having returned, ms.
    reply_ms: f64,
    /// Pull start to the NBD connection to the destination opened, ms.
    connected_ms: f64,
    /// The first read was fetched on demand: the block was absent at the
    /// destination.
    first_read_remote: bool,
    first_read_ms: f64,
    /// Pull start to every chunk at the destination, s.
    t_complete: f64,
    wire_bytes: u64,
    /// ferry's own counters (destination's QUIC bytes received + sent).
    ferry_wire_bytes: u64,
    /// Whether pre-copy was stopped at the cap rather than converged.
    capped: bool,
    /// Bytes the destination lacked just before the freeze.
    absent_at_switch: u64,
    /// Bytes fetched in the background before the freeze (re-fetches
    /// included).
    fetched_before_switch: u64,
    /// The writer at the source during pre-copy.
    precopy_writes: WriteStats,
    generations: u64,
    note: String,
}

/// One run of QEMU's mirror.
#[derive(Default, Clone, Debug)]
struct MirrorRun {
    /// Job start to ready, s; the bound when not ready.
    t_ready: f64,
    ready: bool,
    wire_bytes: u64,
    writes: WriteStats,
}

/// Which CPUs play which host: with two CPUs or more the source host
/// (its VM, i.e. the writer, and its `ferry serve` or QEMU) gets the first
/// and the destination and the link emulator the others, as two hosts and a
/// network would have them (docs/decisions/bench-live-hosts-apart.md).
#[derive(Clone, Debug)]
pub(crate) struct Hosts {
    source: Vec<usize>,
    rest: Vec<usize>,
}

impl Hosts {
    /// The CPUs this process may use, split; `None` when `shared` or with
    /// one CPU.
    fn new(shared: bool) -> Result<Option<Hosts>> {
        let set = rustix::thread::sched_getaffinity(None).context("sched_getaffinity")?;
        let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect();
        if shared || cpus.len() < 2 {
            return Ok(None);
        }
        Ok(Some(Hosts {
            source: cpus[..1].to_vec(),
            rest: cpus[1..].to_vec(),
        }))
    }

    fn describe(h: Option<&Hosts>) -> String {
        match h {
            Some(h) => format!(
                "The source host (the writer, `ferry serve` or the source qemu-storage-daemon) runs on CPU {}, the destination and the link emulator on CPU {} (`--live-shared-cpus`: all on all).",
                cpu_list(&h.source),
                cpu_list(&h.rest)
            ),
            None => "Every process runs on every CPU (`--live-shared-cpus` or one CPU).".into(),
        }
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Keeps the calling thread (and the threads and processes it starts) on
/// `cpus`.
fn pin_this_thread(cpus: &[usize]) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    rustix::thread::sched_setaffinity(None, &set).context("sched_setaffinity")
}

/// Puts every thread of the link emulator (process `pid`) at nice -10, so
/// the destination's work on the same CPU does not delay packets (a network
/// is not the host's CPU; root, which the emulated WAN needs anyway).
fn raise_forwarder(pid: u32) -> Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = e?.file_name().to_string_lossy().parse()?;
        let p = rustix::process::Pid::from_raw(tid).context("a thread id of 0")?;
        rustix::process::setpriority_process(Some(p), -10)
            .with_context(|| format!("cannot raise the link emulator's thread {tid}"))?;
    }
    Ok(())
}

/// `cmd` run on `cpus` (through `taskset`, which execs it: the same PID).
fn on_cpus(cpus: &[usize], cmd: &Command) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(cpu_list(cpus))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

struct Live<'a> {
    a: &'a BenchArgs,
    bin: PathBuf,
    dir: PathBuf,
    ids: FerryIds,
    wan: Wan,
    link: LinkOpts,
    logs: PathBuf,
    hosts: Option<Hosts>,
}

/// Makes (once) a sparse image of `size` holding `data` bytes of random
/// data in 8 equal extents spread over the disk (the last one ending at
/// the disk's end); returns it and the offset of a data block in its last
/// extent.
fn sparse_image(dir: &Path, size: u64, data: u64) -> Result<(PathBuf, u64)> {
    let path = dir.join(format!("pristine-{}M-data{}M.img", size / MIB, data / MIB));
    let ext = data / 8 / MIB * MIB;
    let stride = size / 8 / MIB * MIB;
    let far = size - ext / 2;
    if path.exists() && std::fs::metadata(&path)?.len() == size {
        return Ok((path, far / 4096 * 4096));
    }
    eprintln!(
        "bench: making a {} MiB sparse image with {} MiB of random data",
        size / MIB,
        data / MIB
    );
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp)?;
    f.set_len(size)?;
    let mut x: u64 = 0x11ce_0001 ^ size;
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..8u64 {
        let start = if i == 7 { size - ext } else { i * stride };
        for m in 0..ext / MIB {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&buf, start + m * MIB)?;
        }
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok((path, far / 4096 * 4096))
}

/// A fresh working copy of `pristine` (the writer changes it), out of the
/// page cache.
fn working_copy(pristine: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    crate::setup::run(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(pristine)
            .arg(to),
    )?;
    super::drop_page_cache(to)
}

impl Live<'_> {
    /// `prog` in the source's namespace, on the source host's CPUs.
    fn in_src(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let c = self.wan.in_src(prog);
        match &self.hosts {
            Some(h) => on_cpus(&h.source, &c),
            None => c,
        }
    }

    /// Where the source VM (the writer) runs.
    fn vm_cpus(&self) -> Option<Vec<usize>> {
        self.hosts.as_ref().map(|h| h.source.clone())
    }

    fn serve(&self, img: &Path, vm_sock: &Path, tag: &str) -> Result<Proc> {
        let _ = std::fs::remove_file(vm_sock);
        let mut p = Proc::spawn(
            "ferry serve --present",
            self.in_src(&self.bin)
                .args(["serve", "--disk"])
                .arg(img)
                .args([
                    "--listen",
                    &format!("{SRC_ADDR}:{FERRY_PORT}"),
                    "--identity",
                ])
                .arg(&self.ids.src_dir)
                .args(["--trust-peer", &self.ids.dst_fp])
                .args(link_args(&self.link))
                .arg("--present")
                .arg(format!("unix:{}", vm_sock.display())),
            &self.logs.join(format!("serve-{tag}.log")),
        )?;
        p.wait_for_log("ferry serve: presenting", Duration::from_secs(120))?;
        Ok(p)
    }

    /// The writer alone on a presented source (no pull) for `secs`.
    fn baseline_ferry(
        &self,
        pristine: &Path,
        size: u64,
        rate: u64,
        secs: f64,
    ) -> Result<WriteStats> {
        let img = self.dir.join("src-live.img");
        working_copy(pristine, &img)?;
        let vm = self.dir.join("vm.sock");
        let serve = self.serve(&img, &vm, "baseline")?;
        let t0 = Instant::now();
        let w = Writer::start(
            &vm,
            "",
            WriterSpec::new(rate, size, 7),
            t0,
            0,
            self.vm_cpus(),
        )?;
        std::thread::sleep(Duration::from_secs_f64(secs));
        let log = w.stop()?;
        drop(serve);
        Ok(log.stats(0.0, log.ran_s))
    }

    /// One ferry run of a cell: `precopy` false switches at once.
    #[allow(clippy::too_many_arguments)]
    fn ferry_run(
        &self,
        pristine: &Path,
        size: u64,
        rate: u64,
        precopy: bool,
        fixed_precopy: Option<Duration>,
        far_block: u64,
        wait_complete: bool,
        tag: &str,
    ) -> Result<FerryRun> {
        let mut r = FerryRun::default();
        let img = self.dir.join("src-live.img");
        working_copy(pristine, &img)?;
        let vm = self.dir.join("vm.sock");
        let mut serve = self.serve(&img, &vm, tag)?;
        let disk = self.dir.join("dst-live.img");
        for p in [disk.clone(), self.dir.join("dst-live.img.ferry-state")] {
            let _ = std::fs::remove_file(p);
        }
        let nbd = self.dir.join("nbd-live.sock");
        let ctl = self.dir.join("ctl-live.sock");
        let _ = std::fs::remove_file(&nbd);
        let spec = WriterSpec::new(rate, size, 7);
        // The VM runs before the migration starts.
        let t_vm = Instant::now();
        let writer = if rate > 0 {
            Some(Writer::start(
                &vm,
                "",
                spec.clone(),
                t_vm,
                0,
                self.vm_cpus(),
            )?)
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(500));
        let before = self.wan.stats()?;
        let t0 = Instant::now();
        let t0_vm = t0.duration_since(t_vm).as_secs_f64();
        let mut pull = Proc::spawn(
            "ferry pull --precopy",
            self.wan
                .in_dst(&self.bin)
                .args(["pull", "--source", &format!("{SRC_ADDR}:{FERRY_PORT}")])
                .arg("--disk")
                .arg(&disk)
                .arg("--nbd")
                .arg(format!("unix:{}", nbd.display()))
                .arg("--control")
                .arg(&ctl)
                .arg("--identity")
                .arg(&self.ids.dst_dir)
                .args(["--trust-peer", &self.ids.src_fp])
                .args(link_args(&self.link))
                .arg("--precopy"),
            &self.logs.join(format!("pull-{tag}.log")),
        )?;
        pull.wait_for_log("ferry pull: pre-copying", Duration::from_secs(60))?;
        // The destination's QEMU opens its disk when the migration begins
        // (`-incoming`): the export takes the connection, its requests
        // wait for the switchover.
        let mut c = NbdClient::connect(&nbd, "ferry", Duration::from_secs(60))?;
        r.connected_ms = t0.elapsed().as_secs_f64() * 1e3;
        if precopy {
            // Converged: no more absent than about two seconds of writes
            // (what the VM dirties between rounds), or the fixed time.
            let enough = (2 * rate).max(4 * MIB);
            let cap = Duration::from_secs(self.a.precopy_cap_secs);
            loop {
                pull.check_running()?;
                serve.check_running()?;
                let el = t0.elapsed();
                if let Some(f) = fixed_precopy {
                    if el >= f {
                        break;
                    }
                } else {
                    let s = procs::ferry_status(&self.bin, &ctl)?;
                    if s["phase"] == "error" {
                        bail!("the pull failed: {}", s["error"]);
                    }
                    let total = s["total_bytes"].as_u64().unwrap_or(u64::MAX);
                    let present = s["present_bytes"].as_u64().unwrap_or(0);
                    if total.saturating_sub(present) <= enough {
                        break;
                    }
                    if el >= cap {
                        r.capped = true;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let s = procs::ferry_status(&self.bin, &ctl)?;
        r.absent_at_switch = s["total_bytes"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(s["present_bytes"].as_u64().unwrap_or(0));
        r.fetched_before_switch = s["fetched_background_bytes"].as_u64().unwrap_or(0)
            + s["fetched_on_demand_bytes"].as_u64().unwrap_or(0);
        // The freeze: the VM is paused (the writer stopped after its write
        // in progress), then the switchover.
        let src_log = match writer {
            Some(w) => Some(w.stop()?),
            None => None,
        };
        let t_freeze = Instant::now();
        r.t_switch = t_freeze.duration_since(t0).as_secs_f64();
        // At the freeze the hook runs `ferry switchover` and the VM
        // resumes at the destination at once: its first read waits there
        // until the switchover is done.
        let bin = self.bin.clone();
        let ctl2 = ctl.clone();
        let hook = std::thread::spawn(move || {
            let out = Command::new(&bin)
                .args(["switchover", "--control"])
                .arg(&ctl2)
                .output();
            (out, t_freeze.elapsed().as_secs_f64() * 1e3)
        });
        let probe = src_log
            .as_ref()
            .and_then(|l| l.last_offset)
            .filter(|_| precopy && fixed_precopy.is_none())
            .unwrap_or(far_block);
        let mut buf = vec![0u8; 4096];
        let read = c.read(probe, &mut buf);
        let done = Instant::now();
        let (out, reply_ms) = hook
            .join()
            .map_err(|_| anyhow::anyhow!("the switchover thread panicked"))?;
        let out = out?;
        r.reply_ms = reply_ms;
        if !out.status.success() {
            bail!(
                "ferry switchover failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        read.context("the first read at the destination")?;
        r.first_read_ms = done.duration_since(t_freeze).as_secs_f64() * 1e3;
        // Remote: the read's block was fetched on demand (nothing is
        // fetched on demand before the switchover).
        let after_read = procs::ferry_status(&self.bin, &ctl)?;
        r.first_read_remote = after_read["fetched_on_demand_bytes"].as_u64().unwrap_or(0) > 0;
        r.downtime_ms = done.duration_since(t_freeze).as_secs_f64() * 1e3;
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        r.switchover_ms = reply["switchover_ms"].as_f64().unwrap_or(f64::NAN);
        drop(c);
        if let Some(l) = &src_log {
            r.precopy_writes = l.stats(t0_vm, r.t_switch + t0_vm);
        }
        if !wait_complete {
            let st = procs::ferry_status(&self.bin, &ctl)?;
            r.generations = st["precopy_generation"].as_u64().unwrap_or(0);
            let after = self.wan.stats()?;
            r.wire_bytes = wire(&before, &after);
            r.note = format!("to the switch: {} MiB on the link", r.wire_bytes >> 20);
            return Ok(r);
        }
        // The VM runs on at the destination until the disk is complete.
        let dst_writer = if rate > 0 {
            let skip = src_log.as_ref().map_or(0, |l| l.writes.len());
            Some(Writer::start(&nbd, "ferry", spec, t0, skip, None)?)
        } else {
            None
        };
        let (st, complete_at) = procs::wait_ferry_complete(
            &self.bin,
            &ctl,
            Duration::from_secs(self.a.timeout_s),
            &mut [&mut pull, &mut serve],
        )?;
        r.t_complete = complete_at.duration_since(t0).as_secs_f64();
        let after = self.wan.stats()?;
        if let Some(w) = dst_writer {
            w.stop()?;
        }
        r.wire_bytes = wire(&before, &after);
        r.ferry_wire_bytes =
            st["wire_rx_bytes"].as_u64().unwrap_or(0) + st["wire_tx_bytes"].as_u64().unwrap_or(0);
        r.generations = st["precopy_generation"].as_u64().unwrap_or(0);
        r.note = format!(
            "verified {}; {} MiB on demand, {} MiB background, {} guest-written chunks at the destination",
            st["verified"].as_str().unwrap_or("?"),
            st["fetched_on_demand_bytes"].as_u64().unwrap_or(0) >> 20,
            st["fetched_background_bytes"].as_u64().unwrap_or(0) >> 20,
            st["guest_written_chunks"].as_u64().unwrap_or(0),
        );
        pull.stop();
        drop(serve);
        Ok(r)
    }

    fn qsd_source(&self, img: &Path, vm: &Path, qmp: &Path) -> Result<Proc> {
        let _ = std::fs::remove_file(vm);
        let _ = std::fs::remove_file(qmp);
        Proc::spawn(
            "qemu-storage-daemon (source)",
            self.in_src("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=file0",
                    img.display()
                ))
                .args(["--blockdev", "driver=raw,file=file0,node-name=disk0"])
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", vm.display()))
                .args([
                    "--export",
                    "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
                ])
                .arg("--chardev")
                .arg(format!(
                    "socket,id=m0,path={},server=on,wait=off",
                    qmp.display()
                ))
                .args(["--monitor", "chardev=m0"]),
            &self.logs.join("qsd-source.log"),
        )
    }

    fn wait_sock(p: &mut Proc, sock: &Path) -> Result<()> {
        let t0 = Instant::now();
        while !sock.exists() {
            p.check_running()?;
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("{} made no socket {}", p.what, sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The writer alone on the source daemon for `secs`.
    fn baseline_mirror(
        &self,
        pristine: &Path,
        size: u64,
        rate: u64,
        secs: f64,
    ) -> Result<WriteStats> {
        let img = self.dir.join("src-live.img");
        working_copy(pristine, &img)?;
        let (vm, qmp) = (self.dir.join("qsd-vm.sock"), self.dir.join("qsd-qmp.sock"));
        let mut src = self.qsd_source(&img, &vm, &qmp)?;
        Self::wait_sock(&mut src, &vm)?;
        let t0 = Instant::now();
        let w = Writer::start(
            &vm,
            "disk0",
            WriterSpec::new(rate, size, 7),
            t0,
            0,
            self.vm_cpus(),
        )?;
        std::thread::sleep(Duration::from_secs_f64(secs));
        let log = w.stop()?;
        drop(src);
        Ok(log.stats(0.0, log.ran_s))
    }

    /// One run of QEMU's mirror with the writer at `rate`, bounded by `cap`.
    fn mirror_run(
        &self,
        pristine: &Path,
        size: u64,
        rate: u64,
        cap: Duration,
    ) -> Result<MirrorRun> {
        let mut r = MirrorRun::default();
        let img = self.dir.join("src-live.img");
        working_copy(pristine, &img)?;
        let target = self.dir.join("dst-mirror.img");
        let _ = std::fs::remove_file(&target);
        std::fs::File::create(&target)?.set_len(size)?;
        let (vm, qmp) = (self.dir.join("qsd-vm.sock"), self.dir.join("qsd-qmp.sock"));
        let mut src = self.qsd_source(&img, &vm, &qmp)?;
        let mut dst = Proc::spawn(
            "qemu-storage-daemon (target)",
            self.wan
                .in_dst("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=t0",
                    target.display()
                ))
                .arg("--nbd-server")
                .arg(format!(
                    "addr.type=inet,addr.host={DST_ADDR},addr.port={MIRROR_PORT}"
                ))
                .args([
                    "--export",
                    "type=nbd,id=e0,node-name=t0,name=tgt,writable=on",
                ]),
            &self.logs.join("qsd-target.log"),
        )?;
        Self::wait_sock(&mut src, &vm)?;
        let mut q = Qmp::connect(&qmp)?;
        // The target daemon listens once it logs nothing and runs; retry
        // the connection for a while.
        let t_add = Instant::now();
        loop {
            dst.check_running()?;
            let add = q.cmd(
                "blockdev-add",
                json!({
                    "driver": "nbd", "node-name": "tgt", "export": "tgt",
                    "server": { "type": "inet", "host": DST_ADDR, "port": MIRROR_PORT.to_string() }
                }),
            );
            match add {
                Ok(_) => break,
                Err(e) if t_add.elapsed() > Duration::from_secs(20) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        let t_vm = Instant::now();
        let writer = if rate > 0 {
            Some(Writer::start(
                &vm,
                "disk0",
                WriterSpec::new(rate, size, 7),
                t_vm,
                0,
                self.vm_cpus(),
            )?)
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(500));
        let before = self.wan.stats()?;
        let t0 = Instant::now();
        q.cmd(
            "blockdev-mirror",
            json!({ "job-id": "m0", "device": "disk0", "target": "tgt", "sync": "full" }),
        )?;
        loop {
            src.check_running()?;
            dst.check_running()?;
            let jobs = q.cmd("query-block-jobs", json!({}))?;
            if jobs
                .as_array()
                .is_some_and(|j| j.iter().any(|j| j["ready"] == true))
            {
                r.ready = true;
                break;
            }
            if t0.elapsed() >= cap {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        r.t_ready = t0.elapsed().as_secs_f64();
        let after = self.wan.stats()?;
        r.wire_bytes = wire(&before, &after);
        if let Some(w) = writer {
            let log = w.stop()?;
            let from = t0.duration_since(t_vm).as_secs_f64();
            r.writes = log.stats(from, from + r.t_ready);
        }
        let _ = q.cmd("block-job-cancel", json!({ "device": "m0", "force": true }));
        drop(q);
        src.stop();
        dst.stop();
        Ok(r)
    }
}

/// Bytes forwarded both ways between two link snapshots.
fn wire(before: &Value, after: &Value) -> u64 {
    let d = |dir: &str| {
        counter(after, dir, "forwarded_bytes").saturating_sub(counter(
            before,
            dir,
            "forwarded_bytes",
        ))
    };
    d("src_to_dst") + d("dst_to_src")
}

fn rate_name(rate: u64) -> String {
    if rate == 0 {
        "idle".into()
    } else {
        format!("{} MB/s", rate / 1_000_000)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn med(xs: &[f64]) -> f64 {
    median(xs).unwrap_or(f64::NAN)
}

/// Runs the live bench (see the module documentation).
pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    crate::setup::ensure(super::NEEDS)?;
    crate::setup::ensure(NEEDS)?;
    let runs = a.runs.unwrap_or(if a.quick { 1 } else { 3 });
    let rates: Vec<u64> = a.writer_rates.iter().map(|&m| m * 1_000_000).collect();
    let parts = &a.live_parts;
    for p in parts {
        if !["writer", "downtime", "mirror"].contains(&p.as_str()) {
            bail!("unknown live part {p} (writer, downtime, mirror)");
        }
    }
    let has = |p: &str| parts.iter().any(|x| x == p);
    // The writer comparison: 1 GiB holding 512 MiB (--quick: 128 MiB
    // holding 64 MiB); downtime: 4 and 64 GiB holding 1 GiB (--quick: 1
    // and 16 GiB holding 64 MiB).
    let (wsize, wdata) = if a.quick {
        (128 * MIB, 64 * MIB)
    } else {
        (GIB, 512 * MIB)
    };
    let (dsizes, ddata) = if a.quick {
        (vec![GIB, 16 * GIB], 64 * MIB)
    } else {
        (vec![4 * GIB, 64 * GIB], GIB)
    };
    let base_secs = if a.quick { 3.0 } else { 10.0 };
    let fixed = Duration::from_secs(if a.quick { 2 } else { 5 });
    let bin = procs::ferry_bin(true)?;
    let dir = target_dir().join("bench").join("live");
    std::fs::create_dir_all(&dir)?;
    let (wimg, wfar) = sparse_image(&dir, wsize, wdata)?;
    let dimgs: Vec<(u64, PathBuf, u64)> = if has("downtime") {
        dsizes
            .iter()
            .map(|&s| sparse_image(&dir, s, ddata).map(|(p, f)| (s, p, f)))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let link = LinkOpts {
        rate_mbit: 200.0,
        rtt_ms: 50.0,
        ..LinkOpts::default()
    };
    // The destination and the link emulator (started below, in this
    // process's threads) stay off the source host's CPU.
    let hosts = Hosts::new(a.live_shared_cpus)?;
    if let Some(h) = &hosts {
        pin_this_thread(&h.rest)?;
    }
    let wan = Wan::up("live", &link, &a.tcp_cc, true)?;
    if hosts.is_some() {
        raise_forwarder(wan.pid)?;
    }
    let l = Live {
        hosts: hosts.clone(),
        a,
        bin: bin.clone(),
        dir: dir.clone(),
        ids: FerryIds::make(&bin, &dir)?,
        wan,
        link: link.clone(),
        logs: dir.join("logs"),
    };
    std::fs::create_dir_all(&l.logs)?;
    let mut m = Meta {
        hosts,
        started: chrono_now(),
        load0: loadavg(),
        runs,
        done: 0,
        t_all: Instant::now(),
        stolen0: steal::stolen_ms(),
        link: link.clone(),
        wsize,
        wdata,
        base_secs,
        ddata,
        fixed,
        mirror_cap: Duration::from_secs(a.mirror_cap_secs),
        dir: dir.clone(),
    };
    let mut res = Results::default();
    for run in 0..runs {
        if has("writer") {
            for &rate in &rates {
                if rate > 0 {
                    let b = l.baseline_ferry(&wimg, wsize, rate, base_secs)?;
                    eprintln!(
                        "bench: live run {} baseline ferry --present {}: p50 {:.2} ms, mean {:.2} ms, {:.1} MB/s",
                        run + 1, rate_name(rate), b.p50_ms, b.mean_ms, b.mb_s
                    );
                    push(&mut res.base_f, rate, b);
                }
                for (mode, pre) in [("postcopy", false), ("precopy", true)] {
                    let tag = format!("{mode}-{}-{}", rate / 1_000_000, run + 1);
                    let r = l
                        .ferry_run(&wimg, wsize, rate, pre, None, wfar, true, &tag)
                        .with_context(|| {
                            format!("ferry {mode} {} run {}", rate_name(rate), run + 1)
                        })?;
                    eprintln!(
                        "bench: live run {} ferry {mode} {}: switch at {:.1} s{} ({} MiB absent, {} MiB fetched), downtime {:.0} ms (switchover {:.1} ms, command returned {:.0} ms{}), complete {:.1} s, wire {} MiB, writes p50 {:.2} ms mean {:.2} ms {:.1} MB/s; {}",
                        run + 1,
                        rate_name(rate),
                        r.t_switch,
                        if r.capped { " (capped)" } else { "" },
                        r.absent_at_switch >> 20,
                        r.fetched_before_switch >> 20,
                        r.downtime_ms,
                        r.switchover_ms,
                        r.reply_ms,
                        if r.first_read_remote { ", remote" } else { ", local" },
                        r.t_complete,
                        r.wire_bytes >> 20,
                        r.precopy_writes.p50_ms,
                        r.precopy_writes.mean_ms,
                        r.precopy_writes.mb_s,
                        r.note
                    );
                    match res.cells.iter_mut().find(|c| c.0 == (rate, mode)) {
                        Some(c) => c.1.push(r),
                        None => res.cells.push(((rate, mode), vec![r])),
                    }
                }
            }
        }
        if has("downtime") {
            for (size, img, far) in &dimgs {
                let rate = 4_000_000;
                let tag = format!("down-{}G-{}", size / GIB, run + 1);
                let r = l
                    .ferry_run(img, *size, rate, true, Some(fixed), *far, false, &tag)
                    .with_context(|| format!("downtime on {} GiB run {}", size / GIB, run + 1))?;
                eprintln!(
                    "bench: live run {} downtime {} GiB: {:.0} ms (switchover {:.1} ms, command returned {:.0} ms{}), {} generations; {}",
                    run + 1,
                    size / GIB,
                    r.downtime_ms,
                    r.switchover_ms,
                    r.reply_ms,
                    if r.first_read_remote { ", remote" } else { ", local" },
                    r.generations,
                    r.note
                );
                match res.down.iter_mut().find(|c| c.0 == *size) {
                    Some(c) => c.1.push(r),
                    None => res.down.push((*size, vec![r])),
                }
            }
        }
        if has("mirror") {
            for &rate in &rates {
                if rate > 0 {
                    let b = l.baseline_mirror(&wimg, wsize, rate, base_secs)?;
                    eprintln!(
                        "bench: live run {} baseline qemu-storage-daemon {}: p50 {:.2} ms, mean {:.2} ms, {:.1} MB/s",
                        run + 1, rate_name(rate), b.p50_ms, b.mean_ms, b.mb_s
                    );
                    push(&mut res.base_q, rate, b);
                }
                // Unbounded for the idle guest (up to the run timeout);
                // the writers' runs at 3x its time unless told.
                let cap = if rate == 0 {
                    Duration::from_secs(a.timeout_s)
                } else if m.mirror_cap.is_zero() {
                    Duration::from_secs(90)
                } else {
                    m.mirror_cap
                };
                let r = l
                    .mirror_run(&wimg, wsize, rate, cap)
                    .with_context(|| format!("mirror {} run {}", rate_name(rate), run + 1))?;
                eprintln!(
                    "bench: live run {} mirror {}: {} {:.1} s, wire {} MiB, writes p50 {:.2} ms mean {:.2} ms {:.1} MB/s",
                    run + 1,
                    rate_name(rate),
                    if r.ready { "ready after" } else { "NOT ready after" },
                    r.t_ready,
                    r.wire_bytes >> 20,
                    r.writes.p50_ms,
                    r.writes.mean_ms,
                    r.writes.mb_s
                );
                if rate == 0 && a.mirror_cap_secs == 0 && run == 0 && r.ready {
                    m.mirror_cap = Duration::from_secs_f64((3.0 * r.t_ready).max(30.0));
                }
                match res.mirror.iter_mut().find(|c| c.0 == rate) {
                    Some(c) => c.1.push(r),
                    None => res.mirror.push((rate, vec![r])),
                }
            }
        }
        m.done = run + 1;
        write_report(a, &m, &res)?;
    }
    l.wan.down()?;
    Ok(())
}

/// Everything measured so far.
#[derive(Default)]
struct Results {
    cells: Vec<((u64, &'static str), Vec<FerryRun>)>,
    base_f: Vec<(u64, Vec<WriteStats>)>,
    base_q: Vec<(u64, Vec<WriteStats>)>,
    mirror: Vec<(u64, Vec<MirrorRun>)>,
    down: Vec<(u64, Vec<FerryRun>)>,
}

/// What the report says about the set-up.
struct Meta {
    hosts: Option<Hosts>,
    started: String,
    load0: String,
    runs: usize,
    done: usize,
    t_all: Instant,
    stolen0: Option<f64>,
    link: LinkOpts,
    wsize: u64,
    wdata: u64,
    base_secs: f64,
    ddata: u64,
    fixed: Duration,
    mirror_cap: Duration,
    dir: PathBuf,
}

/// Writes the report and the raw JSON (after every run: a bench stopped
/// early leaves the runs it finished, marked partial).
fn write_report(a: &BenchArgs, m: &Meta, res: &Results) -> Result<()> {
    let Meta {
        started,
        load0,
        runs,
        link,
        wsize,
        wdata,
        base_secs,
        ddata,
        fixed,
        mirror_cap,
        dir,
        ..
    } = m;
    let Results {
        cells,
        base_f,
        base_q,
        mirror,
        down,
    } = res;
    let has = |p: &str| a.live_parts.iter().any(|x| x == p);
    let stolen = steal::between(m.stolen0, steal::stolen_ms());
    let took = m.t_all.elapsed();
    let mut o = String::new();
    if m.done < *runs {
        writeln!(
            o,
            "**PARTIAL: {} of {runs} runs finished when this was written.**\n",
            m.done
        )?;
    }
    writeln!(o, "## Live source (`--live`)\n")?;
    writeln!(
        o,
        "`cargo xtask bench --live{}{}`, {started}, ferry {} (release), {}; link {}; {runs} run(s) of everything, interleaved; took {:.0} s. Load average (1, 5, 15 min) {load0} before, {} after (a shared machine); host CPU steal over the bench {:.1} s.\n",
        if a.quick { " --quick" } else { "" },
        command_options(a, *runs),
        git_head(),
        machine(),
        link.describe(),
        took.as_secs_f64(),
        loadavg(),
        stolen / 1e3,
    )?;
    writeln!(
        o,
        "The VM is xtask's writer: 64 KiB writes at random 64 KiB-aligned offsets at a fixed rate (open loop), 80% of them into a hot tenth of the disk, one at a time over one NBD connection, no flushes. Writer comparison disk: {} MiB sparse holding {} MiB of random data in 8 extents. {} Cells: median (min–max) of the runs.\n",
        wsize / MIB,
        wdata / MIB,
        Hosts::describe(m.hosts.as_ref()),
    )?;
    if has("writer") {
        writeln!(
            o,
            "### ferry from a live source (`serve --present`, `pull --precopy`, `switchover`)\n"
        )?;
        writeln!(o, "*postcopy*: switched over as soon as the pull is up (everything post-copied); *precopy*: switched once the destination lacked at most max(2 s of writes, 4 MiB), or at {} s. The destination's NBD connection is opened when the pull starts (as a destination QEMU started with `-incoming` opens its disk; the export holds its requests until the switchover). At the switch the writer stops (freeze); at once `ferry switchover` is started (as a hook would) and a 4 KiB read is sent on that connection (the VM resumed at the destination): *downtime* is freeze to that read's answer (the read is of the writer's last block in precopy, of a far data block in postcopy; *remote* counts reads fetched on demand, i.e. across the link). The writer then writes on at the destination. *Complete*: pull start to ferry's `complete` (every chunk at the destination; verification passed in every run). *Wire*: IP bytes both ways on the link, pull start to complete. *Writes during pre-copy*: the writer at the source from pull start to the freeze, against the writer alone on a presented source without a pull ({base_secs:.0} s); *vs alone*: the change of the mean and median latency.\n", a.precopy_cap_secs)?;
        writeln!(o, "| writer | mode | switch at, s | absent at the switch, MiB | fetched before it, MiB | downtime, ms | ferry switchover, ms | remote reads | complete, s | × idle postcopy | wire, MiB | writes p50 / p99, ms | mean vs alone | MB/s achieved |")?;
        writeln!(
            o,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for ((rate, mode), rs) in cells.iter() {
            let col = |f: &dyn Fn(&FerryRun) -> f64, d: usize| {
                mmm(&rs.iter().map(f).collect::<Vec<_>>(), d)
            };
            let idle = cells
                .iter()
                .find(|c| c.0 == (0, "postcopy"))
                .map(|c| med(&c.1.iter().map(|r| r.t_complete).collect::<Vec<_>>()));
            let tc = med(&rs.iter().map(|r| r.t_complete).collect::<Vec<_>>());
            let ratio = idle.map(|i| format!("{:.2}", tc / i)).unwrap_or("–".into());
            let (wcol, slow) = if *rate > 0 && *mode == "precopy" {
                let p50 = med(&rs
                    .iter()
                    .map(|r| r.precopy_writes.p50_ms)
                    .collect::<Vec<_>>());
                let p99 = med(&rs
                    .iter()
                    .map(|r| r.precopy_writes.p99_ms)
                    .collect::<Vec<_>>());
                let mean = med(&rs
                    .iter()
                    .map(|r| r.precopy_writes.mean_ms)
                    .collect::<Vec<_>>());
                (
                    format!("{p50:.2} / {p99:.2}"),
                    vs_alone(base_f, *rate, mean, p50),
                )
            } else {
                ("–".into(), "–".into())
            };
            let mbs = if *rate > 0 && *mode == "precopy" {
                col(&|r| r.precopy_writes.mb_s, 1)
            } else {
                "–".into()
            };
            writeln!(
                o,
                "| {} | {mode} | {} | {} | {} | {} | {} | {}/{} | {} | {ratio} | {} | {wcol} | {slow} | {mbs} |",
                rate_name(*rate),
                col(&|r| r.t_switch, 1),
                col(&|r| r.absent_at_switch as f64 / MIB as f64, 0),
                col(&|r| r.fetched_before_switch as f64 / MIB as f64, 0),
                col(&|r| r.downtime_ms, 0),
                col(&|r| r.switchover_ms, 1),
                rs.iter().filter(|r| r.first_read_remote).count(),
                rs.len(),
                col(&|r| r.t_complete, 1),
                col(&|r| r.wire_bytes as f64 / MIB as f64, 0),
            )?;
        }
        let capped: usize = cells
            .iter()
            .map(|c| c.1.iter().filter(|r| r.capped).count())
            .sum();
        writeln!(o, "\nPre-copy runs stopped at the cap rather than converged: {capped}. Writer alone (no pull), mean latency: {}.\n",
            base_f.iter().map(|(r, v)| format!("{} {:.2} ms (p50 {:.2}, p99 {:.2}, {:.1} MB/s)", rate_name(*r),
                med(&v.iter().map(|s| s.mean_ms).collect::<Vec<_>>()),
                med(&v.iter().map(|s| s.p50_ms).collect::<Vec<_>>()),
                med(&v.iter().map(|s| s.p99_ms).collect::<Vec<_>>()),
                med(&v.iter().map(|s| s.mb_s).collect::<Vec<_>>()))).collect::<Vec<_>>().join("; "))?;
    }
    if has("downtime") {
        writeln!(o, "### Switchover downtime by disk size\n")?;
        writeln!(o, "Sparse disks holding {} MiB of random data in 8 extents spread over the disk (the last at its end); the writer at 4 MB/s; switched over after {} s of pre-copy; the first read is of a data block in the last extent (not yet copied). Target: 3 RTT ({:.0} ms) plus the final list's send time, the same on both sizes. At the freeze the `ferry switchover` command is started (a process, as a hook would) and a 4 KiB read is sent on an NBD connection opened when the pull started (the export holds it until the switchover). Each step from the freeze: the command returned; the read answered (downtime).\n", ddata / MIB, fixed.as_secs(), 3.0 * link.rtt_ms)?;
        writeln!(o, "| disk | downtime, ms | ferry switchover, ms | `ferry switchover` returned, ms | remote reads | generations before the switch | wire to the switch, MiB |")?;
        writeln!(o, "|---|---|---|---|---|---|---|")?;
        for (size, rs) in down.iter() {
            let col = |f: &dyn Fn(&FerryRun) -> f64, d: usize| {
                mmm(&rs.iter().map(f).collect::<Vec<_>>(), d)
            };
            writeln!(
                o,
                "| {} GiB | {} | {} | {} | {}/{} | {} | {} |",
                size / GIB,
                col(&|r| r.downtime_ms, 0),
                col(&|r| r.switchover_ms, 1),
                col(&|r| r.reply_ms, 0),
                rs.iter().filter(|r| r.first_read_remote).count(),
                rs.len(),
                col(&|r| r.generations as f64, 0),
                col(&|r| r.wire_bytes as f64 / MIB as f64, 0),
            )?;
        }
        writeln!(o)?;
    }
    if has("mirror") {
        writeln!(o, "### QEMU drive-mirror beside it\n")?;
        writeln!(o, "qemu-storage-daemon ({}) at the source (the image, QMP, the writer on its NBD export) and at the target (an NBD export of a sparse image, reached across the link); `blockdev-mirror sync=full` (background copy mode) to an `nbd` node; *ready* when `query-block-jobs` says ready, polled every 100 ms; writers' runs bounded at {:.0} s (3x the first idle run's time, at least 30 s). Bytes: the link, job start to ready (or the bound). Writes: the writer during that time, against the writer alone on the source daemon.\n",
            super::tool_version("qemu-storage-daemon", "--version"), mirror_cap.as_secs_f64())?;
        writeln!(o, "| writer | ready after, s | ready runs | wire, MiB | writes p50 / p99, ms | mean vs alone | MB/s achieved |")?;
        writeln!(o, "|---|---|---|---|---|---|---|")?;
        for (rate, rs) in mirror.iter() {
            let col = |f: &dyn Fn(&MirrorRun) -> f64, d: usize| {
                mmm(&rs.iter().map(f).collect::<Vec<_>>(), d)
            };
            let ready = rs.iter().filter(|r| r.ready).count();
            let t = if ready == rs.len() {
                col(&|r| r.t_ready, 1)
            } else {
                format!(
                    "not ready after {} ({ready} of {} ready)",
                    col(&|r| r.t_ready, 0),
                    rs.len()
                )
            };
            let (w, slow, mbs) = if *rate > 0 {
                let mean = med(&rs.iter().map(|r| r.writes.mean_ms).collect::<Vec<_>>());
                let p50 = med(&rs.iter().map(|r| r.writes.p50_ms).collect::<Vec<_>>());
                (
                    format!(
                        "{p50:.2} / {:.2}",
                        med(&rs.iter().map(|r| r.writes.p99_ms).collect::<Vec<_>>())
                    ),
                    vs_alone(base_q, *rate, mean, p50),
                    col(&|r| r.writes.mb_s, 1),
                )
            } else {
                ("–".into(), "–".into(), "–".into())
            };
            writeln!(
                o,
                "| {} | {t} | {ready}/{} | {} | {w} | {slow} | {mbs} |",
                rate_name(*rate),
                rs.len(),
                col(&|r| r.wire_bytes as f64 / MIB as f64, 0),
            )?;
        }
        writeln!(o)?;
    }
    let report = a
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    let section = if a.quick && a.section == super::QUICK_SECTION {
        "live, quick".to_string()
    } else if a.section.is_empty() {
        "live".to_string()
    } else {
        a.section.clone()
    };
    write_section(&report, &section, &o)?;
    let fr = |r: &FerryRun| {
        json!({
            "switch_s": r.t_switch, "downtime_ms": r.downtime_ms, "switchover_ms": r.switchover_ms,
            "first_read_ms": r.first_read_ms, "reply_ms": r.reply_ms, "connected_ms": r.connected_ms, "first_read_remote": r.first_read_remote,
            "complete_s": r.t_complete, "wire_bytes": r.wire_bytes, "ferry_wire_bytes": r.ferry_wire_bytes,
            "capped": r.capped, "absent_at_switch_bytes": r.absent_at_switch, "fetched_before_switch_bytes": r.fetched_before_switch, "generations": r.generations, "note": r.note,
            "precopy_writes": ws(&r.precopy_writes),
        })
    };
    let raw = json!({
        "started": started,
        "runs": runs,
        "cells": cells.iter().map(|((rate, mode), rs)| json!({
            "rate": rate, "mode": mode, "runs": rs.iter().map(fr).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "downtime": down.iter().map(|(s, rs)| json!({
            "size": s, "runs": rs.iter().map(fr).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "baseline_ferry": base_f.iter().map(|(r, v)| json!({ "rate": r, "runs": v.iter().map(ws).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "baseline_qsd": base_q.iter().map(|(r, v)| json!({ "rate": r, "runs": v.iter().map(ws).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "mirror": mirror.iter().map(|(rate, rs)| json!({ "rate": rate, "runs": rs.iter().map(|r| json!({
            "ready": r.ready, "ready_s": r.t_ready, "wire_bytes": r.wire_bytes, "writes": ws(&r.writes) })).collect::<Vec<_>>() })).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("live.json"), serde_json::to_string_pretty(&raw)?)?;
    eprintln!("bench: wrote the {section} section of {}", report.display());
    Ok(())
}
/// The options of `--live` given other than their defaults, as typed.
fn command_options(a: &BenchArgs, runs: usize) -> String {
    let mut o = String::new();
    if a.runs.is_some() {
        o += &format!(" --runs {runs}");
    }
    if a.writer_rates != [0, 4, 16] {
        let r: Vec<String> = a.writer_rates.iter().map(u64::to_string).collect();
        o += &format!(" --writer-rates {}", r.join(","));
    }
    if a.live_parts != ["writer", "downtime", "mirror"] {
        o += &format!(" --live-parts {}", a.live_parts.join(","));
    }
    if a.precopy_cap_secs != 120 {
        o += &format!(" --precopy-cap-secs {}", a.precopy_cap_secs);
    }
    if a.mirror_cap_secs != 0 {
        o += &format!(" --mirror-cap-secs {}", a.mirror_cap_secs);
    }
    if a.live_shared_cpus {
        o += " --live-shared-cpus";
    }
    if !a.section.is_empty() && a.section != super::QUICK_SECTION {
        o += &format!(" --section {:?}", a.section);
    }
    o
}

/// "mean +x% (a vs b ms), p50 +y%" against the writer alone at `rate`.
fn vs_alone(base: &[(u64, Vec<WriteStats>)], rate: u64, mean: f64, p50: f64) -> String {
    let Some((_, v)) = base.iter().find(|b| b.0 == rate) else {
        return "–".into();
    };
    let m = med(&v.iter().map(|s| s.mean_ms).collect::<Vec<_>>());
    let p = med(&v.iter().map(|s| s.p50_ms).collect::<Vec<_>>());
    format!(
        "mean {:+.0}% ({mean:.2} vs {m:.2} ms), p50 {:+.0}%",
        (mean / m - 1.0) * 100.0,
        (p50 / p - 1.0) * 100.0
    )
}

fn ws(s: &WriteStats) -> Value {
    json!({ "n": s.n, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "mean_ms": s.mean_ms, "mb_s": s.mb_s })
}

fn push<T>(v: &mut Vec<(u64, Vec<T>)>, k: u64, x: T) {
    match v.iter_mut().find(|e| e.0 == k) {
        Some(e) => e.1.push(x),
        None => v.push((k, vec![x])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets are 64 KiB aligned, inside the disk, about 80% in the
    /// hot tenth, and the same for the same seed.
    #[test]
    fn the_writer_hits_its_hot_set_four_times_in_five() {
        let spec = WriterSpec::new(4_000_000, GIB, 7);
        assert_eq!(
            spec.hot.end - spec.hot.start,
            GIB / 10 / WRITE_BYTES * WRITE_BYTES
        );
        let offs: Vec<u64> = Offsets::new(&spec).take(20_000).collect();
        assert!(offs
            .iter()
            .all(|o| o % WRITE_BYTES == 0 && o + WRITE_BYTES <= GIB));
        let hot = offs.iter().filter(|o| spec.hot.contains(o)).count() as f64 / offs.len() as f64;
        // 80% aimed there, plus the 20% elsewhere landing in it a tenth
        // of the time: 82%.
        assert!((0.80..0.84).contains(&hot), "{hot}");
        let again: Vec<u64> = Offsets::new(&spec).take(20_000).collect();
        assert_eq!(offs, again);
        let other: Vec<u64> = Offsets::new(&WriterSpec::new(4_000_000, GIB, 9))
            .take(100)
            .collect();
        assert_ne!(offs[..100], other[..]);
    }

    /// 4 MB/s of 64 KiB writes is one write every 16.4 ms.
    #[test]
    fn the_writer_paces_its_writes_by_its_rate() {
        let i = WriterSpec::new(4_000_000, GIB, 1).interval();
        assert!((i.as_secs_f64() - 0.016384).abs() < 1e-6, "{i:?}");
        let i = WriterSpec::new(16_000_000, GIB, 1).interval();
        assert!((i.as_secs_f64() - 0.004096).abs() < 1e-6, "{i:?}");
    }

    /// Window statistics take only the writes started in the window, and
    /// throughput is their bytes over the window's length.
    #[test]
    fn write_stats_cover_their_window_only() {
        let log = WriterLog {
            writes: vec![(0.5, 1.0), (1.0, 2.0), (1.5, 3.0), (2.5, 100.0)],
            last_offset: None,
            ran_s: 3.0,
        };
        let s = log.stats(1.0, 2.0);
        assert_eq!(s.n, 2);
        // Nearest rank: the upper of the two middle ones.
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!(s.mean_ms, 2.5);
        assert!((s.mb_s - 2.0 * WRITE_BYTES as f64 / 1e6).abs() < 1e-9);
        assert_eq!(log.stats(3.0, 4.0).n, 0);
    }
}
