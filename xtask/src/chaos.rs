//! `cargo xtask chaos`: fault injection against whole migrations. Each
//! round is one migration of a fresh destination over the emulated WAN
//! (a UDP relay on loopback) while a guest workload writes with flushes
//! (qemu-io, a real NBD client) and reads; faults are drawn at random:
//! SIGKILL of `ferry pull` (also in its first milliseconds), SIGKILL of
//! `ferry serve`, a link cut, a full destination filesystem. After every
//! fault the flushed writes are read back and checked; at the end of the
//! round the copy must complete with `verified ok` and the destination
//! image must equal the source plus the flushed writes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::bench::nbd::NbdClient;
use crate::setup::{cargo, ensure as ensure_needs, run, target_dir, tool, workspace_root, Need};

/// What chaos needs besides ferry: the guest's NBD client.
const NEEDS: &[Need] = &[
    tool("qemu-io", "qemu-utils"),
    tool("mount", "mount"),
    tool("fallocate", "util-linux"),
];

/// The guest workload writes inside slots of this size.
const SLOT: u64 = 64 * 1024;

/// The guest writes whole sectors of this size (at most one 4 KiB block
/// partly, so ferry's partial-block path still runs). qemu-io pads a
/// smaller or unaligned write to ferry's advertised minimum block size
/// (512) by reading the sectors around it first, and qemu's block layer
/// ignores a failure of that read (`bdrv_co_pwritev_part` discards the
/// result of `bdrv_padding_rmw_read`): while the destination is full,
/// ferry rightly fails reads of data it cannot store, and qemu then
/// writes its unread (zeroed) padding over the bytes next to the write
/// and reports the write done. A real guest writes whole sectors, so
/// ferry only ever sees aligned requests; the workload does the same.
const SECTOR: u64 = 512;

/// A fault the harness injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Fault {
    /// SIGKILL `ferry pull` at a random moment (also within its first ms).
    KillPull,
    /// SIGKILL `ferry serve`, restart it after 1-3 s.
    KillServe,
    /// Cut the link both ways.
    Cut,
    /// Fill the destination filesystem, then free it again.
    Fill,
}

/// Options of `cargo xtask chaos`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ChaosArgs {
    /// Migrations to run, each with 1-3 faults.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Seed of the fault schedule (printed; a failing run is replayed with it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Size of the migrated disk in MiB (half random data, half zeros).
    #[arg(long, default_value_t = 32)]
    size_mib: u64,
    /// Shortest link cut, seconds.
    #[arg(long = "cut-min-secs", alias = "cut-min-s", default_value_t = 10)]
    cut_min_s: u64,
    /// Longest link cut, seconds.
    #[arg(long = "cut-max-secs", alias = "cut-max-s", default_value_t = 60)]
    cut_max_s: u64,
    /// Background copy rate while faults are injected (bytes/s), so that
    /// the copy spans them; lifted when the round's faults are done.
    #[arg(long, default_value_t = 2 << 20)]
    rate: u64,
    /// Faults to draw from.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Fault::KillPull, Fault::KillServe, Fault::Cut, Fault::Fill])]
    faults: Vec<Fault>,
    /// Work directory (default: target/chaos); the destination is a tmpfs
    /// mounted inside it for the fill fault.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the summary as JSON here too.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Give up on a round after this many seconds.
    #[arg(
        long = "round-timeout-secs",
        alias = "round-timeout-s",
        default_value_t = 600
    )]
    round_timeout_s: u64,
}

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// One guest write as the report of a bad slot lists it: (batch, offset
/// in the slot, length, pattern, acknowledged).
type Written = (u64, u64, u64, u8, bool);

/// The guest's view: what every slot it wrote must hold.
struct Model {
    source: File,
    /// Every content each written slot may hold: one version while every
    /// write to it was acknowledged; a write cut off by a fault (never
    /// acknowledged) may or may not have landed, block by block, so it
    /// adds the versions with it applied.
    slots: BTreeMap<u64, Vec<Vec<u8>>>,
    flushed_writes: u64,
    failed_writes: u64,
    /// Every write to each slot, in order, for the report of a slot that
    /// does not match: (batch, offset in the slot, length, pattern,
    /// acknowledged).
    history: BTreeMap<u64, Vec<Written>>,
    /// Batches sent so far.
    batches: u64,
}

impl Model {
    fn slot_mut(&mut self, slot: u64) -> Result<&mut Vec<Vec<u8>>> {
        if !self.slots.contains_key(&slot) {
            let mut b = vec![0u8; SLOT as usize];
            self.source.read_exact_at(&mut b, slot * SLOT)?;
            self.slots.insert(slot, vec![b]);
        }
        Ok(self.slots.get_mut(&slot).expect("inserted"))
    }

    /// Records a write: acknowledged, it is in every version; cut off,
    /// each version is kept beside a copy with the write applied.
    fn record(&mut self, off: u64, len: u64, pat: u8, acknowledged: bool) -> Result<()> {
        let slot = off / SLOT;
        let a = (off - slot * SLOT) as usize;
        let batch = self.batches;
        self.history
            .entry(slot)
            .or_default()
            .push((batch, a as u64, len, pat, acknowledged));
        let versions = self.slot_mut(slot)?;
        if acknowledged {
            for v in versions.iter_mut() {
                v[a..a + len as usize].fill(pat);
            }
        } else {
            let mut more: Vec<Vec<u8>> = versions.clone();
            for v in more.iter_mut() {
                v[a..a + len as usize].fill(pat);
            }
            versions.extend(more);
            versions.sort();
            versions.dedup();
        }
        Ok(())
    }
}

/// Whether `got` is a possible content of a slot: every 4 KiB block equal
/// to that block of one of the versions (a write lands block by block).
fn matches(got: &[u8], versions: &[Vec<u8>]) -> bool {
    got.chunks(4096).enumerate().all(|(i, b)| {
        versions
            .iter()
            .any(|v| &v[i * 4096..i * 4096 + b.len()] == b)
    })
}

/// Describes `b` as runs of what its bytes are: the source's bytes
/// (`src`), zeros that are not the source's, or a guest pattern byte.
fn runs(b: &[u8], src: &[u8]) -> String {
    let label = |j: usize| -> String {
        if b[j] == src[j] {
            "src".into()
        } else if b[j] == 0 {
            "zero".into()
        } else {
            format!("pat {}", b[j])
        }
    };
    let mut out = Vec::new();
    let mut start = 0;
    for j in 1..=b.len() {
        if j == b.len() || label(j) != label(start) {
            out.push(format!("{start}..{j} {}", label(start)));
            start = j;
        }
    }
    out.join(", ")
}

/// Explains, block by block, why `got` is no possible content of the slot:
/// what was read, what each version holds there, and the slot's writes.
fn explain(slot: u64, got: &[u8], versions: &[Vec<u8>], src: &[u8], history: &[Written]) -> String {
    let mut out = format!("slot {slot} ({} versions):\n", versions.len());
    for (i, b) in got.chunks(4096).enumerate() {
        let r = i * 4096..i * 4096 + b.len();
        if versions.iter().any(|v| &v[r.clone()] == b) {
            continue;
        }
        out += &format!(
            "  block {i} (slot bytes {}..{}): read [{}]\n",
            r.start,
            r.end,
            runs(b, &src[r.clone()])
        );
        for (k, v) in versions.iter().enumerate() {
            let first = v[r.clone()].iter().zip(b).position(|(x, y)| x != y);
            out += &format!(
                "    version {k}: first differs at +{} [{}]\n",
                first.unwrap_or(0),
                runs(&v[r.clone()], &src[r.clone()])
            );
        }
    }
    out += "  writes (batch, offset in slot, length, pattern, acknowledged):\n";
    for w in history {
        out += &format!("    {w:?}\n");
    }
    out
}

/// Counters of the whole run.
#[derive(Default, Debug)]
struct Tally {
    rounds: u64,
    faults: BTreeMap<String, u64>,
    checks: u64,
    lost_flushed_writes: u64,
    flushed_writes: u64,
    failed_writes: u64,
    identical_images: u64,
    verified_ok: u64,
    failures: Vec<String>,
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Rig {
    bin: PathBuf,
    dir: PathBuf,
    dst_dir: PathBuf,
    src: PathBuf,
    src_fp: String,
    dst_fp: String,
    serve_port: u16,
    relay: crate::wan::relay::Relay,
    rate: u64,
}

impl Rig {
    fn ferry(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("RUST_LOG", "info").stdin(Stdio::null());
        c
    }
    fn disk(&self) -> PathBuf {
        self.dst_dir.join("disk.img")
    }
    fn sock(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    fn ctl(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    fn spawn(&self, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let f = File::options().create(true).append(true).open(&log)?;
        let child = cmd
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("cannot start ferry")?;
        Ok(Proc { child, log })
    }

    fn serve(&self) -> Result<Proc> {
        let mut c = self.ferry();
        c.args(["serve", "--disk"])
            .arg(&self.src)
            .args(["--listen", &format!("127.0.0.1:{}", self.serve_port)])
            .arg("--identity")
            .arg(self.dir.join("src-id"))
            .args(["--trust-peer", &self.dst_fp]);
        let p = self.spawn(c, self.dir.join("serve.log"))?;
        wait_until(Duration::from_secs(120), || {
            Ok(std::fs::read_to_string(&p.log)?
                .matches("ferry serve: exporting")
                .count()
                > 0)
        })
        .context("ferry serve did not start")?;
        Ok(p)
    }

    fn pull(&self) -> Result<Proc> {
        let mut c = self.ferry();
        c.args(["pull", "--source", &self.relay.listen.to_string(), "--disk"])
            .arg(self.disk())
            .arg("--nbd")
            .arg(format!("unix:{}", self.sock().display()))
            .arg("--control")
            .arg(self.ctl())
            .arg("--identity")
            .arg(self.dir.join("dst-id"))
            .args(["--trust-peer", &self.src_fp])
            .args(["--rate", &self.rate.to_string()])
            .args(["--link-mbit", "200", "--link-rtt-ms", "20"]);
        self.spawn(c, self.dir.join("pull.log"))
    }

    fn status(&self) -> Result<serde_json::Value> {
        let out = self
            .ferry()
            .args(["status", "--json", "--control"])
            .arg(self.ctl())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("status: {text}"))
    }

    /// Waits until the pull answers its control socket and serves NBD.
    fn wait_serving(&self, pull: &mut Proc) -> Result<()> {
        wait_until(Duration::from_secs(120), || {
            if !pull.running() {
                bail!(
                    "ferry pull exited: {}",
                    tail(&std::fs::read_to_string(&pull.log).unwrap_or_default())
                );
            }
            Ok(self.status().is_ok()
                && NbdClient::connect(&self.sock(), "ferry", Duration::from_secs(5)).is_ok())
        })
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One batch of guest writes through qemu-io, ending with a flush when
/// `flush`. Returns whether qemu-io reported every command done, and its
/// words. A write acknowledged without a flush must survive a kill of
/// `ferry pull` too: the host's page cache holds it, and ferry adopts such
/// writes when it restarts on the same boot.
fn guest_batch(
    sock: &Path,
    writes: &[(u64, u64, u8)],
    flush: bool,
    timeout: Duration,
) -> Result<(bool, String)> {
    let mut c = Command::new("qemu-io");
    c.arg("--image-opts").arg(format!(
        "driver=nbd,server.type=unix,server.path={},export=ferry",
        sock.display()
    ));
    for (off, len, pat) in writes {
        c.args(["-c", &format!("write -P {pat} {off} {len}")]);
    }
    if flush {
        c.args(["-c", "flush"]);
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run qemu-io")?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            let out = child.wait_with_output()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let wrote = text.matches("wrote ").count();
            let ok = st.success() && wrote == writes.len() && !text.contains("failed");
            return Ok((ok, text));
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((false, format!("qemu-io gave no answer in {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest: writes (whole sectors, many not whole 4 KiB blocks; see
/// [`SECTOR`]) with flushes until told to stop; every acknowledged batch goes into the model as certain, every
/// cut-off one as a possibility (see [`Model::record`]). A slot with too
/// many possible contents is rewritten whole, which settles it.
fn guest_loop(
    sock: PathBuf,
    log: PathBuf,
    model: Arc<Mutex<Model>>,
    gate: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    slots: u64,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        let _g = gate.lock().expect("gate");
        let mut writes = Vec::new();
        {
            let m = model.lock().expect("model");
            for (&slot, versions) in m.slots.iter() {
                if versions.len() > 8 && writes.len() < 3 {
                    writes.push((slot * SLOT, SLOT, 1 + rng.below(255) as u8));
                }
            }
        }
        while writes.len() < 3 {
            writes.push(draw_write(&mut rng, slots));
        }
        let flush = rng.below(3) > 0;
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let (ok, text) = match guest_batch(&sock, &writes, flush, Duration::from_secs(300)) {
            Ok(r) => r,
            Err(e) => (false, format!("{e:#}")),
        };
        let mut m = model.lock().expect("model");
        m.batches += 1;
        if let Ok(mut f) = File::options().create(true).append(true).open(&log) {
            let _ = writeln!(
                f,
                "batch {} at {:.3} (unix s): writes {writes:?} flush {flush} ok {ok}\n{}",
                m.batches,
                t0.as_secs_f64(),
                text.trim_end()
            );
        }
        for &(off, len, pat) in &writes {
            if let Err(e) = m.record(off, len, pat, ok) {
                eprintln!("chaos: cannot read the source: {e:#}");
            }
        }
        if ok {
            m.flushed_writes += writes.len() as u64;
        } else {
            m.failed_writes += writes.len() as u64;
        }
        drop(m);
        drop(_g);
        std::thread::sleep(Duration::from_millis(rng.range(10, 200)));
    }
}

/// One guest write inside a slot: offset, length (whole sectors, from
/// one sector to the whole slot) and pattern byte (never 0).
fn draw_write(rng: &mut Rng, slots: u64) -> (u64, u64, u8) {
    let slot = rng.below(slots);
    let a = rng.below(SLOT / SECTOR) * SECTOR;
    let len = SECTOR * (1 + rng.below((SLOT - a) / SECTOR));
    (slot * SLOT + a, len, 1 + rng.below(255) as u8)
}

/// Reads every written slot back through NBD; returns (slots checked,
/// slots holding something no sequence of the guest's writes explains:
/// a flushed write lost, or garbage).
fn check_flushed(rig: &Rig, model: &Mutex<Model>) -> Result<(u64, Vec<u64>)> {
    let m = model.lock().expect("model");
    let mut nbd = NbdClient::connect(&rig.sock(), "ferry", Duration::from_secs(300))?;
    let mut buf = vec![0u8; SLOT as usize];
    let mut checked = 0;
    let mut bad = Vec::new();
    let mut src = vec![0u8; SLOT as usize];
    for (&slot, versions) in m.slots.iter() {
        nbd.read(slot * SLOT, &mut buf)
            .with_context(|| format!("reading slot {slot}"))?;
        checked += 1;
        if !matches(&buf, versions) {
            bad.push(slot);
            m.source.read_exact_at(&mut src, slot * SLOT)?;
            let history = m.history.get(&slot).map_or(&[][..], |h| &h[..]);
            eprintln!("chaos: {}", explain(slot, &buf, versions, &src, history));
        }
    }
    Ok((checked, bad))
}

fn make_source(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut rng = Rng(seed | 1);
    // Random data in the first half, in runs of 1 MiB with holes between.
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size / 2 {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&buf, off)?;
        off += 2 << 20;
    }
    f.sync_all()?;
    Ok(())
}

fn mount_tmpfs(dir: &Path, size: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!("size={size},mode=0700"))
        .arg("ferry-chaos")
        .arg(dir))
}

fn umount(dir: &Path) {
    if is_mountpoint(dir) {
        let _ = Command::new("umount").arg(dir).status();
    }
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*canon.to_string_lossy()))
    })
}

/// Takes all but about `keep` bytes of the filesystem of `dir` with
/// `filler` (the pull writes meanwhile, so a refused size is retried
/// smaller).
fn fill(dir: &Path, filler: &Path, keep: u64) -> Result<()> {
    let f = File::create(filler)?;
    let mut taken = 0u64;
    for _ in 0..64 {
        let free = free_bytes(dir)?;
        if free <= keep {
            return Ok(());
        }
        let want = (free - keep) / 2 + 1;
        match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), taken, want) {
            Ok(()) => taken += want,
            Err(rustix::io::Errno::NOSPC) => continue,
            Err(e) => bail!("cannot fill {}: {e}", dir.display()),
        }
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).context("statvfs")?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Runs the chaos rounds.
pub(crate) fn run_chaos(a: &ChaosArgs) -> Result<()> {
    ensure_needs(NEEDS)?;
    ensure!(a.rounds > 0 && !a.faults.is_empty(), "nothing to do");
    ensure!(
        a.cut_min_s <= a.cut_max_s,
        "--cut-min-secs is above --cut-max-secs"
    );
    let root_user = rustix::process::geteuid().is_root();
    if a.faults.contains(&Fault::Fill) && !root_user {
        bail!("the fill fault mounts a small tmpfs and needs root; run as root or pass --faults without fill");
    }
    let bin = match std::env::var_os("FERRY_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            eprintln!("chaos: building ferry (release)");
            run(Command::new(cargo()).current_dir(workspace_root()).args([
                "build",
                "--release",
                "-q",
                "-p",
                "ferry",
                "--bin",
                "ferry",
            ]))?;
            target_dir().join("release").join("ferry")
        }
    };
    let dir = a.dir.clone().unwrap_or_else(|| target_dir().join("chaos"));
    let dst_dir = dir.join("dst");
    umount(&dst_dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let size = a.size_mib << 20;
    ensure!(size >= 4 * SLOT, "--size-mib too small");
    // Room for the disk, its state and a little slack: the fill fault
    // takes the slack away.
    let on_tmpfs = a.faults.contains(&Fault::Fill);
    if on_tmpfs {
        mount_tmpfs(&dst_dir, size + size / 4 + (8 << 20))?;
    } else {
        std::fs::create_dir_all(&dst_dir)?;
    }
    let result = rounds(a, &bin, &dir, &dst_dir, size);
    if on_tmpfs {
        umount(&dst_dir);
    }
    let tally = result?;
    let summary = serde_json::json!({
        "rounds": tally.rounds,
        "seed": a.seed,
        "size_mib": a.size_mib,
        "faults": tally.faults,
        "checks_of_flushed_writes": tally.checks,
        "flushed_writes": tally.flushed_writes,
        "writes_cut_off_by_faults": tally.failed_writes,
        "lost_flushed_writes": tally.lost_flushed_writes,
        "identical_final_images": tally.identical_images,
        "verified_ok": tally.verified_ok,
        "failures": tally.failures,
    });
    println!("chaos summary: {}", serde_json::to_string_pretty(&summary)?);
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_string_pretty(&summary)?)?;
    }
    ensure!(
        tally.failures.is_empty()
            && tally.lost_flushed_writes == 0
            && tally.identical_images == tally.rounds
            && tally.verified_ok == tally.rounds,
        "chaos found failures (seed {}): {:?}",
        a.seed,
        tally.failures
    );
    println!(
        "chaos: {} rounds, {} faults, {} flushed writes, 0 lost, {} images identical, verified ok in every round",
        tally.rounds,
        tally.faults.values().sum::<u64>(),
        tally.flushed_writes,
        tally.identical_images
    );
    Ok(())
}

fn rounds(a: &ChaosArgs, bin: &Path, dir: &Path, dst_dir: &Path, size: u64) -> Result<Tally> {
    let src = dir.join("source.img");
    make_source(&src, size, a.seed)?;
    let keygen = |name: &str| -> Result<String> {
        let out = Command::new(bin)
            .args(["keygen", "--identity"])
            .arg(dir.join(name))
            .output()?;
        ensure!(out.status.success(), "ferry keygen failed");
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let src_fp = keygen("src-id")?;
    let dst_fp = keygen("dst-id")?;
    let free_port = || -> Result<u16> {
        Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let serve_port = free_port()?;
    let relay_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let link = crate::wan::LinkOpts {
        rate_mbit: 200.0,
        rtt_ms: 20.0,
        ..crate::wan::LinkOpts::default()
    };
    let relay = crate::wan::relay::Relay::start(
        relay_addr,
        format!("127.0.0.1:{serve_port}").parse()?,
        &link,
    )?;
    let rig = Rig {
        bin: bin.to_owned(),
        dir: dir.to_owned(),
        dst_dir: dst_dir.to_owned(),
        src: src.clone(),
        src_fp,
        dst_fp,
        serve_port,
        relay,
        rate: a.rate,
    };
    let mut rng = Rng(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut tally = Tally::default();
    let mut serve = rig.serve()?;
    for round in 0..a.rounds {
        let t0 = Instant::now();
        match one_round(a, &rig, &mut serve, &mut rng, round, &mut tally) {
            Ok(()) => {}
            Err(e) => {
                tally.failures.push(format!("round {round}: {e:#}"));
                // Keep the round's logs: the next round starts new ones.
                for name in ["pull", "guest"] {
                    let from = dir.join(format!("{name}.log"));
                    let to = dir.join(format!("{name}-round-{round}.log"));
                    if let Err(e) = std::fs::copy(&from, &to) {
                        eprintln!("chaos: cannot keep {}: {e}", from.display());
                    }
                }
            }
        }
        tally.rounds += 1;
        eprintln!(
            "chaos: round {round} done in {:.1} s ({} failures so far)",
            t0.elapsed().as_secs_f64(),
            tally.failures.len()
        );
        if !serve.running() {
            serve = rig.serve()?;
        }
    }
    Ok(tally)
}

fn one_round(
    a: &ChaosArgs,
    rig: &Rig,
    serve: &mut Proc,
    rng: &mut Rng,
    round: u32,
    tally: &mut Tally,
) -> Result<()> {
    // A fresh destination.
    for f in std::fs::read_dir(&rig.dst_dir)? {
        std::fs::remove_file(f?.path())?;
    }
    let _ = std::fs::remove_file(rig.dir.join("pull.log"));
    let _ = std::fs::remove_file(rig.dir.join("guest.log"));
    let mut pull = rig.pull()?;
    rig.wait_serving(&mut pull)?;
    let model = Arc::new(Mutex::new(Model {
        source: File::open(&rig.src)?,
        slots: BTreeMap::new(),
        flushed_writes: 0,
        failed_writes: 0,
        history: BTreeMap::new(),
        batches: 0,
    }));
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (sock, model, gate, stop) = (rig.sock(), model.clone(), gate.clone(), stop.clone());
        let log = rig.dir.join("guest.log");
        let slots = (std::fs::metadata(&rig.src)?.len()) / SLOT;
        let seed = rng.next();
        std::thread::spawn(move || guest_loop(sock, log, model, gate, stop, slots, seed))
    };
    let result = (|| -> Result<()> {
        let faults = rng.range(1, 3);
        for _ in 0..faults {
            let fault = a.faults[rng.below(a.faults.len() as u64) as usize];
            std::thread::sleep(Duration::from_millis(rng.range(100, 1500)));
            *tally.faults.entry(format!("{fault:?}")).or_default() += 1;
            inject(a, rig, serve, &mut pull, rng, fault)
                .with_context(|| format!("round {round}: {fault:?}"))?;
            rig.wait_serving(&mut pull)?;
            // Hold the guest while checking, so the check sees a settled model.
            let _g = gate.lock().expect("gate");
            let (checked, bad) = check_flushed(rig, &model)?;
            tally.checks += checked;
            if !bad.is_empty() {
                tally.lost_flushed_writes += bad.len() as u64;
                bail!("after {fault:?}: flushed writes lost in slots {bad:?}");
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = guest.join();
    result?;
    // Finish: lift the rate, wait for verification.
    let out = rig
        .ferry()
        .args(["background", "--control"])
        .arg(rig.ctl())
        .arg("rate=0")
        .output()?;
    ensure!(
        out.status.success(),
        "cannot lift the rate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(a.round_timeout_s);
    let fin = loop {
        let s = rig.status()?;
        if s["phase"] == "complete" && s["verified"] != "pending" && s["verified"] != "running" {
            break s;
        }
        ensure!(s["phase"] != "error", "the pull failed: {s}");
        ensure!(
            Instant::now() < deadline,
            "not complete in {} s: {s}",
            a.round_timeout_s
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (checked, bad) = check_flushed(rig, &model)?;
    tally.checks += checked;
    tally.lost_flushed_writes += bad.len() as u64;
    ensure!(
        bad.is_empty(),
        "at the end: flushed writes lost in slots {bad:?}"
    );
    if fin["verified"] == "ok" {
        tally.verified_ok += 1;
    } else {
        bail!("verified is {} at the end: {fin}", fin["verified"]);
    }
    // Stop the pull cleanly and compare the image with source + writes.
    let _ = Command::new("kill")
        .args(["-TERM", &pull.child.id().to_string()])
        .status();
    wait_until(Duration::from_secs(60), || Ok(!pull.running()))?;
    let m = model.lock().expect("model");
    tally.flushed_writes += m.flushed_writes;
    tally.failed_writes += m.failed_writes;
    let dst = File::open(rig.disk())?;
    let src = File::open(&rig.src)?;
    let len = src.metadata()?.len();
    ensure!(
        dst.metadata()?.len() == len,
        "the destination's size differs"
    );
    let (mut x, mut y) = (vec![0u8; SLOT as usize], vec![0u8; SLOT as usize]);
    let mut differ = Vec::new();
    for slot in 0..len / SLOT {
        dst.read_exact_at(&mut x, slot * SLOT)?;
        let ok = match m.slots.get(&slot) {
            Some(versions) => matches(&x, versions),
            None => {
                src.read_exact_at(&mut y, slot * SLOT)?;
                x == y
            }
        };
        if !ok {
            differ.push(slot);
        }
    }
    ensure!(
        differ.is_empty(),
        "the final image differs from source + writes in slots {differ:?}"
    );
    tally.identical_images += 1;
    Ok(())
}

fn inject(
    a: &ChaosArgs,
    rig: &Rig,
    serve: &mut Proc,
    pull: &mut Proc,
    rng: &mut Rng,
    fault: Fault,
) -> Result<()> {
    match fault {
        Fault::KillPull => {
            pull.kill();
            *pull = rig.pull()?;
            // One time in three, kill the new pull within its first
            // milliseconds too (while it opens or creates its files).
            if rng.below(3) == 0 {
                std::thread::sleep(Duration::from_millis(rng.below(10)));
                pull.kill();
                *pull = rig.pull()?;
            }
        }
        Fault::KillServe => {
            serve.kill();
            std::thread::sleep(Duration::from_millis(rng.range(1000, 3000)));
            *serve = rig.serve()?;
        }
        Fault::Cut => {
            let secs = rng.range(a.cut_min_s, a.cut_max_s);
            rig.relay.cut(Duration::from_secs(secs));
            std::thread::sleep(Duration::from_secs(secs));
        }
        Fault::Fill => {
            let filler = rig.dst_dir.join("filler");
            fill(&rig.dst_dir, &filler, 256 * 1024)?;
            std::thread::sleep(Duration::from_millis(rng.range(2000, 5000)));
            std::fs::remove_file(&filler).ok();
        }
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_write_may_or_may_not_have_landed_but_nothing_else() {
        let dir = std::env::temp_dir().join(format!("chaos-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        std::fs::write(&src, vec![0u8; 2 * SLOT as usize]).unwrap();
        let mut m = Model {
            source: File::open(&src).unwrap(),
            slots: BTreeMap::new(),
            flushed_writes: 0,
            failed_writes: 0,
            history: BTreeMap::new(),
            batches: 0,
        };
        m.record(100, 5000, 7, true).unwrap();
        m.record(8192, 8192, 9, false).unwrap();
        let v = &m.slots[&0];
        let mut acked = vec![0u8; SLOT as usize];
        acked[100..5100].fill(7);
        let mut landed = acked.clone();
        landed[8192..16384].fill(9);
        let mut half = acked.clone();
        half[8192..12288].fill(9);
        assert!(matches(&acked, v));
        assert!(matches(&landed, v));
        assert!(matches(&half, v), "a write lands block by block");
        // The acknowledged write lost: not a possible content.
        let mut lost = landed.clone();
        lost[100..5100].fill(0);
        assert!(!matches(&lost, v));
        // Garbage where nothing was written.
        let mut garbage = acked.clone();
        garbage[40000] = 1;
        assert!(!matches(&garbage, v));
        // A later acknowledged write covers every version.
        m.record(8192, 8192, 3, true).unwrap();
        let mut now = acked.clone();
        now[8192..16384].fill(3);
        assert!(matches(&now, &m.slots[&0]));
        assert!(!matches(&landed, &m.slots[&0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_writes_are_whole_sectors_inside_one_slot() {
        let mut rng = Rng(5);
        let (mut partial_block, mut whole_slot) = (false, false);
        for _ in 0..100_000 {
            let (off, len, pat) = draw_write(&mut rng, 10);
            assert_eq!(off % SECTOR, 0, "offset {off}");
            assert_eq!(len % SECTOR, 0, "length {len}");
            assert!(len > 0 && off / SLOT == (off + len - 1) / SLOT && off + len <= 10 * SLOT);
            assert_ne!(pat, 0);
            partial_block |= off % 4096 != 0 || len % 4096 != 0;
            whole_slot |= len == SLOT;
        }
        assert!(partial_block && whole_slot);
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let draw = |seed: u64| {
            let mut r = Rng(seed | 1);
            (0..32).map(|_| r.range(3, 9)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!(draw(7).iter().all(|v| (3..=9).contains(v)));
    }
}
