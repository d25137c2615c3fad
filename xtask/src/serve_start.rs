//! `cargo xtask serve-start`: how long `ferry serve` (release build) takes
//! from its start to its "exporting" line (READY=1) on a large sparse image
//! whose data is not in the page cache, and how many bytes it read first.
//! The switchover path must do no whole-disk work (issue 26, item 1).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::stats;
use crate::wan::procs::{self, Proc};

const GIB: u64 = 1 << 30;
const EXTENT: u64 = 64 << 20;

#[derive(clap::Args)]
pub(crate) struct ServeStartArgs {
    /// Image size in GiB (sparse).
    #[arg(long, default_value_t = 64)]
    size_gib: u64,
    /// GiB of data in it, in 64 MiB extents spread evenly.
    #[arg(long, default_value_t = 8)]
    data_gib: u64,
    /// Starts measured for each case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where the image is made (kept for the next invocation with the same
    /// sizes).
    #[arg(long, default_value = "target/serve-start")]
    dir: PathBuf,
}

/// One start: seconds to ready, bytes the process read by then.
struct Start {
    secs: f64,
    read_bytes: u64,
}

pub(crate) fn run(a: &ServeStartArgs) -> Result<()> {
    if a.data_gib > a.size_gib || a.size_gib == 0 || a.runs == 0 {
        bail!("need 0 < --data-gib <= --size-gib and --runs > 0");
    }
    let bin = procs::ferry_bin(true)?;
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let img = dir.join(format!("disk-{}g-{}g.img", a.size_gib, a.data_gib));
    make_image(&img, a.size_gib * GIB, a.data_gib * GIB)?;
    let src_id = dir.join("src-id");
    let dst_id = dir.join("dst-id");
    for d in [&src_id, &dst_id] {
        if !d.exists() {
            procs::output(Command::new(&bin).args(["keygen", "--identity"]).arg(d))?;
        }
    }
    let dst_fp = procs::output(
        Command::new(&bin)
            .args(["fingerprint", "--identity"])
            .arg(&dst_id),
    )?
    .trim()
    .to_string();
    let cache = PathBuf::from(format!("{}.ferry-manifest", img.display()));
    let sidecar = PathBuf::from(format!("{}.ferry-source", cache.display()));
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for run in 0..a.runs {
        // Cold: no hash cache, no source id yet, pages dropped.
        for p in [&cache, &sidecar] {
            let _ = std::fs::remove_file(p);
        }
        drop_pages(&img)?;
        cold.push(start(&bin, &img, &src_id, &dst_fp, &dir, run, "cold")?);
        // Again with what the first start left (id, any hashes), pages
        // dropped again.
        drop_pages(&img)?;
        warm.push(start(&bin, &img, &src_id, &dst_fp, &dir, run, "again")?);
    }
    let report = |name: &str, v: &[Start]| {
        let secs: Vec<f64> = v.iter().map(|s| s.secs).collect();
        let read: Vec<f64> = v.iter().map(|s| s.read_bytes as f64).collect();
        println!(
            "{name}: ready after {} s (median, min–max of {}), read {} bytes before ready",
            stats::mmm(&secs, 3),
            v.len(),
            stats::mmm(&read, 0)
        );
    };
    println!(
        "ferry serve start to ready, {} GiB sparse image with {} GiB of data in 64 MiB extents, page cache dropped before each start:",
        a.size_gib, a.data_gib
    );
    report("first start (no hash cache)", &cold);
    report("second start", &warm);
    Ok(())
}

fn start(
    bin: &Path,
    img: &Path,
    id: &Path,
    peer: &str,
    dir: &Path,
    run: usize,
    case: &str,
) -> Result<Start> {
    let port = procs::free_udp_port()?;
    let t0 = Instant::now();
    let mut p = Proc::spawn(
        "ferry serve",
        Command::new(bin)
            .arg("serve")
            .arg("--disk")
            .arg(img)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--identity")
            .arg(id)
            .args(["--trust-peer", peer]),
        &dir.join(format!("serve-{case}-{run}.log")),
    )?;
    p.wait_for_log("ferry serve: exporting", Duration::from_secs(600))?;
    let secs = t0.elapsed().as_secs_f64();
    let read_bytes = rchar(p.pid())?;
    p.stop();
    Ok(Start { secs, read_bytes })
}

/// Bytes read by `pid` so far (`rchar` of /proc/PID/io: every read call,
/// page cache or not).
fn rchar(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .context("no rchar in /proc/PID/io")
}

fn drop_pages(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("dropping {} from the page cache", path.display()))?;
    Ok(())
}

/// The image, made once: `data` bytes of pseudo-random data in 64 MiB
/// extents spread evenly over `size` bytes, the rest holes.
fn make_image(path: &Path, size: u64, data: u64) -> Result<()> {
    let done = PathBuf::from(format!("{}.made", path.display()));
    if done.exists() {
        return Ok(());
    }
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let extents = data.div_ceil(EXTENT);
    let stride = if extents == 0 { size } else { size / extents };
    let mut buf = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    eprintln!("making {} ({extents} extents of 64 MiB)", path.display());
    for e in 0..extents {
        let start = e * stride;
        let mut off = 0;
        while off < EXTENT {
            for w in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&buf, start + off)?;
            off += buf.len() as u64;
        }
    }
    f.sync_all()?;
    std::fs::write(&done, b"")?;
    Ok(())
}
