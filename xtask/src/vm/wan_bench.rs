//! `cargo xtask vm-wan-bench`: ferry through the real ublk driver, over the
//! emulated WAN. The source stays on the host: `ferry serve` on 127.0.0.1
//! behind the UDP relay (the link model of `cargo xtask wan`; 200 Mbit/s,
//! 50 ms by default). The VM (QEMU user networking: the host is 10.0.2.2)
//! runs `scripts/vm/wan-ublk.sh`, which starts `ferry pull --ublk` against
//! the relay once per run and times 4 KiB `O_DIRECT` reads of
//! `/dev/ublkb0`: the first one from launch, then reads of absent blocks
//! while the background copy runs, and the whole copy. Writes the medians
//! into BENCHMARKS.md (section "## ublk in a VM over the emulated WAN").
//!
//! Not comparable with the NBD rows of `cargo xtask bench` as such: the
//! guest runs under TCG (every instruction translated, so ferry's CPU work
//! is far slower than on the host) and QEMU's user-mode network stack sits
//! between the guest and the link. What it shows is the whole path of a
//! migrated disk as a guest sees it: block layer, ublk driver, ferry,
//! QUIC over a WAN.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::{build_ferry, run_vm, workspace_root, MachineOpts, Prepared, VmOptions};
use crate::stats::mmm;
use crate::wan::procs::{self, FerryIds, Proc};
use crate::wan::relay::Relay;
use crate::wan::LinkOpts;

const SECTION: &str = "## ublk in a VM over the emulated WAN";
const SCRIPT: &str = "scripts/vm/wan-ublk.sh";

/// Options of `cargo xtask vm-wan-bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct VmWanBenchArgs {
    /// Runs, each a fresh `ferry pull` (medians are reported; at least 3).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Size of the random-data disk, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// 4 KiB reads of absent blocks per run, while the copy runs.
    #[arg(long, default_value_t = 20)]
    probes: u32,
    #[command(flatten)]
    link: LinkOpts,
    /// The file to write the section into (created if absent).
    #[arg(long = "out", alias = "output", default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// Print the results without writing them.
    #[arg(long)]
    no_write: bool,
    #[command(flatten)]
    machine: MachineOpts,
}

/// What one run measured.
#[derive(Debug, Default, Clone, PartialEq)]
struct Run {
    first_read_ms: f64,
    read_ms: f64,
    local_ms: f64,
    probes_ms: Vec<f64>,
    whole_disk_s: f64,
    wire_rx_bytes: f64,
    on_demand_bytes: f64,
    size_bytes: f64,
}

/// The `key=value` words of a `wan run=N ...` line.
fn words(line: &str) -> Option<(u32, BTreeMap<&str, f64>)> {
    let rest = line.strip_prefix("wan ")?;
    let mut run = None;
    let mut kv = BTreeMap::new();
    for w in rest.split_whitespace() {
        let (k, v) = w.split_once('=')?;
        if k == "run" {
            run = v.parse().ok();
        } else {
            kv.insert(k, v.parse().ok()?);
        }
    }
    Some((run?, kv))
}

/// Gathers the `FERRY-BENCH wan ...` lines into runs; other lines are
/// ignored. Fails if a run lacks a figure.
fn parse_runs(lines: &[String], runs: u32) -> Result<Vec<Run>> {
    let mut out: BTreeMap<u32, Run> = BTreeMap::new();
    for line in lines {
        let Some((n, kv)) = words(line) else {
            continue;
        };
        let r = out.entry(n).or_default();
        for (k, v) in kv {
            match k {
                "first_read_ms" => r.first_read_ms = v,
                "read_ms" => r.read_ms = v,
                "local_ms" => r.local_ms = v,
                "probe_ms" => r.probes_ms.push(v),
                "whole_disk_s" => r.whole_disk_s = v,
                "wire_rx_bytes" => r.wire_rx_bytes = v,
                "on_demand_bytes" => r.on_demand_bytes = v,
                "size_bytes" => r.size_bytes = v,
                _ => {}
            }
        }
    }
    ensure!(
        out.len() == runs as usize,
        "the VM reported {} runs, expected {runs}",
        out.len()
    );
    for (n, r) in &out {
        ensure!(
            r.first_read_ms > 0.0 && r.whole_disk_s > 0.0 && r.size_bytes > 0.0,
            "run {n} lacks a figure: {r:?}"
        );
    }
    Ok(out.into_values().collect())
}

fn median(v: &[f64]) -> f64 {
    crate::stats::median(v).unwrap_or(f64::NAN)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    crate::stats::percentile(v, p).unwrap_or(f64::NAN)
}

fn render(runs: &[Run], a: &VmWanBenchArgs, info: &BTreeMap<String, String>) -> String {
    let l = &a.link;
    let rtt = l.rtt_ms;
    let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let probes: Vec<f64> = runs.iter().flat_map(|r| r.probes_ms.clone()).collect();
    let size = runs[0].size_bytes;
    let wire: Vec<f64> = runs
        .iter()
        .map(|r| r.wire_rx_bytes / r.size_bytes)
        .collect();
    let rate_use: Vec<f64> = runs
        .iter()
        .map(|r| r.wire_rx_bytes * 8.0 / r.whole_disk_s / (l.rate_mbit * 1e6) * 100.0)
        .collect();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut s = format!("{SECTION}\n\n");
    s.push_str(&format!(
        "Command: `cargo xtask vm-wan-bench --runs {} --size-mib {} --probes {} --rate-mbit {} --rtt-ms {} --loss {}`, {}, commit {commit}.\n\n",
        a.runs,
        a.size_mib,
        a.probes,
        l.rate_mbit,
        l.rtt_ms,
        l.loss,
        chrono_date(),
    ));
    s.push_str(&format!(
        "Setup: the source stays on the host (`ferry serve` of a {:.0} MiB random-data image on 127.0.0.1, behind xtask's UDP relay: {} Mbit/s, {} ms RTT, {}% random loss, {} ms queue). \
         The guest, QEMU 7.2 under **TCG software emulation** ({}, kernel {}), reaches it over QEMU user networking at 10.0.2.2 and runs `ferry pull --ublk --link-mbit {} --link-rtt-ms {}` per run with an empty backing file on tmpfs. \
         Reads are 4 KiB `O_DIRECT` reads of `/dev/ublkb0` with GNU dd (dd's own timing): the guest's block layer, the ublk driver, ferry and QUIC over the WAN. \
         *First read*: from launching `ferry pull` to the first read of an absent block (the disk's last block) returning, by `/proc/uptime` (10 ms resolution; it includes starting dd, slow under TCG). \
         *Misses*: {} reads of absent blocks per run in the far 40% of the disk, 150 ms apart, while the copy runs; p50/p99 pool all runs (as in `cargo xtask bench`: the sample at index round(p/100 × (n − 1)) of the sorted values). \
         *Whole disk*: until `ferry status` says complete and verified. *Wire*: ferry's own count of UDP bytes received. TCG makes ferry's CPU work in the guest many times slower than on the host, so the whole-disk time and link use here are bounded by the emulated CPU, not by the link or by ferry: they are not comparable with the NBD rows above.\n\n",
        size / f64::from(1u32 << 20),
        l.rate_mbit,
        l.rtt_ms,
        l.loss * 100.0,
        l.queue_ms,
        info.get("guest_cpu").map_or("?", String::as_str),
        info.get("guest_kernel").map_or("?", String::as_str),
        l.rate_mbit,
        l.rtt_ms,
        a.probes,
    ));
    s.push_str("| figure | median (min–max) of runs | in RTTs |\n|---|---|---|\n");
    let first = col(|r| r.first_read_ms);
    s.push_str(&format!(
        "| first read from launch (ms) | {} | {:.1} |\n",
        mmm(&first, 0),
        median(&first) / rtt
    ));
    let read = col(|r| r.read_ms);
    s.push_str(&format!(
        "| that read alone (ms) | {} | {:.1} |\n",
        mmm(&read, 1),
        median(&read) / rtt
    ));
    let local = col(|r| r.local_ms);
    s.push_str(&format!(
        "| a read of a present block, after the copy (ms): the guest's floor under TCG | {} | {:.1} |\n",
        mmm(&local, 1),
        median(&local) / rtt
    ));
    let p50 = percentile(&probes, 50.0);
    let p99 = percentile(&probes, 99.0);
    s.push_str(&format!(
        "| 4 KiB misses during the copy, p50 / p99 (ms) [n] | {p50:.1} / {p99:.1} [{}] | {:.1} / {:.1} |\n",
        probes.len(),
        p50 / rtt,
        p99 / rtt
    ));
    s.push_str(&format!(
        "| whole disk (s) | {} | |\n",
        mmm(&col(|r| r.whole_disk_s), 1)
    ));
    s.push_str(&format!("| link use | {}% | |\n", mmm(&rate_use, 0)));
    s.push_str(&format!(
        "| wire bytes / disk bytes | {} | |\n",
        mmm(&wire, 3)
    ));
    s.push_str(&format!(
        "| fetched on demand (MiB) | {} | |\n\n",
        mmm(
            &runs
                .iter()
                .map(|r| r.on_demand_bytes / f64::from(1u32 << 20))
                .collect::<Vec<_>>(),
            1
        )
    ));
    s
}

fn chrono_date() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs the benchmark (see the module docs).
pub(crate) fn vm_wan_bench(a: &VmWanBenchArgs) -> Result<()> {
    if a.runs < 3 {
        bail!("--runs must be at least 3 (medians of at least 3 runs)");
    }
    if a.size_mib == 0 || a.size_mib * 2 > u64::from(a.machine.memory_mib) {
        bail!(
            "--size-mib {} must be above 0 and fit twice in the guest's {} MiB (the backing file is on tmpfs)",
            a.size_mib,
            a.machine.memory_mib
        );
    }
    let root = workspace_root();
    let dir = super::target_dir(&root).join("vm-wan-bench");
    fs::create_dir_all(&dir)?;
    let ferry = build_ferry(&root)?;
    let img = dir.join(format!("source-{}M.img", a.size_mib));
    if fs::metadata(&img).map(|m| m.len()).ok() != Some(a.size_mib << 20) {
        procs::write_random_file(&img, a.size_mib << 20, 0x77a1)?;
    }
    let ids = FerryIds::make(&ferry, &dir)?;
    let serve_port = procs::free_udp_port()?;
    let relay_port = procs::free_udp_port()?;
    let mut serve_cmd = Command::new(&ferry);
    serve_cmd
        .args(["serve", "--disk"])
        .arg(&img)
        .args(["--listen", &format!("127.0.0.1:{serve_port}"), "--identity"])
        .arg(&ids.src_dir)
        .args(["--trust-peer", &ids.dst_fp])
        .args([
            "--link-mbit",
            &a.link.rate_mbit.to_string(),
            "--link-rtt-ms",
            &a.link.rtt_ms.to_string(),
        ]);
    let mut serve = Proc::spawn("ferry serve", &mut serve_cmd, &dir.join("serve.log"))?;
    serve.wait_for_log("ferry serve: exporting", Duration::from_secs(120))?;
    let to: SocketAddr = format!("127.0.0.1:{serve_port}").parse()?;
    let listen: SocketAddr = format!("127.0.0.1:{relay_port}").parse()?;
    let relay = Relay::start(listen, to, &a.link)?;

    let mut opts = VmOptions::for_machine(a.machine.clone().with_default_timeout(1500));
    opts.net = true;
    let env = vec![
        format!("WAN_SOURCE=10.0.2.2:{relay_port}"),
        format!("WAN_FP_SRC={}", ids.src_fp),
        format!("WAN_RUNS={}", a.runs),
        format!("WAN_PROBES={}", a.probes),
        format!("WAN_MBIT={}", a.link.rate_mbit),
        format!("WAN_RTT_MS={}", a.link.rtt_ms),
    ];
    let includes = vec![ids.dst_dir.join("cert.der"), ids.dst_dir.join("key.der")];
    let outcome = run_vm(&opts, &[PathBuf::from(SCRIPT)], |_, _| {
        Ok(Prepared {
            binaries: vec![ferry.clone()],
            drives: Vec::new(),
            includes,
            env,
        })
    })?;
    let stats = relay.stats();
    drop(relay);
    serve
        .check_running()
        .context("ferry serve died during the benchmark")?;
    drop(serve);
    outcome.finish("vm-wan-bench")?;

    let report = &outcome.vm.report;
    let runs = parse_runs(&report.bench, a.runs)?;
    let info: BTreeMap<String, String> = super::bench::guest_info(&report.bench)
        .into_iter()
        .map(|(k, v)| (k, v.replace('_', " ")))
        .collect();
    let mut section = render(&runs, a, &info);
    section.push_str(&format!(
        "The relay's own counters over all runs: {} B forwarded to the destination, {} packets dropped by its loss model, {} by its queue.\n",
        crate::wan::counter(&stats, "to_client", "forwarded_bytes"),
        crate::wan::counter(&stats, "to_client", "dropped_loss_pkts"),
        crate::wan::counter(&stats, "to_client", "dropped_queue_pkts"),
    ));
    println!("\n{section}");
    if a.no_write {
        return Ok(());
    }
    let path = super::bench::write_section(&a.output, SECTION, &section)?;
    println!(
        "vm-wan-bench: wrote section \"{SECTION}\" of {}",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_gathered_from_the_bench_lines() {
        let lines: Vec<String> = [
            "info guest_kernel=6.1",
            "wan run=1 first_read_ms=480 read_ms=120.5",
            "wan run=1 probe_ms=101.2",
            "wan run=1 probe_ms=99.0",
            "wan run=1 whole_disk_s=40.5 wire_rx_bytes=280000000 on_demand_bytes=131072 size_bytes=268435456",
            "wan run=2 first_read_ms=500 read_ms=110",
            "wan run=2 whole_disk_s=41 wire_rx_bytes=1 on_demand_bytes=0 size_bytes=268435456",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let runs = parse_runs(&lines, 2).unwrap();
        assert_eq!(runs[0].probes_ms, [101.2, 99.0]);
        assert_eq!(runs[0].first_read_ms, 480.0);
        assert_eq!(runs[1].whole_disk_s, 41.0);
        // A missing run or figure is an error, not a zero in the table.
        assert!(parse_runs(&lines, 3).is_err());
        let partial: Vec<String> = vec!["wan run=1 first_read_ms=480".into()];
        assert!(parse_runs(&partial, 1).is_err());
    }

    #[test]
    fn percentiles_are_the_shared_ones() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(mmm(&[3.0, 1.0, 2.0], 0), "2 (1–3)");
    }
}
