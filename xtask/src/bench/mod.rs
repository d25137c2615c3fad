//! `cargo xtask bench [--quick]`: ferry against its peers on the emulated
//! WAN of [`crate::wan`], every system over the very same link in the same
//! run, interleaved run by run.
//!
//! Systems: ferry (`ferry serve` in the source namespace, `ferry pull`
//! with an NBD export in the destination namespace); stop-and-copy
//! (`qemu-nbd` at the source, `nbdcopy` at the destination); the nbdkit lazy
//! proxy (`nbdkit --filter=scan --filter=cow nbd ...` at the destination,
//! reading from the same `qemu-nbd`). Images: ext4 holding real files, and
//! random data. Measured per run: time until the destination serves its
//! first read of an absent block, time until it holds the whole disk, bytes
//! on the wire (the forwarder's counters), latency of 4 KiB reads of absent
//! blocks while the background copy runs (one NBD connection, [`nbd`]),
//! link utilisation, and CPU seconds per GiB at each end (from
//! /proc/PID/stat). The results go into BENCHMARKS.md (between markers, so
//! other sections of that file are kept) and a JSON file. Over each run,
//! the bytes crossing the link ([`sampler`]) and every probe's latency are
//! recorded as time series, drawn per case and image as a PNG in
//! `docs/plots/` under the report's directory ([`plot`]) and linked from
//! it. The lazy proxy's background scan is slow; a run of it is stopped at
//! `--lazy-cap-secs` and its whole-disk figure reported as a lower bound.

pub(crate) mod dedup;
mod live;
pub(crate) mod nbd;
mod plot;
mod sampler;
mod steal;
mod throttle;
mod two_disks;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::setup::{ensure, file, target_dir, tool, workspace_root, Need};

/// What the bench needs: its peers, mkfs and the plots' font.
pub(crate) const NEEDS: &[Need] = &[
    tool("qemu-nbd", "qemu-utils"),
    tool("qemu-img", "qemu-utils"),
    tool("mkfs.ext4", "e2fsprogs"),
    tool("nbdkit", "nbdkit"),
    tool("nbdcopy", "libnbd-bin"),
    tool("nbdinfo", "libnbd-bin"),
    tool("ip", "iproute2"),
    tool("iptables", "iptables"),
    file(
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];
use crate::stats::{median, median_index, mmm, percentile};
use crate::wan::procs::{self, FerryIds, Proc};
use crate::wan::{counter, LinkOpts, Wan, SRC_ADDR};
use sampler::ProgressSampler;

const FERRY_PORT: u16 = 7700;
const NBD_PORT: u16 = 10809;
const PROBE_BYTES: usize = 4096;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Just the default link (200 Mbit/s, 50 ms), small images, one run.
    #[arg(long)]
    quick: bool,
    /// Runs per system and case (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Size of the ext4 image in MiB (default 2048; 256 with --quick). The
    /// random-data image is half of it.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Systems to run: ferry, nbdcopy, nbdkit-lazy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ferry,nbdcopy,nbdkit-lazy"
    )]
    systems: Vec<String>,
    /// Cases: base (200 Mbit/s, 50 ms), loss (same + 0.1% random loss),
    /// rtt150 (200 Mbit/s, 150 ms), jumbo (as base with a 9000-byte MTU);
    /// default all four (base with --quick). Also lossy (100 Mbit/s, 80 ms,
    /// 0.5% loss, ±2 ms reordering jitter, 30 ms queue) and fast (1 Gbit/s,
    /// 20 ms, 20 ms queue), only when named.
    #[arg(long, value_delimiter = ',')]
    cases: Option<Vec<String>>,
    /// Images: fs (ext4 with files), random.
    #[arg(long, value_delimiter = ',', default_value = "fs,random")]
    images: Vec<String>,
    /// TCP congestion control pinned in both namespaces (for the TCP peers).
    #[arg(long, default_value = "bbr")]
    tcp_cc: String,
    /// 4 KiB reads of absent blocks per run, while the copy runs: enough
    /// that they span a whole 13 s copy (50 ms apart) and that three runs
    /// give about 200 misses, so their p99 is not decided by one or two
    /// stalled reads (docs/decisions/bench-probe-schedule.md).
    #[arg(long, default_value_t = 240)]
    probes: usize,
    /// Pause between two probes, in ms.
    #[arg(long, default_value_t = 50)]
    probe_gap_ms: u64,
    /// Give up a run after this many seconds.
    #[arg(long = "timeout-secs", alias = "timeout-s", default_value_t = 900)]
    timeout_s: u64,
    /// Stop an nbdkit lazy-proxy run after this many seconds when its scan
    /// has not finished by then (0: no cap); its whole-disk time is then
    /// reported as a lower bound.
    #[arg(long = "lazy-cap-secs", alias = "lazy-cap-s", default_value_t = 120)]
    lazy_cap_s: u64,
    /// The source image's page cache before every run of every system:
    /// `cold` drops it (`posix_fadvise(DONTNEED)`), as a source whose
    /// hypervisor opens the disk with `cache=none` has it; `warm` leaves
    /// whatever the runs before left (docs/decisions/bench-cold-source.md).
    #[arg(long, value_enum, default_value_t = SourceCache::Cold)]
    source_cache: SourceCache,
    /// Limit the source side's servers (`ferry serve`, `qemu-nbd`) to this
    /// many reads per second from the image's disk (a cgroup; 0: no
    /// limit), as a cloud volume's I/O budget does.
    #[arg(long, default_value_t = 0)]
    source_read_iops: u64,
    /// Where to write the report (default: BENCHMARKS.md in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Name of the report's section in that file (a run with another name
    /// adds its own section instead of replacing the main one). Default:
    /// the main section, or `quick` for a `--quick` run, so a quick look
    /// never replaces the full run's figures.
    #[arg(long, default_value = "")]
    section: String,
    /// An extra argument for `ferry serve` (repeatable, in order), e.g.
    /// `--ferry-serve-arg=--background-disk-reads --ferry-serve-arg=2`;
    /// the report names them.
    #[arg(long = "ferry-serve-arg", allow_hyphen_values = true)]
    ferry_serve_args: Vec<String>,
    /// Instead of the peers: ferry with and without `--index` on a source
    /// derived from a template the destination holds (files added,
    /// rewritten, deleted), on the base link; writes the `dedup` section.
    /// Takes --quick, --runs, --size-mib (default 1024; 256 with --quick),
    /// --probes, --out.
    #[arg(long)]
    dedup: bool,
    /// Instead of the peers: a live source whose VM keeps writing (ferry's
    /// `serve --present`, `pull --precopy`, `switchover`; QEMU's
    /// drive-mirror beside it) on the base link; writes the `live` section.
    /// Takes --quick, --runs, --out and the options below.
    #[arg(long)]
    live: bool,
    /// `--live`: the writer's rates in MB/s (0: an idle guest).
    #[arg(long, value_delimiter = ',', default_value = "0,4,16")]
    writer_rates: Vec<u64>,
    /// `--live`: the parts to run: writer (ferry's cells by write rate and
    /// mode), downtime (4 and 64 GiB disks), mirror (QEMU's drive-mirror).
    #[arg(long, value_delimiter = ',', default_value = "writer,downtime,mirror")]
    live_parts: Vec<String>,
    /// `--live`: switch a pre-copy over after this many seconds when it has
    /// not converged by then.
    #[arg(long, default_value_t = 120)]
    precopy_cap_secs: u64,
    /// `--live`: stop QEMU's mirror with a writer after this many seconds
    /// when it is not ready (0: 3x its idle time, at least 30 s).
    #[arg(long, default_value_t = 0)]
    mirror_cap_secs: u64,
    /// `--live`: run every process on every CPU; by default the source
    /// host (the writer, `ferry serve` or the source QEMU) has CPU 0 and
    /// the destination and the link emulator the others.
    #[arg(long)]
    live_shared_cpus: bool,
    /// Instead of the peers: two disks of one VM in one `ferry pull` on
    /// the base link with one background rate limit
    /// (--two-disks-rate-mbit): their sum's throughput and 4 KiB reads of
    /// absent blocks of one disk while both copy; writes the `two-disks`
    /// section. Takes --quick, --runs, --size-mib (disk A is half of it,
    /// default 512; B twice A), --probes, --out.
    #[arg(long)]
    two_disks: bool,
    /// The background rate limit of --two-disks, Mbit/s (below the
    /// link's 200).
    #[arg(long, default_value_t = 100)]
    two_disks_rate_mbit: u64,
}

/// The source image's page cache before a run (`--source-cache`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SourceCache {
    /// Dropped before every run of every system.
    Cold,
    /// Left as the runs before left it.
    Warm,
}

/// The section a `--quick` run without `--section` writes.
const QUICK_SECTION: &str = "quick";

/// The section a report goes to: `--section` when given, else the main one
/// for a full run and [`QUICK_SECTION`] for a `--quick` one.
fn report_section(quick: bool, section: &str) -> &str {
    if quick && section.is_empty() {
        QUICK_SECTION
    } else {
        section
    }
}

/// Where the plots go, relative to the report's directory (for
/// BENCHMARKS.md, the workspace: its docs, not its root).
pub(crate) const PLOTS_DIR: &str = "docs/plots";

/// How every section marker of ours begins (see [`markers`]).
const SECTION_BEGIN: &str = "<!-- BEGIN cargo xtask bench (";

fn markers(section: &str) -> (String, String) {
    let tag = if section.is_empty() {
        "WAN".to_string()
    } else {
        format!("WAN, {section}")
    };
    (
        format!("<!-- BEGIN cargo xtask bench ({tag}) -->"),
        format!("<!-- END cargo xtask bench ({tag}) -->"),
    )
}

struct Case {
    id: &'static str,
    link: LinkOpts,
}

fn all_cases() -> Vec<Case> {
    let base = LinkOpts {
        rate_mbit: 200.0,
        rtt_ms: 50.0,
        ..LinkOpts::default()
    };
    vec![
        Case {
            id: "base",
            link: base.clone(),
        },
        Case {
            id: "loss",
            link: LinkOpts {
                loss: 0.001,
                ..base.clone()
            },
        },
        Case {
            id: "rtt150",
            link: LinkOpts {
                rtt_ms: 150.0,
                ..base.clone()
            },
        },
        Case {
            id: "jumbo",
            link: LinkOpts { mtu: 9000, ..base },
        },
        // Two links measured on another emulator (netem) that the four
        // above do not cover (issue 27): a lossy, jittery, shallow-queued
        // one and a fast one with a shallow queue. Not in the default set.
        Case {
            id: "lossy",
            link: LinkOpts {
                rate_mbit: 100.0,
                rtt_ms: 80.0,
                loss: 0.005,
                jitter_ms: 2.0,
                jitter_reorders: true,
                queue_ms: 30.0,
                ..LinkOpts::default()
            },
        },
        Case {
            id: "fast",
            link: LinkOpts {
                rate_mbit: 1000.0,
                rtt_ms: 20.0,
                queue_ms: 20.0,
                ..LinkOpts::default()
            },
        },
    ]
}

struct Image {
    id: String,
    path: PathBuf,
    size: u64,
    /// Bytes allocated in the image file (its non-hole part).
    alloc: u64,
    desc: String,
    probes: Vec<u64>,
}

/// What one run of one system measured.
#[derive(Default, Debug, Clone)]
struct RunResult {
    t_first: Option<f64>,
    /// Whole disk, in s since t0; the cap when `capped`.
    t_complete: f64,
    /// Stopped at `--lazy-cap-secs` before the disk was whole: `t_complete`
    /// and the byte counts are lower bounds.
    capped: bool,
    wire_bytes: u64,
    wire_fwd_bytes: u64,
    probes_ms: Vec<f64>,
    probe_hits: usize,
    /// Every probe after the first read: (s since t0 when it was sent,
    /// latency in ms, whether it was a miss, i.e. not under RTT/2, host
    /// CPU steal during it in ms).
    probe_series: Vec<(f64, f64, bool, f64)>,
    /// Host CPU steal over the whole run (set-up included), in ms.
    host_stolen_ms: f64,
    /// Bytes forwarded source → destination since the run started, read
    /// every [`sampler::PERIOD`]: (s since t0, bytes).
    progress: Vec<(f64, u64)>,
    cpu_src: f64,
    cpu_dst: f64,
    drops_queue: u64,
    drops_loss: u64,
    max_late_ms: f64,
    late_pkts: u64,
    fwd_pkts: u64,
    note: String,
    /// Bytes `ferry pull --index` filled from local copies.
    filled_local_bytes: u64,
}

impl RunResult {
    fn to_json(&self) -> Value {
        json!({
            "first_read_s": self.t_first,
            "whole_disk_s": self.t_complete,
            "capped": self.capped,
            "wire_bytes": self.wire_bytes,
            "wire_src_to_dst_bytes": self.wire_fwd_bytes,
            "probe_miss_ms": self.probes_ms,
            "probe_local_hits": self.probe_hits,
            "probe_series": self
                .probe_series
                .iter()
                .map(|&(t, ms, miss, stolen)| {
                    json!({ "t_s": t, "ms": ms, "miss": miss, "host_stolen_ms": stolen })
                })
                .collect::<Vec<_>>(),
            "progress_src_to_dst": self
                .progress
                .iter()
                .map(|&(t, b)| json!([t, b]))
                .collect::<Vec<_>>(),
            "host_stolen_ms": self.host_stolen_ms,
            "cpu_src_s": self.cpu_src,
            "cpu_dst_s": self.cpu_dst,
            "link_drops_queue_pkts": self.drops_queue,
            "link_drops_loss_pkts": self.drops_loss,
            "forwarder_max_late_ms": self.max_late_ms,
            "forwarder_late_over_1ms_pkts": self.late_pkts,
            "forwarded_pkts": self.fwd_pkts,
            "note": self.note,
        })
    }
}

/// results[case][image][system] = one entry per run.
type Results = BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<RunResult>>>>;

/// The plots written, by (case, image).
type Plots = BTreeMap<(String, String), plot::Written>;

struct Ctx<'a> {
    a: &'a BenchArgs,
    bin: PathBuf,
    dir: PathBuf,
    ids: FerryIds,
    wan: Wan,
    link: LinkOpts,
    /// Where this case's process logs go: `target/bench/logs/CASE/`, so a
    /// later case does not overwrite the logs of an earlier one.
    logs: PathBuf,
}

/// Runs the benchmark.
pub(crate) fn run_bench(a: &BenchArgs) -> Result<()> {
    let a = &BenchArgs {
        section: report_section(a.quick, &a.section).to_string(),
        ..a.clone()
    };
    if a.dedup {
        return dedup::run(a);
    }
    if a.live {
        return live::run(a);
    }
    if a.two_disks {
        return two_disks::run(a);
    }
    ensure(NEEDS)?;
    let runs = a.runs.unwrap_or(if a.quick { 1 } else { 3 });
    let size_mib = a.size_mib.unwrap_or(if a.quick { 256 } else { 2048 });
    let want_cases = a.cases.clone().unwrap_or_else(|| {
        if a.quick {
            vec!["base".into()]
        } else {
            vec![
                "base".into(),
                "loss".into(),
                "rtt150".into(),
                "jumbo".into(),
            ]
        }
    });
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| want_cases.iter().any(|w| w == c.id))
        .collect();
    if cases.is_empty() {
        bail!("no known case in {want_cases:?} (base, loss, rtt150, jumbo, lossy, fast)");
    }
    for s in &a.systems {
        if !["ferry", "nbdcopy", "nbdkit-lazy"].contains(&s.as_str()) {
            bail!("unknown system {s} (ferry, nbdcopy, nbdkit-lazy)");
        }
    }
    // Fail now, not after the runs, when the plots cannot be drawn.
    plot::ensure_font()?;
    let bin = procs::ferry_bin(true)?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let images = make_images(&dir, size_mib, &a.images, a.probes + 1)?;
    let started = chrono_now();
    let t_all = Instant::now();
    let throttle = match (a.source_read_iops, images.first()) {
        (0, _) | (_, None) => None,
        (iops, Some(img)) => {
            let t = throttle::ReadThrottle::new(&img.path, iops)?;
            eprintln!(
                "bench: the source side's servers read at most {iops} times a second from disk {}",
                t.device
            );
            Some(t)
        }
    };

    // results[case][image][system] = runs
    let mut results: Results = BTreeMap::new();
    for case in &cases {
        eprintln!("bench: case {} ({})", case.id, case.link.describe());
        let wan = Wan::up("bench", &case.link, &a.tcp_cc, true)?;
        let ctx = Ctx {
            a,
            bin: bin.clone(),
            dir: dir.clone(),
            ids: FerryIds::make(&bin, &dir)?,
            wan,
            link: case.link.clone(),
            logs: dir.join("logs").join(case.id),
        };
        std::fs::create_dir_all(&ctx.logs)?;
        for img in &images {
            let mut serve = None;
            let mut qnbd = None;
            if a.systems.iter().any(|s| s == "ferry") {
                serve = Some(start_ferry_serve(&ctx, img)?);
            }
            if a.systems.iter().any(|s| s != "ferry") {
                qnbd = Some(start_qemu_nbd(&ctx, img)?);
            }
            if let Some(t) = &throttle {
                for p in serve.iter().chain(qnbd.iter()) {
                    t.add(p.pid())?;
                }
            }
            for run in 0..runs {
                for sys in &a.systems {
                    if a.source_cache == SourceCache::Cold {
                        drop_page_cache(&img.path)?;
                    }
                    let stolen0 = steal::stolen_ms();
                    let mut r = match sys.as_str() {
                        "ferry" => {
                            run_ferry(&ctx, img, serve.as_mut().expect("serve"), run, "", &[])
                        }
                        "nbdcopy" => run_nbdcopy(&ctx, img, qnbd.as_mut().expect("qemu-nbd")),
                        _ => run_lazy(&ctx, img, qnbd.as_mut().expect("qemu-nbd")),
                    }
                    .with_context(|| {
                        format!("{sys} on {} / {} run {}", case.id, img.id, run + 1)
                    })?;
                    r.host_stolen_ms = steal::between(stolen0, steal::stolen_ms());
                    eprintln!(
                        "bench: {} {} {} run {}: first read {} s, whole disk {}{:.1} s{}, wire {:.1} MiB, misses p50 {} ms ({} probes, {} local), cpu src {:.1} s dst {:.1} s, host stole {:.0} ms{}",
                        case.id,
                        img.id,
                        sys,
                        run + 1,
                        r.t_first.map(|t| format!("{t:.2}")).unwrap_or("-".into()),
                        if r.capped { "> " } else { "" },
                        r.t_complete,
                        if r.capped { " (capped)" } else { "" },
                        r.wire_bytes as f64 / 1048576.0,
                        percentile(&r.probes_ms, 50.0)
                            .map(|v| format!("{v:.0}"))
                            .unwrap_or("-".into()),
                        r.probes_ms.len(),
                        r.probe_hits,
                        r.cpu_src,
                        r.cpu_dst,
                        r.host_stolen_ms,
                        if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) }
                    );
                    results
                        .entry(case.id.to_string())
                        .or_default()
                        .entry(img.id.clone())
                        .or_default()
                        .entry(sys.clone())
                        .or_default()
                        .push(r);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            drop(serve);
            drop(qnbd);
        }
        ctx.wan.down()?;
        if cases.len() > 1 && case.id != cases[cases.len() - 1].id {
            finish(
                a, runs, &cases, &images, &results, &started, t_all, &dir, false,
            )?;
        }
    }

    let out = finish(
        a, runs, &cases, &images, &results, &started, t_all, &dir, true,
    )?;
    eprintln!(
        "bench: wrote {} ({:.0} s)",
        out.display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the report and the raw JSON; `last` false marks it partial.
#[allow(clippy::too_many_arguments)]
fn finish(
    a: &BenchArgs,
    runs: usize,
    cases: &[Case],
    images: &[Image],
    results: &Results,
    started: &str,
    t_all: Instant,
    dir: &Path,
    last: bool,
) -> Result<PathBuf> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    let plots = write_plots(a, cases, images, results, &out)?;
    let mut report = render(
        a,
        runs,
        cases,
        images,
        results,
        &plots,
        started,
        t_all.elapsed(),
    )?;
    if !last {
        report = format!(
            "**PARTIAL: the bench was still running when this was written; only the cases below had finished.**\n\n{report}"
        );
    }
    let mut tree = serde_json::Map::new();
    for (c, imgs) in results {
        let mut ti = serde_json::Map::new();
        for (i, syss) in imgs {
            let mut ts = serde_json::Map::new();
            for (s, rs) in syss {
                ts.insert(
                    s.clone(),
                    Value::Array(rs.iter().map(RunResult::to_json).collect()),
                );
            }
            ti.insert(i.clone(), Value::Object(ts));
        }
        tree.insert(c.clone(), Value::Object(ti));
    }
    let raw = json!({
        "started": started,
        "runs": runs,
        "lazy_cap_s": a.lazy_cap_s,
        "complete": last,
        "results": tree,
    });
    let raw_path = dir.join(if a.quick {
        "results-quick.json"
    } else {
        "results.json"
    });
    std::fs::write(&raw_path, serde_json::to_string_pretty(&raw)?)?;
    write_section(&out, &a.section, &report)?;
    Ok(out)
}

/// The plots of every case and image, in [`PLOTS_DIR`] under the
/// report `out`'s directory.
fn write_plots(
    a: &BenchArgs,
    cases: &[Case],
    images: &[Image],
    results: &Results,
    out: &Path,
) -> Result<Plots> {
    let dir = out.parent().unwrap_or(Path::new(""));
    let title = |case: &str, image: &str| {
        let link = cases
            .iter()
            .find(|c| c.id == case)
            .map(|c| c.link.describe())
            .unwrap_or_default();
        let size = images
            .iter()
            .find(|i| i.id == image)
            .map(|i| format!(" ({} MiB)", i.size >> 20))
            .unwrap_or_default();
        format!("cargo xtask bench: case {case} ({link}), image {image}{size}")
    };
    plot::write_all(dir, results, &a.section, a.quick, title)
}

fn chrono_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Picks the largest of a few system directories that fills at most 60%
/// of the image.
fn fs_source_dir(size: u64) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share",
        "/usr/share/doc",
        "/usr/lib/python3",
        "/usr/include",
        // Small, but always there: lets a tiny smoke image be made anywhere.
        "/etc",
    ] {
        let Ok(o) = Command::new("du").args(["-sb", d]).output() else {
            continue;
        };
        let Some(n) = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n * 10 <= size * 6 && best.as_ref().is_none_or(|(_, b)| n > *b) {
            best = Some((PathBuf::from(d), n));
        }
    }
    best
}

fn make_images(dir: &Path, size_mib: u64, which: &[String], nprobes: usize) -> Result<Vec<Image>> {
    let mut out = Vec::new();
    for id in which {
        match id.as_str() {
            "fs" => {
                let size = size_mib << 20;
                let path = dir.join(format!("fs-{size_mib}M.img"));
                let (src, n) = fs_source_dir(size).context("no directory small enough")?;
                let stamp = dir.join(format!("fs-{size_mib}M.from"));
                let desc_want = format!("{}:{}", src.display(), n);
                if !path.exists()
                    || std::fs::read_to_string(&stamp).unwrap_or_default() != desc_want
                {
                    eprintln!(
                        "bench: making a {size_mib} MiB ext4 image from {} ({:.0} MiB)",
                        src.display(),
                        n as f64 / 1048576.0
                    );
                    let _ = std::fs::remove_file(&path);
                    mkfs_ext4_from(&src, &path, size_mib)?;
                    std::fs::write(&stamp, &desc_want)?;
                }
                let alloc = allocated_bytes(&path)?;
                out.push(Image {
                    id: "fs".into(),
                    probes: pick_probes(&path, size, nprobes)?,
                    path,
                    size,
                    alloc,
                    desc: format!(
                        "ext4, {size_mib} MiB, `mkfs.ext4 -d {}` ({:.0} MiB of files; {:.0} MiB allocated in the image file)",
                        src.display(),
                        n as f64 / 1048576.0,
                        alloc as f64 / 1048576.0
                    ),
                });
            }
            "random" => {
                let mib = (size_mib / 2).max(16);
                let size = mib << 20;
                let path = dir.join(format!("random-{mib}M.img"));
                if !path.exists() || std::fs::metadata(&path)?.len() != size {
                    eprintln!("bench: making a {mib} MiB random-data image");
                    procs::write_random_file(&path, size, 0xbe4c_0001)?;
                }
                out.push(Image {
                    id: "random".into(),
                    probes: pick_probes(&path, size, nprobes)?,
                    alloc: allocated_bytes(&path)?,
                    path,
                    size,
                    desc: format!("{mib} MiB of random (incompressible) data, no zeros"),
                });
            }
            other => bail!("unknown image {other} (fs, random)"),
        }
    }
    Ok(out)
}

fn allocated_bytes(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// Offsets of 4 KiB blocks holding data (not zeros), each in its own
/// 1 MiB region, preferring the far end of the disk (every system copies
/// from the start), in a fixed pseudo-random order.
fn pick_probes(path: &Path, size: u64, n: usize) -> Result<Vec<u64>> {
    let f = std::fs::File::open(path)?;
    let regions = size >> 20;
    let mut order: Vec<u64> = (0..regions).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut buf = vec![0u8; PROBE_BYTES];
    let mut out = Vec::new();
    for lower in [regions * 2 / 5, 0] {
        for &r in &order {
            if out.len() >= n {
                break;
            }
            if r < lower || out.iter().any(|o| o >> 20 == r) {
                continue;
            }
            // Try a few blocks within the region.
            for k in 0..8u64 {
                let off = (r << 20) + ((x.rotate_left(k as u32 * 7) % 256) << 12);
                f.read_exact_at(&mut buf, off)?;
                if buf.iter().any(|&b| b != 0) {
                    out.push(off);
                    break;
                }
            }
        }
    }
    if out.len() < n.min(2) {
        bail!(
            "found only {} data blocks to probe in {}",
            out.len(),
            path.display()
        );
    }
    Ok(out)
}

fn start_ferry_serve(ctx: &Ctx<'_>, img: &Image) -> Result<Proc> {
    let mut p = Proc::spawn(
        "ferry serve",
        ctx.wan
            .in_src(&ctx.bin)
            .args(["serve", "--disk"])
            .arg(&img.path)
            .args([
                "--listen",
                &format!("{SRC_ADDR}:{FERRY_PORT}"),
                "--identity",
            ])
            .arg(&ctx.ids.src_dir)
            .args(["--trust-peer", &ctx.ids.dst_fp])
            .args(link_args(&ctx.link))
            .args(&ctx.a.ferry_serve_args),
        &ctx.logs.join(format!("serve-{}.log", img.id)),
    )?;
    p.wait_for_log("ferry serve: exporting", Duration::from_secs(900))?;
    Ok(p)
}

/// Makes `path` an ext4 image of `size_mib` MiB holding the files of
/// `src` (every inode table and the journal written now, not lazily).
pub(crate) fn mkfs_ext4_from(src: &Path, path: &Path, size_mib: u64) -> Result<()> {
    crate::setup::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg("-d")
            .arg(src)
            .arg(path)
            .arg(format!("{size_mib}M")),
    )
}

/// Drops `path`'s clean pages from the page cache, so the next run reads
/// the source image from the disk, as a migration of a disk that the
/// source's hypervisor opens with `cache=none` does.
fn drop_page_cache(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("dropping {} from the page cache", path.display()))?;
    Ok(())
}

fn link_args(l: &LinkOpts) -> Vec<String> {
    vec![
        "--link-mbit".into(),
        format!("{}", l.rate_mbit.round() as u64),
        "--link-rtt-ms".into(),
        format!("{}", l.rtt_ms.round() as u64),
        "--link-mtu".into(),
        l.mtu.to_string(),
    ]
}

fn start_qemu_nbd(ctx: &Ctx<'_>, img: &Image) -> Result<Proc> {
    let mut p = Proc::spawn(
        "qemu-nbd",
        ctx.wan
            .in_src("qemu-nbd")
            .args(["-r", "-t", "-e", "16", "-f", "raw", "-b", SRC_ADDR])
            .args(["-p", &NBD_PORT.to_string()])
            .arg(&img.path),
        &ctx.logs.join(format!("qemu-nbd-{}.log", img.id)),
    )?;
    let t0 = Instant::now();
    loop {
        let ok = ctx
            .wan
            .in_dst("nbdinfo")
            .args(["--size", &format!("nbd://{SRC_ADDR}:{NBD_PORT}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(p);
        }
        p.check_running()?;
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("qemu-nbd did not answer in 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts sampling the link's source → destination bytes for a run that
/// started at `t0`, counting from the `before` snapshot.
fn start_progress(ctx: &Ctx<'_>, before: &Value, t0: Instant) -> Result<ProgressSampler> {
    ProgressSampler::start(
        ctx.wan.stats_handle(),
        counter(before, "src_to_dst", "forwarded_bytes"),
        t0,
        sampler::PERIOD,
    )
}

/// Counter deltas of the link between two stats snapshots.
fn link_delta(r: &mut RunResult, before: &Value, after: &Value) {
    let d = |dir: &str, k: &str| counter(after, dir, k).saturating_sub(counter(before, dir, k));
    r.wire_fwd_bytes = d("src_to_dst", "forwarded_bytes");
    r.wire_bytes = r.wire_fwd_bytes + d("dst_to_src", "forwarded_bytes");
    r.drops_queue = d("src_to_dst", "dropped_queue_pkts") + d("dst_to_src", "dropped_queue_pkts");
    r.drops_loss = d("src_to_dst", "dropped_loss_pkts") + d("dst_to_src", "dropped_loss_pkts");
    r.late_pkts = d("src_to_dst", "late_over_1ms_pkts") + d("dst_to_src", "late_over_1ms_pkts");
    r.fwd_pkts = d("src_to_dst", "forwarded_pkts") + d("dst_to_src", "forwarded_pkts");
    r.max_late_ms = ["src_to_dst", "dst_to_src"]
        .iter()
        .map(|k| after[k]["max_late_ms"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
}

/// First read and probes over one NBD connection; `done` says whether the
/// copy has finished (probes stop then). Returns the connection so the
/// caller can keep it open (nbdkit's scan runs only while a client is
/// connected).
fn probe(
    ctx: &Ctx<'_>,
    img: &Image,
    sock: &Path,
    export: &str,
    t0: Instant,
    r: &mut RunResult,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<nbd::NbdClient> {
    let mut c = nbd::NbdClient::connect(sock, export, Duration::from_secs(120))?;
    if c.size != img.size {
        bail!("export size {} != image size {}", c.size, img.size);
    }
    let mut buf = vec![0u8; PROBE_BYTES];
    let mut want = vec![0u8; PROBE_BYTES];
    let file = std::fs::File::open(&img.path)?;
    let check = |off: u64, got: &[u8], want: &mut [u8]| -> Result<()> {
        file.read_exact_at(want, off)?;
        if got != want {
            bail!("read at {off} returned wrong data");
        }
        Ok(())
    };
    c.read(img.probes[0], &mut buf)?;
    r.t_first = Some(t0.elapsed().as_secs_f64());
    check(img.probes[0], &buf, &mut want)?;
    let local = ctx.link.rtt_ms / 2.0;
    for &off in img.probes.iter().skip(1) {
        std::thread::sleep(Duration::from_millis(ctx.a.probe_gap_ms));
        if done()? {
            break;
        }
        let stolen0 = steal::stolen_ms();
        let t = Instant::now();
        let sent_at = t.duration_since(t0).as_secs_f64();
        c.read(off, &mut buf)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let stolen = steal::between(stolen0, steal::stolen_ms());
        check(off, &buf, &mut want)?;
        r.probe_series.push((sent_at, ms, ms >= local, stolen));
        // A read answered in under half an RTT never crossed the link: the
        // block was already there. Only misses are latency samples.
        if ms < local {
            r.probe_hits += 1;
        } else {
            r.probes_ms.push(ms);
        }
    }
    Ok(c)
}

/// The report's line on host CPU steal under one table: the total over
/// its runs, and per system with misses how many were disturbed by the
/// host and the p99 of the others.
fn steal_line(per_sys: &BTreeMap<String, Vec<RunResult>>) -> String {
    let total: f64 = per_sys.values().flatten().map(|r| r.host_stolen_ms).sum();
    let runs = per_sys.values().map(Vec::len).sum::<usize>();
    let mut parts = Vec::new();
    for (sys, rs) in per_sys {
        let pairs: Vec<(f64, f64)> = rs
            .iter()
            .flat_map(|r| &r.probe_series)
            .filter(|p| p.2)
            .map(|&(_, ms, _, stolen)| (ms, stolen))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let calm: Vec<f64> = pairs
            .iter()
            .filter(|&&(_, stolen)| stolen < steal::DISTURBED_MS)
            .map(|&(ms, _)| ms)
            .collect();
        parts.push(format!(
            "{sys} {} of {} misses disturbed, p99 of the others {} ms",
            pairs.len() - calm.len(),
            pairs.len(),
            percentile(&calm, 99.0)
                .map(|v| format!("{v:.0}"))
                .unwrap_or("–".into())
        ));
    }
    let mut line = format!(
        "Host CPU steal over these {runs} runs: {:.1} s in all.",
        total / 1e3
    );
    if !parts.is_empty() {
        line += &format!(
            " Misses during which the host stole ≥ {:.0} ms: {}.",
            steal::DISTURBED_MS,
            parts.join("; ")
        );
    }
    line
}

fn run_ferry(
    ctx: &Ctx<'_>,
    img: &Image,
    serve: &mut Proc,
    run: usize,
    tag: &str,
    extra: &[String],
) -> Result<RunResult> {
    let mut r = RunResult::default();
    let tag = format!("ferry-{}{tag}", img.id);
    let disk = ctx.dir.join(format!("dst-{tag}.img"));
    for p in [
        disk.clone(),
        ctx.dir.join(format!("dst-{tag}.img.ferry-state")),
    ] {
        let _ = std::fs::remove_file(p);
    }
    let sock = ctx.dir.join(format!("nbd-{tag}.sock"));
    let ctl = ctx.dir.join(format!("ctl-{tag}.sock"));
    let before = ctx.wan.stats()?;
    let cpu_src0 = serve.cpu_seconds();
    let t0 = Instant::now();
    let progress = start_progress(ctx, &before, t0)?;
    let mut pull = Proc::spawn(
        "ferry pull",
        ctx.wan
            .in_dst(&ctx.bin)
            .args(["pull", "--source", &format!("{SRC_ADDR}:{FERRY_PORT}")])
            .arg("--disk")
            .arg(&disk)
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display()))
            .arg("--control")
            .arg(&ctl)
            .arg("--identity")
            .arg(&ctx.ids.dst_dir)
            .args(["--trust-peer", &ctx.ids.src_fp])
            .args(link_args(&ctx.link))
            .args(extra),
        &ctx.logs.join(format!("pull-{tag}-{}.log", run + 1)),
    )?;
    pull.wait_for_log("ferry pull: serving", Duration::from_secs(60))?;
    let bin = ctx.bin.clone();
    let ctl2 = ctl.clone();
    let client = probe(ctx, img, &sock, "ferry", t0, &mut r, || {
        Ok(procs::ferry_status(&bin, &ctl2)?["phase"] == "complete")
    })?;
    let (st, complete_at) = procs::wait_ferry_complete(
        &ctx.bin,
        &ctl,
        Duration::from_secs(ctx.a.timeout_s),
        &mut [&mut pull, serve],
    )?;
    r.t_complete = complete_at.duration_since(t0).as_secs_f64();
    let after = ctx.wan.stats()?;
    r.progress = progress.finish();
    link_delta(&mut r, &before, &after);
    drop(client);
    r.cpu_src = serve.cpu_seconds() - cpu_src0;
    r.cpu_dst = pull.stop();
    r.filled_local_bytes = st["filled_local_bytes"].as_u64().unwrap_or(0);
    r.note = format!(
        "verified {}; {} MiB on demand, {} MiB background, {} MiB zero skipped; {} on-demand reads hedged, the source last reported {} ppm lost",
        st["verified"].as_str().unwrap_or("?"),
        st["fetched_on_demand_bytes"].as_u64().unwrap_or(0) >> 20,
        st["fetched_background_bytes"].as_u64().unwrap_or(0) >> 20,
        st["skipped_zero_bytes"].as_u64().unwrap_or(0) >> 20,
        st["hedged_reads"].as_u64().unwrap_or(0),
        st["source_lost_ppm"].as_u64().unwrap_or(0)
    );
    Ok(r)
}

fn run_nbdcopy(ctx: &Ctx<'_>, img: &Image, qnbd: &mut Proc) -> Result<RunResult> {
    let mut r = RunResult::default();
    let disk = ctx.dir.join(format!("dst-nbdcopy-{}.img", img.id));
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)?.set_len(img.size)?;
    let before = ctx.wan.stats()?;
    let cpu_src0 = qnbd.cpu_seconds();
    let t0 = Instant::now();
    let progress = start_progress(ctx, &before, t0)?;
    let mut p = Proc::spawn(
        "nbdcopy",
        ctx.wan
            .in_dst("nbdcopy")
            .arg(format!("nbd://{SRC_ADDR}:{NBD_PORT}"))
            .arg(&disk),
        &ctx.logs.join(format!("nbdcopy-{}.log", img.id)),
    )?;
    let t_end = Instant::now() + Duration::from_secs(ctx.a.timeout_s);
    let st = loop {
        qnbd.cpu_seconds();
        p.cpu_seconds();
        if let Some(st) = p.try_status()? {
            break st;
        }
        if Instant::now() > t_end {
            bail!("nbdcopy did not finish in {} s", ctx.a.timeout_s);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !st.success() {
        bail!("nbdcopy failed ({st}): {}", procs::tail(&p.log_text()));
    }
    r.t_complete = t0.elapsed().as_secs_f64();
    // Nothing is served at the destination before the copy ends.
    r.t_first = Some(r.t_complete);
    let after = ctx.wan.stats()?;
    r.progress = progress.finish();
    link_delta(&mut r, &before, &after);
    r.cpu_src = qnbd.cpu_seconds() - cpu_src0;
    r.cpu_dst = p.cpu_seconds();
    let same = procs::same_contents(&img.path, &disk)?;
    if !same {
        bail!("nbdcopy's copy differs from the source");
    }
    r.note = "copy identical to the source".into();
    Ok(r)
}

fn run_lazy(ctx: &Ctx<'_>, img: &Image, qnbd: &mut Proc) -> Result<RunResult> {
    let mut r = RunResult::default();
    let sock = ctx.dir.join(format!("nbdkit-{}.sock", img.id));
    let tmp = ctx.dir.join("nbdkit-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let _ = std::fs::remove_file(&sock);
    let before = ctx.wan.stats()?;
    let cpu_src0 = qnbd.cpu_seconds();
    let t0 = Instant::now();
    let progress = start_progress(ctx, &before, t0)?;
    let mut p = Proc::spawn(
        "nbdkit lazy proxy",
        ctx.wan
            .in_dst("nbdkit")
            .env("TMPDIR", &tmp)
            .args(["-f", "-v", "-U"])
            .arg(&sock)
            .args(["--filter=scan", "--filter=cow", "nbd"])
            .arg(format!("hostname={SRC_ADDR}"))
            .arg(format!("port={NBD_PORT}"))
            .args(LAZY_PARAMS),
        &ctx.logs.join(format!("nbdkit-{}.log", img.id)),
    )?;
    let t_sock = Instant::now();
    while !sock.exists() {
        p.check_running()?;
        if t_sock.elapsed() > Duration::from_secs(30) {
            bail!("nbdkit made no socket in 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = p.log.clone();
    let cap = (ctx.a.lazy_cap_s > 0).then(|| Duration::from_secs(ctx.a.lazy_cap_s));
    let to_cap = move || cap.map(|c| c.saturating_sub(t0.elapsed()));
    // Probes stop when the scan has finished or at the cap.
    let finished = move || -> Result<bool> {
        Ok(to_cap() == Some(Duration::ZERO)
            || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(LAZY_DONE))
    };
    // Keep the connection: the scan runs only while a client is connected.
    let client = probe(ctx, img, &sock, "", t0, &mut r, finished)?;
    let t_end = Instant::now() + Duration::from_secs(ctx.a.timeout_s);
    loop {
        qnbd.cpu_seconds();
        p.cpu_seconds();
        p.check_running()?;
        if p.log_text().contains(LAZY_DONE) {
            break;
        }
        if to_cap() == Some(Duration::ZERO) {
            r.capped = true;
            break;
        }
        if Instant::now() > t_end {
            bail!("nbdkit's scan did not finish in {} s", ctx.a.timeout_s);
        }
        let nap = Duration::from_millis(50);
        std::thread::sleep(to_cap().map_or(nap, |left| left.min(nap)));
    }
    r.t_complete = match cap {
        Some(c) if r.capped => c.as_secs_f64(),
        _ => t0.elapsed().as_secs_f64(),
    };
    let after = ctx.wan.stats()?;
    r.progress = progress.finish();
    link_delta(&mut r, &before, &after);
    r.cpu_src = qnbd.cpu_seconds() - cpu_src0;
    r.cpu_dst = p.cpu_seconds();
    drop(client);
    p.stop();
    r.note = if r.capped {
        format!(
            "stopped at the {} s cap before the scan filter's \"finished scanning\"",
            ctx.a.lazy_cap_s
        )
    } else {
        "whole disk = scan filter's \"finished scanning\"".into()
    };
    Ok(r)
}

/// nbdkit's lazy-proxy parameters: 1 MiB copy-on-write blocks, reads and
/// the scan's prefetches kept in the overlay, prefetch strictly in order
/// (with scan-ahead the scan skips past a read and the skipped part is
/// never prefetched).
const LAZY_PARAMS: &[&str] = &[
    "cow-block-size=1M",
    "cow-on-read=true",
    "cow-on-cache=true",
    "scan-ahead=false",
];
const LAZY_DONE: &str = "finished scanning the plugin";

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "?".into());
    // The machine's CPUs, not this thread's (`bench --live` pins it).
    let cpus = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let nproc = match cpus.lines().filter(|l| l.starts_with("processor")).count() {
        0 => std::thread::available_parallelism().map_or(0, |n| n.get()),
        n => n,
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| k / 1024 / 1024)
        .unwrap_or(0);
    format!("{nproc} CPUs ({cpu}), {mem} GiB RAM, Linux {kernel}")
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// How the report names a prebuilt `FERRY_BIN`: its commit and file name
/// only, since the report is committed and the binary's directory is a
/// path of the machine that ran the bench.
fn prebuilt_label(commit: &str, bin: &Path) -> String {
    let name = bin.file_name().unwrap_or(bin.as_os_str());
    format!(
        "{commit} (prebuilt binary {}, FERRY_BIN)",
        Path::new(name).display()
    )
}

fn git_head() -> String {
    if let Some(bin) = std::env::var_os("FERRY_BIN") {
        let commit = std::env::var("FERRY_BIN_COMMIT").unwrap_or_else(|_| "?".into());
        return prebuilt_label(&commit, Path::new(&bin));
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = git(&[
        "status",
        "--porcelain",
        "-uno",
        "--",
        "crates",
        "transport",
        "ublk-target",
    ]);
    if dirty.is_empty() {
        head
    } else {
        format!("{head} (plus uncommitted changes to ferry's sources in the tree)")
    }
}

fn system_title(s: &str) -> &'static str {
    match s {
        "ferry" => "ferry (serve + pull, NBD export)",
        "nbdcopy" => "stop-and-copy: qemu-nbd → nbdcopy",
        _ => "lazy proxy: qemu-nbd → nbdkit nbd + scan + cow",
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    a: &BenchArgs,
    runs: usize,
    cases: &[Case],
    images: &[Image],
    results: &Results,
    plots: &Plots,
    started: &str,
    took: Duration,
) -> Result<String> {
    let mut o = String::new();
    if a.section.is_empty() {
        writeln!(o, "## ferry vs. its peers on an emulated WAN")?;
    } else {
        writeln!(
            o,
            "## ferry vs. its peers on an emulated WAN: {}",
            a.section
        )?;
    }
    writeln!(o)?;
    writeln!(
        o,
        "Made by `cargo xtask bench{}` on {started} (took {:.0} min), ferry at commit {}. {}",
        if a.quick { " --quick" } else { "" },
        took.as_secs_f64() / 60.0,
        git_head(),
        if runs == 1 {
            "**One run per figure** (`--quick`): no spread, read them as indications only."
                .to_string()
        } else {
            format!("Each figure is the median of {runs} runs, with (min–max).")
        }
    )?;
    writeln!(o)?;
    if !a.ferry_serve_args.is_empty() {
        writeln!(
            o,
            "**ferry serve** ran with the extra arguments `{}`.",
            a.ferry_serve_args.join(" ")
        )?;
        writeln!(o)?;
    }
    writeln!(o, "**Machine:** {}.", machine())?;
    writeln!(
        o,
        "Other work may have run on the same 2 cores during the runs (a shared development machine); the forwarder's lateness below shows how well it kept time."
    )?;
    writeln!(o)?;
    writeln!(o, "**Link:** two network namespaces joined by `cargo xtask wan`'s TUN forwarder (one-way delay = RTT/2 each way, a bottleneck of the given rate each way with a 50 ms tail-drop queue, loss applied per direction after the bottleneck). TCP congestion control pinned to **{}** in both namespaces (`net.ipv4.tcp_congestion_control`; tcp_rmem/tcp_wmem max 32 MiB); UDP buffers are capped by the host's net.core.rmem_max ({} bytes). ferry uses its own congestion controller over QUIC and is told the link (`--link-mbit`, `--link-rtt-ms`, `--link-mtu`). MTU 1500 unless the case says otherwise.", a.tcp_cc, std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default().trim())?;
    writeln!(o)?;
    writeln!(o, "**Images:**")?;
    for i in images {
        writeln!(o, "- `{}`: {}", i.id, i.desc)?;
    }
    writeln!(o)?;
    writeln!(
        o,
        "**Tools:** {}; {}; {}.",
        tool_version("nbdkit", "--version"),
        tool_version("nbdcopy", "--version"),
        tool_version("qemu-nbd", "--version")
    )?;
    writeln!(o)?;
    writeln!(o, "**What is measured** (clock starts when the destination side is launched; the source side is already up, ferry serve's one-time hashing of the image is not counted):")?;
    writeln!(o, "- *first read*: until the destination answers a 4 KiB NBD read of a block it does not hold (for stop-and-copy: the end of the copy, since nothing is served before).")?;
    writeln!(o, "- *whole disk*: until the destination holds every block (ferry: `phase` = complete in `ferry status`; nbdcopy: exit; nbdkit: the scan filter logs \"finished scanning the plugin\", every block being in the cow overlay).")?;
    writeln!(o, "- *wire*: IP bytes the forwarder forwarded, both directions, during the run (headers included).")?;
    writeln!(
        o,
        "- *link use*: source→destination wire bytes / (whole-disk time × link rate)."
    )?;
    writeln!(o, "- *capped*: {}", cap_text(a.lazy_cap_s))?;
    writeln!(o, "- *4 KiB misses*: after the first read, up to {} further 4 KiB reads of data blocks at distinct 1 MiB regions in the far 60% of the disk, {} ms apart, on one NBD connection (a small client in `xtask/src/bench/nbd.rs`), while the copy runs; reads answered in under RTT/2 never crossed the link (the block had arrived) and are counted as local, not as misses. p50/p99 pool all runs' misses.\n- *medians, percentiles*: always one of the samples, the one at index round(p/100 × (n − 1)) of the sorted values (numpy's `nearest`; `xtask/src/stats.rs`), so a median of runs is one of the runs.", a.probes, a.probe_gap_ms)?;
    writeln!(
        o,
        "- *source cache*: {}",
        if a.source_cache == SourceCache::Cold {
            "the source image is dropped from the page cache (`posix_fadvise(DONTNEED)`) before every run of every system (`--source-cache cold`), so each run reads it from the disk (here a virtual disk, which the host under this machine may still cache), as a source whose hypervisor opens the disk with `cache=none` does."
        } else {
            "left as the runs before left it (`--source-cache warm`): later runs may read the source image from the page cache."
        }
    )?;
    if a.source_read_iops > 0 {
        writeln!(o, "- *source disk*: the source side's servers (`ferry serve`, `qemu-nbd`) read the image's disk at most **{} times a second** (`--source-read-iops`; a cgroup's read-IOPS throttle), as a cloud volume's I/O budget allows; reads beyond it wait in the kernel, in order.", a.source_read_iops)?;
    }
    writeln!(o, "- *CPU s/GiB*: user+system CPU seconds of the source server and of the destination process during the run (from /proc/PID/stat), per GiB of disk size. ferry's destination figure includes its end-to-end verification (hashing the whole disk).")?;
    writeln!(o, "- *host CPU steal*: this machine is a virtual machine; `steal` in /proc/stat counts the time its host ran something else while one of our CPUs wanted to run. Read around every run and every miss (summed over the CPUs). A miss during which the host stole at least {:.0} ms counts as *disturbed by the host*: everything stalls then, the emulated link and both ends alike, whatever system runs. The tables' p99 includes every miss; the line under each table gives the p99 without the disturbed ones too.", steal::DISTURBED_MS)?;
    writeln!(o)?;

    for case in cases {
        let Some(per_img) = results.get(case.id) else {
            continue;
        };
        writeln!(o, "### {}", case.link.describe())?;
        writeln!(o)?;
        for img in images {
            let Some(per_sys) = per_img.get(&img.id) else {
                continue;
            };
            writeln!(o, "#### image `{}` ({} MiB)", img.id, img.size >> 20)?;
            writeln!(o)?;
            writeln!(o, "| system | first read (s) | whole disk (s) | wire (MiB) | link use | 4 KiB misses p50 / p99 (ms) [n, local] | CPU s/GiB source / destination |")?;
            writeln!(o, "|---|---|---|---|---|---|---|")?;
            let gib = img.size as f64 / (1u64 << 30) as f64;
            let rate = case.link.rate_mbit * 1e6;
            for (sys, rs) in per_sys {
                let first: Vec<f64> = rs.iter().filter_map(|r| r.t_first).collect();
                let wire: Vec<f64> = rs.iter().map(|r| r.wire_bytes as f64 / 1048576.0).collect();
                let util: Vec<f64> = rs
                    .iter()
                    .map(|r| r.wire_fwd_bytes as f64 * 8.0 / (r.t_complete * rate) * 100.0)
                    .collect();
                let misses: Vec<f64> = rs.iter().flat_map(|r| r.probes_ms.clone()).collect();
                let hits: usize = rs.iter().map(|r| r.probe_hits).sum();
                let cs: Vec<f64> = rs.iter().map(|r| r.cpu_src / gib).collect();
                let cd: Vec<f64> = rs.iter().map(|r| r.cpu_dst / gib).collect();
                let lat = if sys == "nbdcopy" {
                    "nothing served before the end".to_string()
                } else {
                    format!(
                        "{} / {} [{}, {}]",
                        percentile(&misses, 50.0)
                            .map(|v| format!("{v:.0}"))
                            .unwrap_or("–".into()),
                        percentile(&misses, 99.0)
                            .map(|v| format!("{v:.0}"))
                            .unwrap_or("–".into()),
                        misses.len(),
                        hits
                    )
                };
                // Capped runs: bytes up to the cap, link use over the capped time.
                let to_cap = if rs.iter().any(|r| r.capped) {
                    (" (until the cap)", " (over the capped time)")
                } else {
                    ("", "")
                };
                writeln!(
                    o,
                    "| {} | {} | {} | {}{} | {}%{} | {} | {} / {} |",
                    system_title(sys),
                    mmm(&first, 2),
                    whole_disk_cell(rs, img.alloc),
                    mmm(&wire, 0),
                    to_cap.0,
                    mmm(&util, 0),
                    to_cap.1,
                    lat,
                    mmm(&cs, 2),
                    mmm(&cd, 2)
                )?;
            }
            // Ratios ferry / peer.
            if let Some(f) = per_sys.get("ferry") {
                let fm = |g: &dyn Fn(&RunResult) -> Option<f64>, rs: &[RunResult]| {
                    median(&rs.iter().filter_map(g).collect::<Vec<_>>())
                };
                let mut rows = Vec::new();
                let mut bounds = false;
                for (peer, prs) in per_sys.iter().filter(|(s, _)| *s != "ferry") {
                    let ratio = |g: &dyn Fn(&RunResult) -> Option<f64>| match (fm(g, f), fm(g, prs))
                    {
                        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                        _ => "–".into(),
                    };
                    let whole = bounded_ratio(whole_median(f), whole_median(prs));
                    let wire = bounded_ratio(wire_median(f), wire_median(prs));
                    bounds |= [&whole, &wire].iter().any(|c| c.starts_with(['<', '>']));
                    let p99 = |rs: &[RunResult]| {
                        percentile(
                            &rs.iter()
                                .flat_map(|r| r.probes_ms.clone())
                                .collect::<Vec<_>>(),
                            99.0,
                        )
                    };
                    let lat_ratio = match (p99(f), p99(prs)) {
                        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                        _ => "–".into(),
                    };
                    rows.push(format!(
                        "| ferry / {} | {} | {} | {} | {} |",
                        peer,
                        ratio(&|r| r.t_first),
                        whole,
                        wire,
                        lat_ratio
                    ));
                }
                if !rows.is_empty() {
                    writeln!(o)?;
                    writeln!(o, "| ratio (medians; < 1 = ferry better) | first read | whole disk | wire bytes | miss p99 |")?;
                    writeln!(o, "|---|---|---|---|---|")?;
                    for r in rows {
                        writeln!(o, "{r}")?;
                    }
                    if bounds {
                        writeln!(o)?;
                        writeln!(o, "`< x`: the peer's median is only a lower bound (capped runs), so the true ratio is at most x.")?;
                    }
                }
            }
            // Link fidelity.
            let all: Vec<&RunResult> = per_sys.values().flatten().collect();
            let late = all.iter().map(|r| r.max_late_ms).fold(0.0, f64::max);
            let dq: u64 = all.iter().map(|r| r.drops_queue).sum();
            let dl: u64 = all.iter().map(|r| r.drops_loss).sum();
            writeln!(o)?;
            let lp: u64 = all.iter().map(|r| r.late_pkts).sum();
            let fp: u64 = all.iter().map(|r| r.fwd_pkts).sum();
            writeln!(
                o,
                "Link counters over these runs: {dq} packets tail-dropped at the bottleneck queue, {dl} lost to the configured loss; {lp} of {fp} packets ({:.3}%) were delivered more than 1 ms later than the model asked (worst {late:.1} ms since the link came up).",
                lp as f64 * 100.0 / fp.max(1) as f64
            )?;
            writeln!(o)?;
            writeln!(o, "{}", steal_line(per_sys))?;
            let notes: Vec<String> = per_sys
                .iter()
                .flat_map(|(s, rs)| {
                    rs.iter()
                        .enumerate()
                        .filter(|(_, r)| !r.note.is_empty())
                        .map(move |(i, r)| format!("{s} run {}: {}", i + 1, r.note))
                })
                .filter(|n| n.starts_with("ferry"))
                .collect();
            if !notes.is_empty() {
                writeln!(o)?;
                writeln!(o, "ferry's own status at the end: {}.", notes.join("; "))?;
            }
            if let Some(p) = plots.get(&(case.id.to_string(), img.id.clone())) {
                writeln!(o)?;
                write_plot_link(&mut o, case, img, p)?;
            }
            writeln!(o)?;
        }
    }

    writeln!(o, "### Exact commands")?;
    writeln!(o)?;
    writeln!(o, "```sh")?;
    writeln!(
        o,
        "# the link (per case; the bench does this itself, as instance \"bench\")"
    )?;
    writeln!(o, "cargo xtask wan up --rate-mbit 200 --rtt-ms 50 --queue-ms 50 [--loss 0.001 | --rtt-ms 150] --tcp-cc {}", a.tcp_cc)?;
    writeln!(o, "# ferry")?;
    writeln!(o, "ip netns exec ferry-wan-src ferry serve --disk IMG --listen {SRC_ADDR}:{FERRY_PORT} --identity SRC_ID --trust-peer DST_FP --link-mbit 200 --link-rtt-ms RTT")?;
    writeln!(o, "ip netns exec ferry-wan-dst ferry pull --source {SRC_ADDR}:{FERRY_PORT} --disk DST.img --nbd unix:NBD.sock --control CTL.sock --identity DST_ID --trust-peer SRC_FP --link-mbit 200 --link-rtt-ms RTT")?;
    writeln!(o, "# the peers' source")?;
    writeln!(
        o,
        "ip netns exec ferry-wan-src qemu-nbd -r -t -e 16 -f raw -b {SRC_ADDR} -p {NBD_PORT} IMG"
    )?;
    writeln!(o, "# stop-and-copy")?;
    writeln!(
        o,
        "ip netns exec ferry-wan-dst nbdcopy nbd://{SRC_ADDR}:{NBD_PORT} DST.img"
    )?;
    writeln!(
        o,
        "# lazy proxy (the prober stays connected: the scan runs only while a client is)"
    )?;
    writeln!(o, "TMPDIR=DIR ip netns exec ferry-wan-dst nbdkit -f -v -U NBD.sock --filter=scan --filter=cow nbd hostname={SRC_ADDR} port={NBD_PORT} {}", LAZY_PARAMS.join(" "))?;
    writeln!(o, "```")?;
    writeln!(o)?;
    writeln!(
        o,
        "Raw per-run figures: `target/bench/results{}.json` (not committed).",
        if a.quick { "-quick" } else { "" }
    )?;
    Ok(o)
}

/// What the report says about `--lazy-cap-secs`.
fn cap_text(cap_s: u64) -> String {
    if cap_s == 0 {
        return "no cap (`--lazy-cap-secs 0`): every run goes on until its disk is whole.".into();
    }
    format!("an nbdkit run whose scan has not finished {cap_s} s after launch (`--lazy-cap-secs {cap_s}`) is stopped there, probes included. Its whole disk is then shown as a lower bound, `> {cap_s}`, with the share of the image's allocated bytes that crossed the link by then (source→destination wire bytes, headers included, / bytes allocated in the image file); its wire bytes are those up to the cap, its link use is over the capped time, and a ratio against its median whole disk or wire bytes is an upper bound, `< x`.")
}

/// The whole-disk cell of one system: `mmm` of the runs, with capped runs
/// as lower bounds (`> 120.0`) and how much had crossed the link by then.
fn whole_disk_cell(rs: &[RunResult], alloc: u64) -> String {
    let whole: Vec<f64> = rs.iter().map(|r| r.t_complete).collect();
    let capped: Vec<&RunResult> = rs.iter().filter(|r| r.capped).collect();
    let Some(med) = median_index(&whole) else {
        return "–".into();
    };
    if capped.is_empty() {
        return mmm(&whole, 1);
    }
    let fig = |r: &RunResult| {
        let bound = if r.capped { "> " } else { "" };
        format!("{bound}{:.1}", r.t_complete)
    };
    let pct: Vec<f64> = capped
        .iter()
        .map(|r| r.wire_fwd_bytes as f64 * 100.0 / alloc.max(1) as f64)
        .collect();
    let (lo, hi) = pct.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &p| {
        (lo.min(p), hi.max(p))
    });
    let crossed = if capped.len() == 1 {
        format!("{hi:.0}% of the image's allocated bytes crossed the link")
    } else {
        format!("{lo:.0}–{hi:.0}% of the image's allocated bytes crossed the link")
    };
    if rs.len() == 1 {
        return format!("{} (capped; {crossed})", fig(&rs[0]));
    }
    // Capped runs sort last among equal times: the maximum is a bound then.
    let key = |r: &&RunResult| (r.t_complete, r.capped);
    let cmp = |a: &&RunResult, b: &&RunResult| {
        let (a, b) = (key(a), key(b));
        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
    };
    let min = rs.iter().min_by(cmp).map(fig).unwrap_or_default();
    let max = rs.iter().max_by(cmp).map(fig).unwrap_or_default();
    format!(
        "{} ({min}–{max}; {} of {} runs capped, {crossed})",
        fig(&rs[med]),
        capped.len(),
        rs.len()
    )
}

/// Median whole-disk time of some runs, and whether it is only a lower
/// bound (the median run was capped).
fn whole_median(rs: &[RunResult]) -> Option<(f64, bool)> {
    let whole: Vec<f64> = rs.iter().map(|r| r.t_complete).collect();
    median_index(&whole).map(|i| (rs[i].t_complete, rs[i].capped))
}

/// Median wire bytes of some runs, and whether it is only a lower bound
/// (some run was capped, so its bytes are too).
fn wire_median(rs: &[RunResult]) -> Option<(f64, bool)> {
    let wire: Vec<f64> = rs.iter().map(|r| r.wire_bytes as f64).collect();
    median(&wire).map(|m| (m, rs.iter().any(|r| r.capped)))
}

/// x / y of two (value, is a lower bound) figures: `< r` when only y is a
/// lower bound, `> r` when only x is; no figure when both are.
fn bounded_ratio(x: Option<(f64, bool)>, y: Option<(f64, bool)>) -> String {
    match (x, y) {
        (Some((x, xl)), Some((y, yl))) if y > 0.0 => match (xl, yl) {
            (false, false) => format!("{:.2}", x / y),
            (false, true) => format!("< {:.2}", x / y),
            (true, false) => format!("> {:.2}", x / y),
            (true, true) => "– (both capped)".into(),
        },
        _ => "–".into(),
    }
}

/// The markdown image of one plot, and its one-line caption.
fn write_plot_link(o: &mut String, case: &Case, img: &Image, p: &plot::Written) -> Result<()> {
    writeln!(
        o,
        "![{} / `{}`: 4 KiB miss latency and MiB delivered over time]({})",
        case.id, img.id, p.link
    )?;
    writeln!(o)?;
    let runs: Vec<String> = p
        .runs
        .iter()
        .map(|(s, i, n)| format!("{s} run {} of {n}", i + 1))
        .collect();
    writeln!(
        o,
        "*Plot: top, latency (ms, log scale) of each 4 KiB read that missed, against time since the destination was launched (s); bottom, MiB delivered over the link source → destination against the same time. Per system one run, the one whose whole-disk time is the median of its runs (a capped run ends at the cap): {}.*",
        runs.join(", ")
    )?;
    Ok(())
}

/// Replaces our section of BENCHMARKS.md (between the markers), keeping
/// everything else in the file.
fn write_section(path: &Path, section: &str, body: &str) -> Result<()> {
    let (mark_begin, mark_end) = markers(section);
    let (mark_begin, mark_end) = (mark_begin.as_str(), mark_end.as_str());
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{mark_begin}\n{body}{mark_end}\n");
    // Put `section` at byte `at` of the file, replacing up to `until`.
    let splice = |at: usize, until: usize| {
        let rest = old[until..].trim_start_matches('\n');
        let sep = if rest.is_empty() { "" } else { "\n" };
        format!("{}{section}{sep}{rest}", &old[..at])
    };
    let (_, main_end) = markers("");
    let new = match (old.find(mark_begin), old.find(mark_end)) {
        (Some(b), Some(e)) if e > b => splice(b, e + mark_end.len()),
        _ if old.trim().is_empty() => format!("# Benchmarks\n\n{section}"),
        // A new named section goes right after the main WAN section;
        // without one, above the newest (first) section of ours, so the
        // sections stay newest first above what other tools wrote.
        _ => match (old.find(&main_end), old.find(SECTION_BEGIN)) {
            (Some(e), _) => {
                let at = e + main_end.len();
                let at = at + old[at..].len() - old[at..].trim_start_matches('\n').len();
                let rest = &old[at..];
                let sep = if rest.is_empty() { "" } else { "\n" };
                format!("{}\n{section}{sep}{rest}", old[..at].trim_end_matches('\n'))
            }
            (None, Some(b)) => format!("{}\n\n{section}\n{}", old[..b].trim_end(), &old[b..]),
            (None, None) => format!("{}\n\n{section}", old.trim_end()),
        },
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steal_line_leaves_out_only_misses_the_host_disturbed() {
        let mut per_sys = BTreeMap::new();
        per_sys.insert(
            "ferry".to_string(),
            vec![RunResult {
                probe_series: vec![
                    (1.0, 60.0, true, 0.0),
                    (1.2, 300.0, true, 150.0),
                    (1.4, 3.0, false, 40.0),
                    (1.6, 70.0, true, 10.0),
                ],
                host_stolen_ms: 400.0,
                ..RunResult::default()
            }],
        );
        per_sys.insert(
            "nbdcopy".to_string(),
            vec![RunResult {
                host_stolen_ms: 100.0,
                ..RunResult::default()
            }],
        );
        assert_eq!(
            steal_line(&per_sys),
            "Host CPU steal over these 2 runs: 0.5 s in all. Misses during which the host \
             stole ≥ 20 ms: ferry 1 of 3 misses disturbed, p99 of the others 70 ms."
        );
    }

    #[test]
    fn a_quick_run_never_writes_the_main_section() {
        assert_eq!(report_section(true, ""), QUICK_SECTION);
        assert_ne!(markers(report_section(true, "")), markers(""));
        assert_eq!(report_section(false, ""), "");
        assert_eq!(report_section(true, "ab"), "ab");
        assert_eq!(report_section(false, "ab"), "ab");
    }

    #[test]
    fn sections_keep_the_rest_of_the_file() {
        let p = std::env::temp_dir().join(format!("bench-md-{}.md", std::process::id()));
        let _ = std::fs::remove_file(&p);
        write_section(&p, "", "main v1\n").unwrap();
        let other = "## ublk in a VM\n\nnot ours\n";
        let t = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("{t}{other}")).unwrap();
        write_section(&p, "extra", "extra v1\n").unwrap();
        write_section(&p, "", "main v2\n").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        let (m, x, o) = (
            t.find("main v2").unwrap(),
            t.find("extra v1").unwrap(),
            t.find("not ours").unwrap(),
        );
        assert!(m < x && x < o, "{t}");
        assert!(!t.contains("main v1"), "{t}");
        assert!(t.starts_with("# Benchmarks\n"), "{t}");
        assert!(t.contains("-->\n\n## ublk in a VM"), "{t}");
    }

    #[test]
    fn a_prebuilt_binary_is_named_without_its_directory() {
        assert_eq!(
            prebuilt_label("29f3fe3", Path::new("/srv/builds/ferry-bench-29f3fe3")),
            "29f3fe3 (prebuilt binary ferry-bench-29f3fe3, FERRY_BIN)"
        );
        assert_eq!(
            prebuilt_label("?", Path::new("ferry")),
            "? (prebuilt binary ferry, FERRY_BIN)"
        );
    }

    #[test]
    fn without_a_main_section_a_new_section_goes_above_the_newest() {
        let p = std::env::temp_dir().join(format!("bench-md-nomain-{}.md", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let (old_begin, old_end) = markers("older");
        let head = "# Benchmarks\n\n## Method\n\nhow\n\n## Summary\n\nlatest\n";
        let tail = "## ublk in a VM\n\nnot ours\n";
        std::fs::write(
            &p,
            format!("{head}\n{old_begin}\nolder v1\n{old_end}\n\n{tail}"),
        )
        .unwrap();
        write_section(&p, "newer", "newer v1\n").unwrap();
        write_section(&p, "", "main v1\n").unwrap();
        write_section(&p, "older", "older v2\n").unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        let at = |s: &str| t.find(s).unwrap_or_else(|| panic!("no {s:?} in {t}"));
        assert!(t.starts_with(head), "{t}");
        assert!(at("latest") < at("main v1"), "{t}");
        assert!(at("main v1") < at("newer v1"), "{t}");
        assert!(at("newer v1") < at("older v2"), "{t}");
        assert!(at("older v2") < at("not ours"), "{t}");
        assert!(!t.contains("older v1"), "{t}");
        assert!(t.ends_with(&format!("{old_end}\n\n{tail}")), "{t}");
    }

    fn run(t: f64, capped: bool, fwd: u64) -> RunResult {
        RunResult {
            t_first: Some(0.5),
            t_complete: t,
            capped,
            wire_bytes: fwd + (fwd >> 5),
            wire_fwd_bytes: fwd,
            ..RunResult::default()
        }
    }

    #[test]
    fn capped_runs_are_lower_bounds() {
        let free = [run(30.0, false, 1), run(10.0, false, 1)];
        assert_eq!(whole_disk_cell(&free, 100), mmm(&[30.0, 10.0], 1));
        assert_eq!(
            whole_disk_cell(&[run(120.0, true, 43)], 100),
            "> 120.0 (capped; 43% of the image's allocated bytes crossed the link)"
        );
        let mixed = [
            run(120.0, true, 40),
            run(100.0, false, 99),
            run(120.0, true, 45),
        ];
        assert_eq!(
            whole_disk_cell(&mixed, 100),
            "> 120.0 (100.0–> 120.0; 2 of 3 runs capped, 40–45% of the image's allocated bytes crossed the link)"
        );
        let one = [
            run(100.0, false, 99),
            run(120.0, true, 45),
            run(90.0, false, 99),
        ];
        assert!(whole_disk_cell(&one, 100).starts_with("100.0 (90.0–> 120.0; 1 of 3"));
        assert_eq!(whole_median(&one), Some((100.0, false)));
        assert_eq!(whole_median(&mixed), Some((120.0, true)));
        assert_eq!(
            bounded_ratio(Some((30.0, false)), Some((120.0, true))),
            "< 0.25"
        );
        assert_eq!(
            bounded_ratio(Some((30.0, false)), Some((60.0, false))),
            "0.50"
        );
        assert_eq!(
            bounded_ratio(Some((30.0, true)), Some((60.0, false))),
            "> 0.50"
        );
        assert_eq!(
            bounded_ratio(Some((30.0, true)), Some((60.0, true))),
            "– (both capped)"
        );
        assert_eq!(bounded_ratio(None, Some((60.0, false))), "–");
    }

    #[test]
    fn the_report_shows_caps_and_links_the_plot() {
        let a = BenchArgs {
            quick: true,
            runs: None,
            size_mib: None,
            systems: vec!["ferry".into(), "nbdkit-lazy".into()],
            cases: None,
            images: vec!["fs".into()],
            tcp_cc: "bbr".into(),
            probes: 20,
            probe_gap_ms: 150,
            timeout_s: 900,
            lazy_cap_s: 120,
            source_cache: SourceCache::Cold,
            source_read_iops: 0,
            out: None,
            section: String::new(),
            ferry_serve_args: Vec::new(),
            dedup: false,
            live: false,
            writer_rates: vec![0, 4, 16],
            live_parts: vec!["writer".into()],
            precopy_cap_secs: 120,
            live_shared_cpus: false,
            mirror_cap_secs: 0,
            two_disks: false,
            two_disks_rate_mbit: 100,
        };
        let cases = vec![Case {
            id: "base",
            link: LinkOpts::default(),
        }];
        let images = vec![Image {
            id: "fs".into(),
            path: PathBuf::from("/nonexistent"),
            size: 256 << 20,
            alloc: 100 << 20,
            desc: "test".into(),
            probes: vec![],
        }];
        let mut results = Results::new();
        let per_sys = results
            .entry("base".into())
            .or_default()
            .entry("fs".into())
            .or_default();
        per_sys.insert("ferry".into(), vec![run(30.0, false, 100 << 20)]);
        per_sys.insert("nbdkit-lazy".into(), vec![run(120.0, true, 43 << 20)]);
        let mut plots = Plots::new();
        plots.insert(
            ("base".into(), "fs".into()),
            plot::Written {
                link: "docs/plots/bench-base-fs-quick.png".into(),
                runs: vec![("ferry".into(), 0, 1), ("nbdkit-lazy".into(), 0, 1)],
            },
        );
        let md = render(
            &a,
            1,
            &cases,
            &images,
            &results,
            &plots,
            "now",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(
            md.contains(
                "| > 120.0 (capped; 43% of the image's allocated bytes crossed the link) |"
            ),
            "{md}"
        );
        assert!(md.contains("% (over the capped time) |"), "{md}");
        assert!(
            md.contains("| ferry / nbdkit-lazy | 1.00 | < 0.25 | < "),
            "{md}"
        );
        assert!(
            md.contains("](docs/plots/bench-base-fs-quick.png)\n\n*Plot: top, latency"),
            "{md}"
        );
        assert!(
            md.contains("ferry run 1 of 1, nbdkit-lazy run 1 of 1"),
            "{md}"
        );
        assert!(
            md.contains("before every run of every system (`--source-cache cold`)"),
            "{md}"
        );
    }
}
