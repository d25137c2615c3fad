//! `cargo xtask vm-bench`: in the same kind of VM as `vm-test`, copies a
//! random-data disk with `ferry pull --ublk` until every block is present,
//! then measures it with fio against the kernel's loop device over the same
//! backing file, and writes the medians and ratios into BENCHMARKS.md
//! (section "## ublk in a VM"; the rest of the file is left alone).
//!
//! Not a timed test: under TCG the absolute numbers are far below real
//! hardware; the ratio is what the benchmark is for.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{build_ferry, fixtures, run_vm, workspace_root, MachineOpts, VmOptions};

const SECTION: &str = "## ublk in a VM";
const SCRIPT: &str = "scripts/vm/bench-ublk.sh";

/// Options of `cargo xtask vm-bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct VmBenchArgs {
    /// fio runs of each workload on each device (medians are reported; at
    /// least 3; more runs resist a busy host better).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Seconds per fio run (after 1 s of ramp-up).
    #[arg(long, default_value_t = 5)]
    runtime_secs: u32,
    /// Size of the disk (random data), in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// `ferry pull --queues`.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// `ferry pull --depth`.
    #[arg(long, default_value_t = 64)]
    depth: u16,
    /// The file to write the section into (created if absent).
    #[arg(long = "out", alias = "output", default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// Print the results without writing them.
    #[arg(long)]
    no_write: bool,
    #[command(flatten)]
    machine: MachineOpts,
}

/// One fio result from a `FERRY-BENCH` line.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    dev: String,
    workload: String,
    iops: f64,
    bw_kib: f64,
}

/// Parses `dev=ublk workload=randread-4k-qd32 run=1 iops=2630 bw_kib=10523`;
/// lines of another kind (`info ...`) give `None`.
fn parse_sample(line: &str) -> Option<Sample> {
    let kv: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    Some(Sample {
        dev: kv.get("dev")?.to_string(),
        workload: kv.get("workload")?.to_string(),
        iops: kv.get("iops")?.parse().ok()?,
        bw_kib: kv.get("bw_kib")?.parse().ok()?,
    })
}

/// The median of some runs (see [`crate::stats`]); NaN for none.
fn median(values: &[f64]) -> f64 {
    crate::stats::median(values).unwrap_or(f64::NAN)
}

/// A workload's figures: per device, every run and the median.
#[derive(Debug)]
struct Row {
    workload: String,
    /// IOPS for random reads, MiB/s for sequential ones.
    unit: &'static str,
    ublk: Vec<f64>,
    ublk_median: f64,
    loop_: Vec<f64>,
    loop_median: f64,
    /// The same through `ublk-mem --file` over a copy of the backing file (the
    /// ublk frontend without ferry's engine), when measured.
    frontend: Vec<f64>,
    frontend_median: f64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ublk_median / self.loop_median
    }
}

fn rows(samples: &[Sample], runs: u32) -> Result<Vec<Row>> {
    let mut workloads: Vec<&str> = Vec::new();
    for s in samples {
        if !workloads.contains(&s.workload.as_str()) {
            workloads.push(&s.workload);
        }
    }
    let mut rows = Vec::new();
    for w in workloads {
        let seq = w.starts_with("seq");
        let value = |s: &Sample| if seq { s.bw_kib / 1024.0 } else { s.iops };
        let of = |dev: &str| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.workload == w && s.dev == dev)
                .map(value)
                .collect()
        };
        let (ublk, loop_, frontend) = (of("ublk"), of("loop"), of("ublk-mem-file"));
        if ublk.len() < runs as usize || loop_.len() < runs as usize {
            bail!(
                "{w}: {} ublk and {} loop runs, expected {runs} each",
                ublk.len(),
                loop_.len()
            );
        }
        let (ublk_runs, loop_runs, frontend_runs) = (ublk.clone(), loop_.clone(), frontend.clone());
        rows.push(Row {
            workload: w.to_string(),
            unit: if seq { "MiB/s" } else { "IOPS" },
            ublk_median: median(&ublk),
            loop_median: median(&loop_),
            frontend_median: median(&frontend),
            ublk: ublk_runs,
            loop_: loop_runs,
            frontend: frontend_runs,
        });
    }
    if rows.is_empty() {
        bail!("the VM reported no measurement");
    }
    Ok(rows)
}

fn describe_workload(w: &str) -> String {
    match w {
        "randread-4k-qd32" => "4 KiB random read, QD32".to_string(),
        "seqread-1m-qd8" => "1 MiB sequential read, QD8".to_string(),
        other => other.to_string(),
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The section's text (heading included, ending with a blank line).
fn render(rows: &[Row], args: &VmBenchArgs, info: &BTreeMap<String, String>) -> String {
    let get = |k: &str| info.get(k).map_or("?", String::as_str);
    let mut s = String::new();
    s.push_str(SECTION);
    s.push_str("\n\n");
    s.push_str(&format!(
        "Command: `cargo xtask vm-bench` (`--runs {} --runtime-secs {} --size-mib {} --queues {} --depth {}`), {}, commit {}.\n\n",
        args.runs, args.runtime_secs, args.size_mib, args.queues, args.depth,
        get("date"), get("commit"),
    ));
    s.push_str(&format!(
        "Machine: host {} ({} cores, kernel {}); guest: {} under **TCG software emulation** \
         (no KVM on this host), {} vCPUs ({}), {} MiB, kernel {}. TCG makes every absolute \
         number here far slower than real hardware (each guest instruction is translated); \
         only the ratio, measured on the same emulated machine, means something.\n\n",
        get("host_cpu"),
        get("host_cores"),
        get("host_kernel"),
        get("qemu"),
        args.machine.smp,
        get("guest_cpu"),
        args.machine.memory_mib,
        get("guest_kernel"),
    ));
    s.push_str(&format!(
        "Setup, all inside the VM: `ferry serve` exports a {} MiB random-data image (a read-only \
         virtio disk) on 127.0.0.1; `ferry pull --ublk --queues {} --depth {}` copies it into a \
         backing file on tmpfs until `ferry status` says complete and verified (every block \
         present, nothing fetched during the measurement). Then fio ({}, libaio, O_DIRECT, \
         {} s after 1 s ramp-up, one job) reads `/dev/ublkb0` and `/dev/loopN` \
         (`losetup -r`, default buffered mode) over the same backing file, alternating \
         devices run by run; medians of {} runs. ublk data path of `ferry pull`: {} \
         (`UBLK_F_USER_COPY` = 0x80: a READ of present blocks in the page cache is one `pwrite` from the \
         backing file's mapping to `/dev/ublkc0`, one copy, and one not in it an io_uring read on the \
         queue's ring plus a `pwrite`; without it, a pread into the \
         tag's buffer and the driver's copy out of it). Reference: the `ublk-mem` example \
         serving a copy of the file on the same tmpfs (`--file`, 1 queue, depth 64; the pull holds the file's lock) as `/dev/ublkb1`: ferry's ublk \
         frontend (ferry-ublk) with a plain file device behind it (the same single-copy \
         read), without ferry's engine.\n\n",
        args.size_mib,
        args.queues,
        args.depth,
        get("fio"),
        args.runtime_secs,
        args.runs,
        get("ublk_data_path"),
    ));
    let frontend = rows.iter().any(|r| !r.frontend.is_empty());
    s.push_str("| workload | ferry `/dev/ublkb0` | loop `/dev/loopN` | ferry / loop |");
    if frontend {
        s.push_str(" reference: `ublk-mem --file` (ublk frontend alone) vs loop |");
    }
    s.push_str(if frontend {
        "\n|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|\n"
    });
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| fmt_value(*x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in rows {
        s.push_str(&format!(
            "| {} | {} {} (runs: {}) | {} {} (runs: {}) | **{:.2}x** |",
            describe_workload(&r.workload),
            fmt_value(r.ublk_median),
            r.unit,
            runs(&r.ublk),
            fmt_value(r.loop_median),
            r.unit,
            runs(&r.loop_),
            r.ratio(),
        ));
        if frontend {
            s.push_str(&format!(
                " {} {} (runs: {}): {:.2}x |",
                fmt_value(r.frontend_median),
                r.unit,
                runs(&r.frontend),
                r.frontend_median / r.loop_median,
            ));
        }
        s.push('\n');
    }
    let goal: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                describe_workload(&r.workload),
                if r.ratio() >= 0.8 {
                    "meets it"
                } else {
                    "does not"
                }
            )
        })
        .collect();
    s.push_str(&format!(
        "\nGoal: ferry at or above 0.8x of loop. {}.\n\n",
        goal.join("; ")
    ));
    s
}

/// `text` with the section replaced (or appended); other sections kept.
/// The `info KEY=VALUE` lines of a VM's `FERRY-BENCH` output.
pub(super) fn guest_info(bench: &[String]) -> BTreeMap<String, String> {
    bench
        .iter()
        .filter_map(|line| line.strip_prefix("info "))
        .filter_map(|rest| rest.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Writes `section` (headed `heading`) into `output` (relative to the
/// workspace), keeping the file's other sections; returns the path.
pub(super) fn write_section(output: &Path, heading: &str, section: &str) -> Result<PathBuf> {
    let path = if output.is_absolute() {
        output.to_path_buf()
    } else {
        workspace_root().join(output)
    };
    // Read just before writing: another section may have changed meanwhile.
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    fs::write(&path, replace_named_section(&text, heading, section))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
fn replace_section(text: &str, section: &str) -> String {
    replace_named_section(text, SECTION, section)
}

/// Replaces the section headed `heading` (a `## ` line) of `text` with
/// `section`, or appends it; the rest of the text is kept.
pub(super) fn replace_named_section(text: &str, heading: &str, section: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == heading);
    let Some(start) = start else {
        let mut out = if text.trim().is_empty() {
            "# Benchmarks\n\n".to_string()
        } else {
            let mut t = text.trim_end().to_string();
            t.push_str("\n\n");
            t
        };
        out.push_str(section);
        return out;
    };
    // The section ends at the next heading or another tool's marker, not
    // at a `# ` line inside a code block.
    let mut fenced = false;
    let end = lines[start + 1..]
        .iter()
        .position(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced && (l.starts_with("## ") || l.starts_with("# ") || l.starts_with("<!-- "))
        })
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = String::new();
    for l in &lines[..start] {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(section);
    for l in &lines[end..] {
        out.push_str(l);
        out.push('\n');
    }
    let mut out = out.trim_end().to_string();
    out.push('\n');
    out
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn host_info(root: &Path) -> BTreeMap<String, String> {
    let mut info = BTreeMap::new();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .map(|r| r.trim_start_matches([' ', '\t', ':']))
    }) {
        info.insert("host_cpu".into(), model.trim().to_string());
    }
    if let Some(n) = command_line("nproc", &[]) {
        info.insert("host_cores".into(), n);
    }
    if let Some(k) = command_line("uname", &["-r"]) {
        info.insert("host_kernel".into(), k);
    }
    if let Some(v) = command_line("qemu-system-x86_64", &["--version"]) {
        let first = v.lines().next().unwrap_or_default();
        let version = first
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or(first);
        info.insert("qemu".into(), format!("QEMU {version}"));
    }
    if let Some(d) = command_line("date", &["-u", "+%Y-%m-%d"]) {
        info.insert("date".into(), d);
    }
    if let Some(c) = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
    {
        info.insert(
            "commit".into(),
            String::from_utf8_lossy(&c.stdout).trim().to_string(),
        );
    }
    info
}

/// Runs the benchmark.
pub(crate) fn vm_bench(args: &VmBenchArgs) -> Result<()> {
    if args.runs < 3 {
        bail!("--runs must be at least 3 (medians of at least 3 runs)");
    }
    let opts = VmOptions::for_machine(args.machine.clone().with_default_timeout(900));
    let env = vec![
        format!("BENCH_RUNS={}", args.runs),
        format!("BENCH_RUNTIME={}", args.runtime_secs),
        format!("BENCH_QUEUES={}", args.queues),
        format!("BENCH_DEPTH={}", args.depth),
    ];
    let outcome = run_vm(&opts, &[PathBuf::from(SCRIPT)], |root, cache| {
        Ok(super::Prepared {
            binaries: vec![build_ferry(root)?, super::build_example(root)?],
            drives: vec![fixtures::bench_fixture(
                &cache.join("bench-fixtures"),
                args.size_mib,
            )?],
            includes: Vec::new(),
            env,
        })
    })?;
    outcome.finish("vm-bench")?;

    let report = &outcome.vm.report;
    let samples: Vec<Sample> = report
        .bench
        .iter()
        .filter_map(|l| parse_sample(l))
        .collect();
    let rows = rows(&samples, args.runs)?;
    let root = workspace_root();
    let mut info = host_info(&root);
    info.extend(guest_info(&report.bench));
    let section = render(&rows, args, &info);
    println!("\n{section}");
    if args.no_write {
        return Ok(());
    }
    let path = write_section(&args.output, SECTION, &section)?;
    println!(
        "vm-bench: wrote section \"{SECTION}\" of {}",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_others_are_ignored() {
        let s = parse_sample("dev=ublk workload=randread-4k-qd32 run=2 iops=2630 bw_kib=10523")
            .unwrap();
        assert_eq!(s.dev, "ublk");
        assert_eq!(s.iops, 2630.0);
        assert!(parse_sample("info guest_cpu=QEMU").is_none());
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
        let mk = |dev: &str, w: &str, iops: f64, bw: f64| Sample {
            dev: dev.into(),
            workload: w.into(),
            iops,
            bw_kib: bw,
        };
        let samples = vec![
            mk("ublk", "randread-4k-qd32", 80.0, 0.0),
            mk("loop", "randread-4k-qd32", 100.0, 0.0),
            mk("ublk", "randread-4k-qd32", 90.0, 0.0),
            mk("loop", "randread-4k-qd32", 100.0, 0.0),
            mk("ublk", "randread-4k-qd32", 70.0, 0.0),
            mk("loop", "randread-4k-qd32", 120.0, 0.0),
            mk("ublk", "seqread-1m-qd8", 1.0, 2048.0),
            mk("loop", "seqread-1m-qd8", 1.0, 1024.0),
        ];
        let r = rows(&samples[..6], 3).unwrap();
        assert_eq!(r[0].ublk_median, 80.0);
        assert!((r[0].ratio() - 0.8).abs() < 1e-9);
        let r = rows(&samples, 1).unwrap();
        assert_eq!(r[1].unit, "MiB/s");
        assert_eq!(r[1].ratio(), 2.0);
        // The sequential workload has one run of each, not three.
        assert!(rows(&samples, 3).is_err());
    }

    #[test]
    fn the_section_is_replaced_and_others_kept() {
        let new = format!("{SECTION}\n\nnew figures\n\n");
        assert_eq!(replace_section("", &new), format!("# Benchmarks\n\n{new}"));
        let text =
            format!("# Benchmarks\n\n## WAN\n\nwan figures\n\n{SECTION}\n\nold\n\n## Later\n\nx\n");
        let out = replace_section(&text, &new);
        assert_eq!(
            out,
            format!("# Benchmarks\n\n## WAN\n\nwan figures\n\n{SECTION}\n\nnew figures\n\n## Later\n\nx\n")
        );
        let fenced =
            format!("{SECTION}\n\nold\n```sh\n# comment\n```\nold\n<!-- BEGIN other -->\nx\n");
        assert_eq!(
            replace_section(&fenced, &new),
            format!("{new}<!-- BEGIN other -->\nx\n")
        );
        let appended = replace_section("# Benchmarks\n\n## WAN\n\nw\n", &new);
        assert!(appended.ends_with(&new), "{appended}");
        assert!(appended.contains("## WAN\n\nw\n\n## ublk"));
    }
}
