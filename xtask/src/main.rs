//! `cargo xtask`: the project's automation. `cargo xtask ci` runs exactly
//! what CI runs; `cargo xtask demo` runs a migration on loopback;
//! `cargo xtask fuzz` runs the fuzz targets.

mod bench;
mod chaos;
mod ci;
mod dedup_analysis;
mod demo;
mod dist;
mod fuzz;
mod serve_start;
mod setup;
mod stats;
mod tidy;
mod vm;
mod wan;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ferry's project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything CI runs (`ci --help` lists every step, in order).
    #[command(long_about = ci::long_about())]
    Ci,
    /// Run a migration demo: serve a disk holding a filesystem, pull it,
    /// use it with qemu-io while it copies, prove the result.
    Demo(demo::DemoArgs),
    /// Build the cargo-fuzz targets (fuzz/) and run each for a bounded
    /// time; fails if any finds a crash.
    Fuzz(fuzz::FuzzArgs),
    /// Boot a VM with the real ublk driver and run ferry's ublk checks in it.
    VmTest(vm::VmTestArgs),
    /// Benchmark `ferry pull --ublk` against the loop device in the VM;
    /// writes the "ublk in a VM" section of BENCHMARKS.md.
    VmBench(vm::VmBenchArgs),
    /// Benchmark `ferry pull --ublk` in the VM against a source on the
    /// host over the emulated WAN; writes the "ublk in a VM over the
    /// emulated WAN" section of BENCHMARKS.md.
    VmWanBench(vm::VmWanBenchArgs),
    /// Emulated WAN between two network namespaces: up, down, status, cut, relay.
    Wan(wan::WanArgs),
    /// The emulated WAN's forwarder process (started by `wan up`).
    #[command(hide = true)]
    WanForward(wan::ForwardArgs),
    /// Short smoke test of the emulated WAN (relay and namespaces; root).
    WanSmoke,
    /// Benchmark ferry against stop-and-copy and the nbdkit lazy proxy on
    /// the emulated WAN; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Fault injection against whole migrations: kill pull/serve, cut the
    /// link, fill the destination, while a guest writes and flushes; checks
    /// every flushed write and the final image.
    Chaos(chaos::ChaosArgs),
    /// Build the Debian package (target/dist/deb/): ferry from the `dist`
    /// profile, its man pages, shell completions and systemd units;
    /// `--check` installs it into a scratch root and checks it.
    Dist(dist::DistArgs),
    /// Where the bytes of `ferry pull --index` come from: a source's 64 KiB
    /// chunks (zero, matched by the template's index, unmatched) and the
    /// unmatched ones' 4 KiB blocks (zero, in the template, nowhere), with
    /// their zstd payloads (docs/decisions/dedup-4k-blocks.md).
    DedupAnalysis(dedup_analysis::DedupAnalysisArgs),
    /// Time `ferry serve` (release) from start to ready on a large sparse
    /// image whose data is not in the page cache, and the bytes it read.
    ServeStart(serve_start::ServeStartArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ci => ci::run_ci(),
        Cmd::Demo(args) => demo::run_demo(&args),
        Cmd::Fuzz(args) => fuzz::run_fuzz(&args),
        Cmd::VmTest(args) => vm::vm_test(&args),
        Cmd::VmBench(args) => vm::vm_bench(&args),
        Cmd::VmWanBench(args) => vm::vm_wan_bench(&args),
        Cmd::Wan(args) => wan::run_wan(&args),
        Cmd::WanForward(args) => wan::run_forward(&args),
        Cmd::WanSmoke => wan::wan_smoke(),
        Cmd::Bench(args) => bench::run_bench(&args),
        Cmd::Chaos(args) => chaos::run_chaos(&args),
        Cmd::Dist(args) => dist::run_dist(&args),
        Cmd::ServeStart(args) => serve_start::run(&args),
        Cmd::DedupAnalysis(args) => dedup_analysis::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `cargo xtask ci --help` names every step `ci` runs (it named all
    /// but fuzz).
    #[test]
    fn ci_help_lists_every_step_it_runs() {
        let help = super::Cli::command()
            .find_subcommand_mut("ci")
            .expect("ci")
            .render_long_help()
            .to_string();
        let steps = super::ci::step_names();
        assert!(steps.len() >= 14, "{steps:?}");
        for name in steps {
            assert!(
                help.contains(name),
                "`ci --help` lacks the step {name:?}:\n{help}"
            );
        }
    }

    fn longs(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if let Some(l) = a.get_long() {
                out.push(format!("{path} --{l}"));
            }
        }
        for sub in cmd.get_subcommands() {
            longs(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// One spelling, as in ferry's CLI: a timeout is `--…timeout-secs`,
    /// seconds are never abbreviated `-s`, a file written is `--out`
    /// (vm-bench and vm-wan-bench had `--output`, bench `--timeout-s`,
    /// chaos `--round-timeout-s`: hidden aliases now).
    #[test]
    fn options_are_spelled_one_way() {
        let mut all = Vec::new();
        longs(&super::Cli::command(), "cargo xtask", &mut all);
        let bad: Vec<&String> = all
            .iter()
            .filter(|l| {
                let long = l.rsplit("--").next().unwrap_or("");
                (long.contains("timeout") && !long.ends_with("-secs"))
                    || long.ends_with("-s")
                    || long == "output"
            })
            .collect();
        assert!(bad.is_empty(), "options spelled another way: {bad:?}");
    }
}
