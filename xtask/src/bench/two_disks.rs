//! `cargo xtask bench --two-disks`: two disks of one VM in one `ferry
//! pull` (docs/decisions/many-disks-one-budget.md) over the emulated WAN's
//! base link (200 Mbit/s, 50 ms), with a background rate limit below the
//! link (`--two-disks-rate-mbit`, 100 by default). It measures what the
//! budget promises: the two background copies together stay under the
//! limit (their fetched bytes over time, from `ferry status`, and the
//! link's bytes), and a prober's 4 KiB reads of absent blocks of disk A,
//! while both copy, are not held back by B's copy (p50/p99 of the misses,
//! against 2 RTT = 100 ms). Medians of `--runs` runs; writes the
//! `two-disks` section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{
    chrono_now, drop_page_cache, git_head, link_args, machine, make_images, probe, write_section,
    BenchArgs, Ctx, Image, RunResult, FERRY_PORT, NEEDS,
};
use crate::setup::{ensure, target_dir, workspace_root};
use crate::stats::{median, percentile};
use crate::wan::procs::{self, FerryIds, Proc};
use crate::wan::{LinkOpts, Wan, SRC_ADDR};

/// One status sample: s since t0, and per disk (a, b) the bytes fetched
/// (on demand and background) and whether it is still copying.
type Sample = (f64, [u64; 2], [bool; 2]);

/// What one run measured.
struct TwoRun {
    probes: RunResult,
    samples: Vec<Sample>,
    t_complete: f64,
    wire_fwd_bytes: u64,
}

impl TwoRun {
    /// The span over which both disks copied: (first, last) sample index.
    fn both(&self) -> Option<(usize, usize)> {
        let first = self
            .samples
            .iter()
            .position(|(_, b, c)| c[0] && c[1] && b[0] > 0 && b[1] > 0)?;
        let last = self.samples.iter().rposition(|(_, _, c)| c[0] && c[1])?;
        (last > first).then_some((first, last))
    }

    /// Mbit/s of (a + b, a, b) while both copied.
    fn rates(&self) -> Option<(f64, f64, f64)> {
        let (i, j) = self.both()?;
        let (t0, b0, _) = self.samples[i];
        let (t1, b1, _) = self.samples[j];
        let dt = t1 - t0;
        let mbit = |x: u64, y: u64| (y - x) as f64 * 8.0 / dt / 1e6;
        Some((
            mbit(b0[0] + b0[1], b1[0] + b1[1]),
            mbit(b0[0], b1[0]),
            mbit(b0[1], b1[1]),
        ))
    }

    /// The largest Mbit/s of a + b over any 2 s window while both copied.
    fn peak_2s(&self) -> Option<f64> {
        let (i, j) = self.both()?;
        let s = &self.samples[i..=j];
        let mut best: Option<f64> = None;
        for (k, (t, b, _)) in s.iter().enumerate() {
            let Some((t2, b2, _)) = s[k..].iter().find(|(t2, _, _)| *t2 - t >= 2.0) else {
                break;
            };
            let r = ((b2[0] + b2[1]) - (b[0] + b[1])) as f64 * 8.0 / (t2 - t) / 1e6;
            best = Some(best.map_or(r, |x: f64| x.max(r)));
        }
        best
    }
}

/// Runs the two-disk bench.
pub(super) fn run(a: &BenchArgs) -> Result<()> {
    ensure(NEEDS)?;
    let runs = a.runs.unwrap_or(if a.quick { 1 } else { 3 });
    let size_mib = a.size_mib.unwrap_or(if a.quick { 256 } else { 512 });
    let rate_mbit = a.two_disks_rate_mbit;
    let bin = procs::ferry_bin(true)?;
    let dir = target_dir().join("bench-two-disks");
    std::fs::create_dir_all(&dir)?;
    // Disk A: random data (half of --size-mib), probed; disk B: twice as
    // large, so it is still copying while A's probes run.
    let img_a = make_images(&dir, size_mib, &["random".to_string()], a.probes + 1)?
        .pop()
        .context("no image")?;
    let b_size = img_a.size * 2;
    let b_path = dir.join(format!("b-{}M.img", b_size >> 20));
    if !b_path.exists() || std::fs::metadata(&b_path)?.len() != b_size {
        eprintln!("bench: making a {} MiB random-data image", b_size >> 20);
        procs::write_random_file(&b_path, b_size, 0xb0b0_0002)?;
    }
    let link = LinkOpts {
        rate_mbit: 200.0,
        rtt_ms: 50.0,
        ..LinkOpts::default()
    };
    let started = chrono_now();
    let wan = Wan::up("two-disks", &link, &a.tcp_cc, true)?;
    let ctx = Ctx {
        a,
        bin: bin.clone(),
        dir: dir.clone(),
        ids: FerryIds::make(&bin, &dir)?,
        wan,
        link: link.clone(),
        logs: dir.join("logs"),
    };
    std::fs::create_dir_all(&ctx.logs)?;
    let mut serve = Proc::spawn(
        "ferry serve",
        ctx.wan
            .in_src(&ctx.bin)
            .arg("serve")
            .arg("--disk")
            .arg(format!("a={}", img_a.path.display()))
            .arg("--disk")
            .arg(format!("b={}", b_path.display()))
            .args([
                "--listen",
                &format!("{SRC_ADDR}:{FERRY_PORT}"),
                "--identity",
            ])
            .arg(&ctx.ids.src_dir)
            .args(["--trust-peer", &ctx.ids.dst_fp])
            .args(link_args(&ctx.link)),
        &ctx.logs.join("serve.log"),
    )?;
    serve.wait_for_log("ferry serve: exporting", Duration::from_secs(900))?;
    let mut results = Vec::new();
    for run in 0..runs {
        drop_page_cache(&img_a.path)?;
        drop_page_cache(&b_path)?;
        let r = one_run(&ctx, &img_a, &mut serve, run, rate_mbit)
            .with_context(|| format!("two disks, run {}", run + 1))?;
        let rates = r.rates();
        eprintln!(
            "bench: two disks run {}: both copying {}; misses p50 {} ms p99 {} ms ({} misses, {} local); whole {:.1} s",
            run + 1,
            rates
                .map(|(s, x, y)| format!("{s:.1} Mbit/s (a {x:.1}, b {y:.1}), peak 2 s {:.1}", r.peak_2s().unwrap_or(0.0)))
                .unwrap_or("-".into()),
            fmt(percentile(&r.probes.probes_ms, 50.0)),
            fmt(percentile(&r.probes.probes_ms, 99.0)),
            r.probes.probes_ms.len(),
            r.probes.probe_hits,
            r.t_complete
        );
        results.push(r);
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(serve);
    ctx.wan.down()?;
    let label = match std::env::var_os("FERRY_BIN") {
        Some(p) => format!(
            "commit {}",
            super::prebuilt_label(&git_head(), std::path::Path::new(&p))
        ),
        None => format!("commit {}, release build", git_head()),
    };
    let body = render(
        a, runs, &img_a, b_size, rate_mbit, &started, &label, &results,
    )?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    write_section(&out, "two-disks", &body)?;
    eprintln!("bench: wrote the two-disks section of {}", out.display());
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or("-".into())
}

fn one_run(
    ctx: &Ctx<'_>,
    img_a: &Image,
    serve: &mut Proc,
    run: usize,
    rate_mbit: u64,
) -> Result<TwoRun> {
    let rd = ctx.dir.join(format!("run{}", run + 1));
    let _ = std::fs::remove_dir_all(&rd);
    std::fs::create_dir_all(&rd)?;
    let ctl = rd.join("ctl.sock");
    let before = ctx.wan.stats()?;
    let t0 = Instant::now();
    let mut pull = Proc::spawn(
        "ferry pull",
        ctx.wan
            .in_dst(&ctx.bin)
            .args(["pull", "--source", &format!("{SRC_ADDR}:{FERRY_PORT}")])
            .arg("--disk")
            .arg(format!("a={}", rd.join("a.img").display()))
            .arg("--disk")
            .arg(format!("b={}", rd.join("b.img").display()))
            .arg("--nbd")
            .arg(format!("unix:{}", rd.display()))
            .arg("--control")
            .arg(&ctl)
            .arg("--identity")
            .arg(&ctx.ids.dst_dir)
            .args(["--trust-peer", &ctx.ids.src_fp])
            .args(["--rate", &format!("{rate_mbit}Mbit")])
            .args(link_args(&ctx.link)),
        &ctx.logs.join(format!("pull-{}.log", run + 1)),
    )?;
    pull.wait_for_log("ferry pull: serving disk b", Duration::from_secs(60))?;
    // Status samples every 250 ms until the copy is done.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (bin, ctl, stop) = (ctx.bin.clone(), ctl.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v: Vec<Sample> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = procs::ferry_status(&bin, &ctl) {
                    let t = t0.elapsed().as_secs_f64();
                    let d = |i: usize| &s["disks"][i];
                    let bytes = |i: usize| {
                        d(i)["fetched_background_bytes"].as_u64().unwrap_or(0)
                            + d(i)["fetched_on_demand_bytes"].as_u64().unwrap_or(0)
                    };
                    let copying = |i: usize| d(i)["phase"] == "copying";
                    v.push((t, [bytes(0), bytes(1)], [copying(0), copying(1)]));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            v
        })
    };
    let mut r = RunResult::default();
    let sock = rd.join("a.sock");
    let (bin, ctl2) = (ctx.bin.clone(), ctl.clone());
    // Probes of A while both disks copy.
    let client = probe(ctx, img_a, &sock, "a", t0, &mut r, || {
        let s = procs::ferry_status(&bin, &ctl2)?;
        let d = s["disks"].as_array().cloned().unwrap_or_default();
        Ok(d.len() != 2 || d.iter().any(|d| d["phase"] != "copying"))
    })?;
    drop(client);
    let (_st, complete_at) = procs::wait_ferry_complete(
        &ctx.bin,
        &ctl,
        Duration::from_secs(ctx.a.timeout_s),
        &mut [&mut pull, serve],
    )?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the status sampler panicked"))?;
    let after = ctx.wan.stats()?;
    let fwd = |v: &serde_json::Value| crate::wan::counter(v, "src_to_dst", "forwarded_bytes");
    pull.stop();
    for (name, src) in [("a", img_a.path.clone()), ("b", b_src(ctx, img_a))] {
        if !procs::same_contents(&src, &rd.join(format!("{name}.img")))? {
            bail!("disk {name} differs from its source");
        }
    }
    Ok(TwoRun {
        probes: r,
        samples,
        t_complete: complete_at.duration_since(t0).as_secs_f64(),
        wire_fwd_bytes: fwd(&after).saturating_sub(fwd(&before)),
    })
}

/// Disk B's source image.
fn b_src(ctx: &Ctx<'_>, img_a: &Image) -> std::path::PathBuf {
    ctx.dir.join(format!("b-{}M.img", (img_a.size * 2) >> 20))
}

#[allow(clippy::too_many_arguments)]
fn render(
    a: &BenchArgs,
    runs: usize,
    img_a: &Image,
    b_size: u64,
    rate_mbit: u64,
    started: &str,
    label: &str,
    rs: &[TwoRun],
) -> Result<String> {
    let mut o = String::new();
    let cmd = format!(
        "cargo xtask bench --two-disks{}{} --two-disks-rate-mbit {rate_mbit}",
        a.runs.map(|r| format!(" --runs {r}")).unwrap_or_default(),
        a.size_mib
            .map(|s| format!(" --size-mib {s}"))
            .unwrap_or_default(),
    );
    writeln!(o, "## Two disks in one pull, one budget\n")?;
    writeln!(o, "`{cmd}` (started {started}, {label})\n")?;
    writeln!(o, "**Machine:** {}\n", machine())?;
    writeln!(
        o,
        "**Set-up:** the emulated WAN's base link (200 Mbit/s each way, 50 ms RTT, 50 ms tail-drop queue; `cargo xtask wan`). One `ferry serve --disk a=A --disk b=B` at the source, one `ferry pull --disk a=… --disk b=… --rate {rate_mbit}Mbit` at the destination (one QUIC connection per disk, one background budget: docs/decisions/many-disks-one-budget.md). Disk A: {} MiB, disk B: {} MiB, both random (incompressible) data, cold source cache. While both disks copy, a prober reads 4 KiB blocks of A that are not there yet (up to {} probes, one per MiB of A, {} ms apart, until a disk is complete; a read answered in under RTT/2 was already local and is not counted). {runs} run(s); figures are medians of the runs' values, and the p99 of all runs' misses pooled.\n",
        img_a.size >> 20,
        b_size >> 20,
        img_a.probes.len().saturating_sub(1),
        a.probe_gap_ms
    )?;
    writeln!(o, "| run | a + b while both copy (Mbit/s) | a | b | peak 2 s (Mbit/s) | link src→dst, whole run (Mbit/s) | misses on A | p50 (ms) | p99 (ms) | both complete (s) |")?;
    writeln!(o, "|---|---|---|---|---|---|---|---|---|---|")?;
    let mut sums = Vec::new();
    let mut peaks = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut all = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        let rates = r.rates();
        let peak = r.peak_2s();
        let p50 = percentile(&r.probes.probes_ms, 50.0);
        let p99 = percentile(&r.probes.probes_ms, 99.0);
        if let Some((s, _, _)) = rates {
            sums.push(s);
        }
        if let Some(p) = peak {
            peaks.push(p);
        }
        p50s.extend(p50);
        p99s.extend(p99);
        all.extend_from_slice(&r.probes.probes_ms);
        let link = r.wire_fwd_bytes as f64 * 8.0 / r.t_complete / 1e6;
        writeln!(
            o,
            "| {} | {} | {} | {} | {} | {link:.1} | {} | {} | {} | {:.1} |",
            i + 1,
            rates.map(|x| format!("{:.1}", x.0)).unwrap_or("-".into()),
            rates.map(|x| format!("{:.1}", x.1)).unwrap_or("-".into()),
            rates.map(|x| format!("{:.1}", x.2)).unwrap_or("-".into()),
            peak.map(|p| format!("{p:.1}")).unwrap_or("-".into()),
            r.probes.probes_ms.len(),
            fmt(p50),
            fmt(p99),
            r.t_complete
        )?;
    }
    writeln!(
        o,
        "\n**Medians:** a + b {} Mbit/s while both copy (limit {rate_mbit}), peak over 2 s {} Mbit/s; misses on A p50 {} ms, p99 {} ms (all {} misses pooled: p99 {} ms; 2 RTT = 100 ms).\n",
        median(&sums).map(|v| format!("{v:.1}")).unwrap_or("-".into()),
        median(&peaks).map(|v| format!("{v:.1}")).unwrap_or("-".into()),
        fmt(median(&p50s)),
        fmt(median(&p99s)),
        all.len(),
        fmt(percentile(&all, 99.0)),
    )?;
    writeln!(o, "Fetched bytes are the chunks' payload (before QUIC's headers), sampled from `ferry status` every 250 ms; the link column is every byte the emulated link carried source → destination over the whole run (both copies, the probes, headers), divided by the time until both disks were complete.\n")?;
    Ok(o)
}
