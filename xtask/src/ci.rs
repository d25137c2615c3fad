//! `cargo xtask ci`: exactly what CI runs. promtool (extracted from
//! Debian's prometheus package, for the metrics test), formatting, clippy with
//! `-D warnings`, every test of the workspace (with the tools they need
//! required, not skipped), each fuzz target for a few seconds, the Debian
//! package built from the `dist` profile and installed into a scratch root,
//! a short run of the emulated WAN, a short run of the benchmark harness
//! (every system, tiny images: it must work, its figures mean nothing), then
//! the VM test on the real ublk driver. [`steps`] lists them; `ci --help`
//! prints that list.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::setup::{cargo, ensure, file, run, target_dir, tool, workspace_root, Need, LIBCLANG};

/// What CI needs, installed in its first step: the tests' NBD clients and
/// tools, the VM test's packages, the emulated WAN's and the bench's, and
/// libclang for building ferry at all. Every later step's needs are here
/// (a test checks), so a machine that lacks something stops CI at once
/// with every missing package named.
pub(crate) const NEEDS: &[Need] = &[
    tool("qemu-io", "qemu-utils"),
    tool("qemu-img", "qemu-utils"),
    tool("qemu-nbd", "qemu-utils"),
    // the live-source tests (ferry-nbd-client and ferry-live against
    // qemu-storage-daemon's NBD export and QMP monitor)
    tool("qemu-storage-daemon", "qemu-system-common"),
    tool("mkfs.ext4", "e2fsprogs"),
    tool("e2fsck", "e2fsprogs"),
    tool("systemd-analyze", "systemd"),
    // the libvirt hook's test
    tool("shellcheck", "shellcheck"),
    LIBCLANG,
    // the ublk VM test
    tool("qemu-system-x86_64", "qemu-system-x86"),
    file("/bin/busybox", "busybox-static"),
    tool("cpio", "cpio"),
    tool("xz", "xz-utils"),
    tool("zstd", "zstd"),
    file("/usr/sbin/depmod", "kmod"),
    tool("fio", "fio"),
    file("/usr/sbin/blkdiscard", "util-linux"),
    tool("cmp", "diffutils"),
    // the emulated WAN (namespaces, TUN, tc)
    tool("ip", "iproute2"),
    tool("iptables", "iptables"),
    // the bench's peers and plots (bench-smoke)
    tool("nbdkit", "nbdkit"),
    tool("nbdcopy", "libnbd-bin"),
    tool("nbdinfo", "libnbd-bin"),
    file(
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
    // the Debian package (dist): dpkg-shlibdeps, gzip and man for its pages
    tool("dpkg-deb", "dpkg"),
    tool("gzip", "gzip"),
    tool("dpkg-shlibdeps", "dpkg-dev"),
    tool("man", "man-db"),
];

/// Seconds CI runs each fuzz target (the long runs are done by hand with
/// `cargo xtask fuzz --seconds N`).
const FUZZ_CI_SECONDS: u64 = 15;

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t0 = Instant::now();
    eprintln!("==> ci: {name}");
    f().with_context(|| format!("ci step `{name}` failed"))?;
    eprintln!("==> ci: {name}: ok ({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

/// One step of CI: its name (as `ci --help` lists it) and what it runs.
type Step = (&'static str, Box<dyn FnOnce() -> Result<()>>);

/// Runs `cargo ARGS` in the workspace.
fn cargo_step(args: &'static [&'static str]) -> Box<dyn FnOnce() -> Result<()>> {
    Box::new(move || {
        run(Command::new(cargo())
            .current_dir(workspace_root())
            .args(args))
    })
}

/// Every step of CI, in order: what [`run_ci`] runs and what `cargo
/// xtask ci --help` lists ([`long_about`]).
fn steps() -> Vec<Step> {
    let root = workspace_root();
    let root2 = root.clone();
    let root3 = root.clone();
    let root4 = root.clone();
    // Found by the promtool step, handed to the tests.
    let promtool = std::rc::Rc::new(std::cell::RefCell::new(std::path::PathBuf::new()));
    let found = promtool.clone();
    vec![
        (
            "packages (installed if missing, none removed)",
            Box::new(|| ensure(NEEDS)),
        ),
        (
            "promtool (from Debian's prometheus package, extracted, not installed)",
            Box::new(move || {
                let p = crate::setup::promtool()?;
                eprintln!("promtool: {}", p.display());
                *found.borrow_mut() = p;
                Ok(())
            }),
        ),
        ("fmt", cargo_step(&["fmt", "--all", "--", "--check"])),
        (
            "clippy",
            cargo_step(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        (
            "build ferry",
            cargo_step(&["build", "-p", "ferry", "--bin", "ferry"]),
        ),
        (
            "tests",
            Box::new(move || {
                run(Command::new(cargo())
                    .current_dir(&root)
                    .env("FERRY_REQUIRE_ALL", "1")
                    .env("FERRY_PROMTOOL", &*promtool.borrow())
                    .args(["test", "--workspace", "--exclude", "xtask"]))
            }),
        ),
        (
            "xtask tests",
            Box::new(move || {
                run(Command::new(cargo())
                    .current_dir(&root2)
                    .env("FERRY_REQUIRE_ALL", "1")
                    .args(["test", "-p", "xtask"]))
            }),
        ),
        // Bounded: installing cargo-fuzz (once per machine), the
        // instrumented build, then 5 targets x FUZZ_CI_SECONDS.
        (
            "fuzz (every cargo-fuzz target, bounded)",
            Box::new(move || {
                run(Command::new(cargo()).current_dir(&root3).args([
                    "run",
                    "--quiet",
                    "-p",
                    "xtask",
                    "--",
                    "fuzz",
                    "--seconds",
                    &FUZZ_CI_SECONDS.to_string(),
                ]))
            }),
        ),
        (
            "dist (the .deb from the dist profile, installed into a scratch root with dpkg; man ferry-pull renders)",
            Box::new(|| crate::dist::run_dist(&crate::dist::DistArgs { check: true })),
        ),
        (
            "wan-smoke (emulated WAN: UDP relay and TUN link between namespaces)",
            cargo_step(&["run", "--quiet", "-p", "xtask", "--", "wan-smoke"]),
        ),
        (
            "bench-smoke (the benchmark harness: all systems, 128 MiB, capped)",
            Box::new(bench_smoke),
        ),
        (
            "chaos (short: kills, serve restarts, link cuts, a full destination, under a flushing guest)",
            Box::new(move || {
                run(Command::new(cargo())
                    .current_dir(&root4)
                    .env("FERRY_BIN", target_dir().join("debug").join("ferry"))
                    .args(["run", "--quiet", "-p", "xtask", "--", "chaos"])
                    .args(["--rounds", "6", "--size-mib", "16", "--seed", "24"])
                    .args(["--cut-min-secs", "2", "--cut-max-secs", "5"])
                    .args(["--round-timeout-secs", "300"]))
            }),
        ),
        (
            "vm-test (real ublk driver in a VM)",
            cargo_step(&["run", "--quiet", "-p", "xtask", "--", "vm-test"]),
        ),
        (
            "vm-wan-smoke (ublk in the VM, source on the host over the emulated WAN)",
            Box::new(vm_wan_smoke),
        ),
    ]
}

/// `cargo xtask ci --help`: what CI is, then every step it runs, in order.
pub(crate) fn long_about() -> String {
    let mut s = String::from(
        "Run everything CI runs, as root on Debian 12 (each step must pass before the next \
         starts):\n",
    );
    for (i, (name, _)) in steps().iter().enumerate() {
        s.push_str(&format!("\n{:>3}. {name}", i + 1));
    }
    s
}

/// The names of [`steps`], in order.
#[cfg(test)]
pub(crate) fn step_names() -> Vec<&'static str> {
    steps().into_iter().map(|(n, _)| n).collect()
}

/// Runs CI.
pub(crate) fn run_ci() -> Result<()> {
    for (name, f) in steps() {
        step(name, f)?;
    }
    eprintln!("==> ci: all steps passed");
    Ok(())
}

/// Runs `cargo xtask vm-wan-bench` small (16 MiB, 3 runs of 2 probes)
/// into a scratch report and checks that its section was written: the
/// harness works, the figures are not judged.
fn vm_wan_smoke() -> Result<()> {
    let dir = target_dir().join("vm-wan-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("BENCHMARKS.md");
    run(Command::new(cargo())
        .current_dir(workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "vm-wan-bench"])
        .args(["--runs", "3", "--size-mib", "16", "--probes", "2"])
        .args(["--timeout-secs", "900", "--out"])
        .arg(&out))?;
    let report = std::fs::read_to_string(&out)
        .with_context(|| format!("vm-wan-bench wrote no report at {}", out.display()))?;
    anyhow::ensure!(
        report.contains("## ublk in a VM over the emulated WAN")
            && report.contains("| first read from launch (ms) |"),
        "the vm-wan-bench report lacks its table:\n{report}"
    );
    Ok(())
}

/// Runs `cargo xtask bench --quick` on tiny images with the debug ferry
/// binary (built by the `build ferry` step), into a scratch report, and
/// checks that every system produced its row and that the plot was drawn.
/// Bounded: a 128 MiB ext4 and a 64 MiB random image, 3 probes, the lazy proxy capped at 30 s, any
/// run given up after 300 s.
fn bench_smoke() -> Result<()> {
    let root = workspace_root();
    let dir = target_dir().join("bench-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("BENCHMARKS.md");
    run(Command::new(cargo())
        .current_dir(&root)
        .env("FERRY_BIN", target_dir().join("debug").join("ferry"))
        .args(["run", "--quiet", "-p", "xtask", "--", "bench", "--quick"])
        .args([
            "--size-mib",
            "128",
            "--probes",
            "3",
            "--lazy-cap-secs",
            "30",
        ])
        .args(["--timeout-secs", "300", "--out"])
        .arg(&out))?;
    let report = std::fs::read_to_string(&out)
        .with_context(|| format!("the bench wrote no report at {}", out.display()))?;
    for row in [
        "| ferry (serve + pull",
        "| stop-and-copy: qemu-nbd → nbdcopy",
        "| lazy proxy: qemu-nbd → nbdkit",
    ] {
        anyhow::ensure!(
            report.matches(row).count() >= 2,
            "the smoke report lacks a row `{row}` for each image:\n{report}"
        );
    }
    let plots: Vec<_> = std::fs::read_dir(dir.join(crate::bench::PLOTS_DIR))
        .context("the bench drew no plots")?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    anyhow::ensure!(
        plots.len() >= 2,
        "expected a plot per image, found {}",
        plots.len()
    );
    eprintln!(
        "bench-smoke: report and {} plots in {}",
        plots.len(),
        dir.display()
    );
    Ok(())
}
