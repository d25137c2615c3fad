//! Child processes for the smoke test and the benchmarks: spawned with
//! their output in a log file, killed by their own PID and reaped when
//! dropped, with their CPU time read from `/proc/PID/stat` while they run.
//! Also the helpers that drive `ferry` (keygen, serve, pull, status).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, killed (SIGKILL, by its PID) and reaped on drop.
pub(crate) struct Proc {
    child: Child,
    /// Its combined stdout/stderr.
    pub(crate) log: PathBuf,
    /// What it is, for messages.
    pub(crate) what: String,
    /// CPU seconds seen at the last sample.
    cpu_last: f64,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr into `log`.
    pub(crate) fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {what}: {cmd:?}"))?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
            what: what.to_string(),
            cpu_last: 0.0,
        })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if it has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            bail!("{} exited ({st}): {}", self.what, tail(&self.log_text()));
        }
        Ok(())
    }

    /// Samples its CPU time (user + system, seconds); returns the latest
    /// value seen (the last sample once it has exited).
    pub(crate) fn cpu_seconds(&mut self) -> f64 {
        if let Some(c) = cpu_seconds(self.child.id()) {
            self.cpu_last = c;
        }
        self.cpu_last
    }

    /// Its exit status, if it has exited.
    pub(crate) fn try_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `timeout` for `needle` to appear in its log.
    pub(crate) fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            self.check_running()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "timed out waiting for {needle:?} from {}: {}",
            self.what,
            tail(&self.log_text())
        )
    }

    /// Stops it (SIGTERM, then SIGKILL after 3 s) and reaps it; returns
    /// its final CPU seconds.
    pub(crate) fn stop(mut self) -> f64 {
        let cpu = self.cpu_seconds();
        let _ = super::sys::signal(self.child.id(), libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return cpu;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cpu
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log, for error messages.
pub(crate) fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// User + system CPU seconds of a process, from /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Runs a command to completion, failing with its output.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Identities of both ends of a ferry migration.
pub(crate) struct FerryIds {
    /// Source identity directory.
    pub(crate) src_dir: PathBuf,
    /// Destination identity directory.
    pub(crate) dst_dir: PathBuf,
    /// Source fingerprint.
    pub(crate) src_fp: String,
    /// Destination fingerprint.
    pub(crate) dst_fp: String,
}

impl FerryIds {
    /// Makes (or reuses) both identities under `dir`.
    pub(crate) fn make(bin: &Path, dir: &Path) -> Result<FerryIds> {
        let src_dir = dir.join("src-id");
        let dst_dir = dir.join("dst-id");
        let fp = |d: &Path| -> Result<String> {
            let cmd = if d.join("cert.der").exists() {
                output(Command::new(bin).args(["fingerprint", "--identity"]).arg(d))?
            } else {
                output(Command::new(bin).args(["keygen", "--identity"]).arg(d))?
            };
            Ok(cmd.trim().to_string())
        };
        Ok(FerryIds {
            src_fp: fp(&src_dir)?,
            dst_fp: fp(&dst_dir)?,
            src_dir,
            dst_dir,
        })
    }
}

/// `ferry status --json`.
pub(crate) fn ferry_status(bin: &Path, ctl: &Path) -> Result<serde_json::Value> {
    let s = output(
        Command::new(bin)
            .args(["status", "--json", "--control"])
            .arg(ctl),
    )?;
    serde_json::from_str(&s).context("ferry status is not JSON")
}

/// Polls `ferry status` until the pull is complete and verified (or fails,
/// or `timeout` passes); samples the CPU of `procs` meanwhile. Returns the
/// final status and when the copy became complete (before verification).
pub(crate) fn wait_ferry_complete(
    bin: &Path,
    ctl: &Path,
    timeout: Duration,
    procs: &mut [&mut Proc],
) -> Result<(serde_json::Value, Instant)> {
    let t0 = Instant::now();
    let mut complete_at = None;
    loop {
        for p in procs.iter_mut() {
            p.cpu_seconds();
            p.check_running()?;
        }
        let s = ferry_status(bin, ctl)?;
        if s["phase"] == "error" {
            bail!("the pull failed: {}", s["error"]);
        }
        if s["phase"] == "complete" {
            let at = *complete_at.get_or_insert_with(Instant::now);
            if s["verified"] != "pending" && s["verified"] != "running" {
                if s["verified"] != "ok" {
                    bail!("verification failed: {s}");
                }
                return Ok((s, at));
            }
        }
        if t0.elapsed() > timeout {
            bail!("the pull did not complete in {timeout:?}: {s}");
        }
        std::thread::sleep(Duration::from_millis(if complete_at.is_some() {
            20
        } else {
            50
        }));
    }
}

/// Writes a file of `bytes` pseudo-random (incompressible, non-zero)
/// bytes, fast and reproducible from `seed`.
pub(crate) fn write_random_file(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Whether two files have the same contents (read in 1 MiB pieces).
pub(crate) fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }
}

/// A free UDP port on loopback (racy, but only our own processes bind).
pub(crate) fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The ferry binary: `$FERRY_BIN`, else `$CARGO_TARGET_DIR/<profile>/ferry`
/// after building it.
pub(crate) fn ferry_bin(release: bool) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = crate::setup::workspace_root();
    let mut cmd = Command::new(crate::setup::cargo());
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", "ferry", "--bin", "ferry"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "building ferry ({})",
        if release { "release" } else { "debug" }
    );
    crate::setup::run(&mut cmd)?;
    Ok(crate::setup::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("ferry"))
}
