//! `cargo xtask vm-test`: boots a kernel with the real ublk driver under QEMU
//! and runs ferry's ublk checks inside it; `cargo xtask vm-bench` measures
//! `ferry pull --ublk` against the kernel's loop device in the same VM.
//!
//! The host kernel has no ublk driver, so the checks run in a VM: Debian's
//! 6.12 cloud kernel (fetched once into the cache), an initramfs holding
//! busybox, the binaries under test and the tools the checks use, and check
//! scripts that print one `FERRY-CHECK` line per check on the serial
//! console. QEMU runs under TCG (never KVM) and always under `timeout`.
//!
//! By default `vm-test` runs three scripts in one boot: `checks-ublk.sh` (the
//! frontend through the `ublk-mem` example), `checks-ferry.sh` (the real
//! `ferry serve` + `ferry pull --ublk`, on source images prepared here and
//! attached as read-only virtio disks with serial numbers, see
//! [`fixtures`]) and `checks-precopy.sh` (`ferry pull --precopy --ublk`
//! from a `ferry serve --present` source that qemu-io writes).

mod bench;
mod fixtures;
pub(crate) mod host;
mod initramfs;
mod serial;
mod wan_bench;

pub(crate) use bench::{vm_bench, VmBenchArgs};
pub(crate) use wan_bench::{vm_wan_bench, VmWanBenchArgs};

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Kernel modules `/init` inserts, with their dependencies.
const MODULES: &[&str] = &["ublk_drv", "virtio_blk", "virtio_net", "loop"];

/// Check scripts `vm-test` runs when none is named.
const DEFAULT_CHECKS: &[&str] = &[
    "scripts/vm/checks-ublk.sh",
    "scripts/vm/checks-ferry.sh",
    "scripts/vm/checks-precopy.sh",
];

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug)]
pub(crate) struct VmTestArgs {
    /// Boxed: keeps the xtask command enum small.
    #[command(flatten)]
    opts: Box<VmOptions>,
}

/// The options themselves.
#[derive(clap::Args, Debug)]
struct VmOptions {
    /// A binary under test, installed in the VM's /usr/local/bin
    /// (repeatable). Without any, the `ublk-mem` example and the `ferry`
    /// binary are built in release mode and used.
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// A check script run inside the VM, in the order given (repeatable;
    /// each sources $FERRY_LIB for the `check`/`pass`/`fail` helpers).
    /// Default: scripts/vm/checks-ublk.sh, scripts/vm/checks-ferry.sh, then
    /// scripts/vm/checks-precopy.sh.
    #[arg(long = "checks", value_name = "PATH")]
    checks: Vec<PathBuf>,
    /// An extra file for the VM, at /ferry/files/NAME (repeatable).
    #[arg(long = "include", value_name = "PATH")]
    includes: Vec<PathBuf>,
    /// KEY=VALUE for the check script's environment, passed on the kernel
    /// command line (repeatable; no spaces).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Give the VM a virtio NIC on QEMU user networking: the guest is
    /// 10.0.2.15, the host 10.0.2.2.
    #[arg(long)]
    net: bool,
    /// Forward host UDP PORT to the guest's PORT (repeatable; implies --net).
    #[arg(long = "hostfwd-udp", value_name = "PORT")]
    hostfwd_udp: Vec<u16>,
    /// Forward host TCP PORT to the guest's PORT (repeatable; implies --net).
    #[arg(long = "hostfwd-tcp", value_name = "PORT")]
    hostfwd_tcp: Vec<u16>,
    /// A host file attached as a raw virtio disk: /dev/vda, /dev/vdb, …
    /// (repeatable). The source images of checks-ferry.sh come after these
    /// (found by serial number, not by name).
    #[arg(long = "drive", value_name = "FILE")]
    drives: Vec<PathBuf>,
    #[command(flatten)]
    machine: MachineOpts,
}

impl VmOptions {
    /// Options for `machine` with nothing else: no binaries, checks,
    /// files, network or drives (the benchmarks set what they need).
    fn for_machine(machine: MachineOpts) -> Self {
        VmOptions {
            binaries: Vec::new(),
            checks: Vec::new(),
            includes: Vec::new(),
            env: Vec::new(),
            net: false,
            hostfwd_udp: Vec::new(),
            hostfwd_tcp: Vec::new(),
            drives: Vec::new(),
            machine,
        }
    }
}

/// vm-test's time limit: with the pre-copy checks a run took 7.5 minutes
/// of VM time (checks 410 s) on a 2-core machine loaded by other builds.
const VM_TEST_TIMEOUT_SECS: u64 = 600;

/// The machine's options, shared by `vm-test`, `vm-bench` and
/// `vm-wan-bench`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MachineOpts {
    /// Kill the VM after this many seconds. Default: 600 for vm-test (a
    /// run took 7.5 minutes on a loaded 2-core machine), 900 for
    /// vm-bench, 1500 for vm-wan-bench.
    #[arg(long, value_name = "SECS")]
    timeout_secs: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Cache directory (kernel, initramfs, logs); default $FERRY_VM_CACHE or
    /// <target dir>/vm.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Echo the whole serial console, not only the FERRY lines.
    #[arg(long, short)]
    verbose: bool,
}

impl MachineOpts {
    /// These options, with `secs` as the time limit unless one was given.
    fn with_default_timeout(mut self, secs: u64) -> Self {
        self.timeout_secs.get_or_insert(secs);
        self
    }

    fn timeout_secs(&self) -> u64 {
        self.timeout_secs.unwrap_or(VM_TEST_TIMEOUT_SECS)
    }
}

/// Runs the VM test.
pub(crate) fn vm_test(args: &VmTestArgs) -> Result<()> {
    let args = &*args.opts;
    let checks: Vec<PathBuf> = if args.checks.is_empty() {
        DEFAULT_CHECKS.iter().map(PathBuf::from).collect()
    } else {
        args.checks.clone()
    };
    let outcome = run_vm(args, &checks, |root, cache| {
        let binaries = if args.binaries.is_empty() {
            vec![build_example(root)?, build_ferry(root)?]
        } else {
            args.binaries
                .iter()
                .map(|b| resolve(root, b))
                .collect::<Result<_>>()?
        };
        let fx = fixtures::test_fixtures(&cache.join("fixtures"))?;
        Ok(Prepared {
            binaries,
            drives: fx.drives,
            includes: fx.includes,
            env: Vec::new(),
        })
    })?;
    outcome.finish("vm-test")
}

/// What a VM run needs besides the options: built binaries, source images
/// (virtio disks with a serial number), extra files and environment.
struct Prepared {
    binaries: Vec<PathBuf>,
    drives: Vec<fixtures::Drive>,
    includes: Vec<PathBuf>,
    env: Vec<String>,
}

/// A finished VM run with its timings.
struct Outcome {
    vm: VmRun,
    timeout_secs: u64,
    log_path: PathBuf,
    timings: String,
}

impl Outcome {
    /// Every reason the run failed: failed checks, missing modules, no
    /// boot, no end, a timeout.
    fn problems(&self) -> Vec<String> {
        let mut problems = self.vm.report.problems(&["ublk_drv"]);
        if self.vm.timed_out {
            problems.push(format!("the VM was killed after {} s", self.timeout_secs));
        }
        problems
    }

    /// Prints the summary; fails if anything went wrong.
    fn finish(&self, what: &str) -> Result<()> {
        let problems = self.problems();
        println!("{what}: {}", self.timings);
        for problem in &problems {
            println!("{what}: FAILED: {problem}");
        }
        let non_check_problems = problems.len() - self.vm.report.failed.len();
        println!(
            "{what}: {} passed, {} failed",
            self.vm.report.passed.len(),
            self.vm.report.failed.len() + non_check_problems
        );
        if !problems.is_empty() {
            if !self.vm.stderr.trim().is_empty() {
                println!("{what}: qemu stderr:\n{}", self.vm.stderr.trim());
            }
            bail!(
                "{what} failed ({} problem(s)); console log: {}",
                problems.len(),
                self.log_path.display()
            );
        }
        Ok(())
    }
}

/// Sets up the host (packages, kernel), runs `prepare` (builds, images),
/// packs the initramfs with `checks` and boots it.
fn run_vm(
    args: &VmOptions,
    checks: &[PathBuf],
    prepare: impl FnOnce(&Path, &Path) -> Result<Prepared>,
) -> Result<Outcome> {
    let started = Instant::now();
    for kv in &args.env {
        check_env_word(kv)?;
    }
    let root = workspace_root();
    let cache = args
        .machine
        .cache
        .clone()
        .or_else(|| std::env::var_os("FERRY_VM_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| target_dir(&root).join("vm"));
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cache = cache.canonicalize()?;

    host::ensure_packages()?;
    let kernel = host::ensure_kernel(&cache)?;
    let modules = kernel.modules_with_deps(MODULES, &cache.join("kernel/modules"))?;
    let setup_time = started.elapsed();

    let build_started = Instant::now();
    let prepared = prepare(&root, &cache)?;
    for kv in &prepared.env {
        check_env_word(kv)?;
    }
    let build_time = build_started.elapsed();

    let initramfs_started = Instant::now();
    let checks = checks
        .iter()
        .map(|p| resolve(&root, p))
        .collect::<Result<Vec<_>>>()?;
    let mut includes = args
        .includes
        .iter()
        .map(|p| resolve(&root, p))
        .collect::<Result<Vec<_>>>()?;
    includes.extend(prepared.includes.iter().cloned());
    let run_dir = cache.join("run");
    fs::create_dir_all(&run_dir)?;
    let initrd = initramfs::build(
        &initramfs::Contents {
            binaries: &prepared.binaries,
            modules: &modules,
            init: &root.join("scripts/vm/init.sh"),
            lib: &root.join("scripts/vm/lib.sh"),
            checks: &checks,
            includes: &includes,
        },
        &run_dir,
    )?;
    let initramfs_time = initramfs_started.elapsed();
    let initrd_mib = fs::metadata(&initrd)?.len() as f64 / (1 << 20) as f64;

    let mut drives = args
        .drives
        .iter()
        .map(|p| {
            Ok(fixtures::Drive {
                path: resolve(&root, p)?,
                serial: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    drives.extend(prepared.drives);
    let log_path = run_dir.join("serial.log");
    let names: Vec<String> = checks
        .iter()
        .map(|c| {
            c.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    println!(
        "vm: kernel {}, initramfs {initrd_mib:.0} MiB, checks {}, console log {}",
        kernel.release,
        names.join(" + "),
        log_path.display()
    );
    let mut env = args.env.clone();
    env.extend(prepared.env);
    let vm = boot(args, &env, &kernel.vmlinuz, &initrd, &drives, &log_path)?;

    let secs = |d: Duration| d.as_secs_f64();
    let mut timings = format!(
        "timings: setup {:.1}s, build {:.1}s, initramfs {:.1}s, boot to /init {}, checks {}",
        secs(setup_time),
        secs(build_time),
        secs(initramfs_time),
        vm.boot.map_or("-".into(), |d| format!("{:.1}s", secs(d))),
        vm.checks.map_or("-".into(), |d| format!("{:.1}s", secs(d))),
    );
    if vm.scripts.len() > 1 {
        let parts: Vec<String> = vm
            .scripts
            .iter()
            .map(|(name, d)| format!("{name} {:.1}s", secs(*d)))
            .collect();
        timings.push_str(&format!(" ({})", parts.join(", ")));
    }
    timings.push_str(&format!(
        ", VM total {:.1}s, overall {:.1}s",
        secs(vm.total),
        secs(started.elapsed())
    ));
    Ok(Outcome {
        vm,
        timeout_secs: args.machine.timeout_secs(),
        log_path,
        timings,
    })
}

/// Outcome of one VM run.
struct VmRun {
    report: serial::Report,
    timed_out: bool,
    /// QEMU start to `FERRY-BOOT`.
    boot: Option<Duration>,
    /// `FERRY-BOOT` to `FERRY-DONE`.
    checks: Option<Duration>,
    /// Each check script that started, with how long it ran (to the next
    /// script or `FERRY-DONE`, or to the end of the console).
    scripts: Vec<(String, Duration)>,
    total: Duration,
    stderr: String,
}

/// Boots the VM, streams its console into `log_path` and parses it.
fn boot(
    args: &VmOptions,
    env: &[String],
    vmlinuz: &Path,
    initrd: &Path,
    drives: &[fixtures::Drive],
    log_path: &Path,
) -> Result<VmRun> {
    let net = args.net || !args.hostfwd_udp.is_empty() || !args.hostfwd_tcp.is_empty();
    let mut append = vec![
        "console=ttyS0".to_string(),
        "quiet".to_string(),
        "panic=-1".to_string(),
        format!("ferry_net={}", u8::from(net)),
    ];
    append.extend(env.iter().cloned());

    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", &args.machine.timeout_secs().to_string()])
        .arg("qemu-system-x86_64")
        // Single-threaded TCG: with one host thread per vCPU (MTTCG) the
        // guest kernel's int3-based code patching races and oopses
        // (seen: "Oops: int3" in urandom_read_iter, a panic mid-run).
        .args(["-nographic", "-no-reboot", "-accel", "tcg,thread=single"])
        .args(["-m", &args.machine.memory_mib.to_string()])
        .args(["-smp", &args.machine.smp.to_string()])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append.join(" ")]);
    if net {
        let mut netdev = "user,id=n0".to_string();
        for port in &args.hostfwd_udp {
            netdev.push_str(&format!(",hostfwd=udp::{port}-:{port}"));
        }
        for port in &args.hostfwd_tcp {
            netdev.push_str(&format!(",hostfwd=tcp::{port}-:{port}"));
        }
        cmd.args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    } else {
        cmd.args(["-nic", "none"]);
    }
    for (i, drive) in drives.iter().enumerate() {
        match &drive.serial {
            None => cmd.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw",
                drive.path.display()
            )),
            // Read-only: the guest (and so `ferry serve`) cannot change a
            // source image.
            Some(serial) => cmd
                .arg("-drive")
                .arg(format!(
                    "file={},if=none,id=fx{i},format=raw,readonly=on",
                    drive.path.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=fx{i},serial={serial}")),
        };
    }
    let stderr_path = log_path.with_extension("stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&stderr_path)?);

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 under timeout")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let mut log = fs::File::create(log_path)?;
    let mut report = serial::Report::default();
    let (mut boot, mut booted_at, mut checks) = (None, None, None);
    let mut scripts: Vec<(String, Duration)> = Vec::new();
    let mut script_started: Option<(String, Instant)> = None;
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        log.write_all(&raw)?;
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let event = report.feed(line);
        match &event {
            Some(serial::Event::Boot) => {
                boot = Some(started.elapsed());
                booted_at = Some(Instant::now());
            }
            Some(serial::Event::Done) => {
                checks = booted_at.map(|t| t.elapsed());
                if let Some((name, t)) = script_started.take() {
                    scripts.push((name, t.elapsed()));
                }
            }
            Some(serial::Event::Script(name)) => {
                if let Some((prev, t)) = script_started.take() {
                    scripts.push((prev, t.elapsed()));
                }
                script_started = Some((name.clone(), Instant::now()));
            }
            _ => {}
        }
        if event.is_some() || args.machine.verbose {
            println!(
                "[{:6.1}s] {}",
                started.elapsed().as_secs_f64(),
                line.trim_start()
            );
        }
    }
    let status = child.wait()?;
    if let Some((name, t)) = script_started.take() {
        scripts.push((name, t.elapsed()));
    }
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    Ok(VmRun {
        scripts,
        report,
        // timeout(1) exits 124 when it had to stop the command (137 after KILL).
        timed_out: matches!(status.code(), Some(124) | Some(137)),
        boot,
        checks,
        total: started.elapsed(),
        stderr,
    })
}

/// Builds the `ublk-mem` example in release mode and returns its path.
fn build_example(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("vm: building the ublk-mem example (release)");
    run(Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "ferry-ublk",
            "--example",
            "ublk-mem",
        ])
        .current_dir(root))?;
    let bin = target_dir(root).join("release/examples/ublk-mem");
    if !bin.exists() {
        bail!("cargo built no {}", bin.display());
    }
    private_copy(root, &bin)
}

/// Builds the `ferry` binary in release mode and returns its path.
fn build_ferry(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("vm: building the ferry binary (release)");
    run(Command::new(cargo)
        .args(["build", "--release", "-p", "ferry", "--bin", "ferry"])
        .current_dir(root))?;
    let bin = target_dir(root).join("release/ferry");
    if !bin.exists() {
        bail!("cargo built no {}", bin.display());
    }
    private_copy(root, &bin)
}

/// Copies a binary just built out of the target directory into one of this
/// checkout's own (`<target>/vm-bin/<checkout path>/`), so that a build of
/// another checkout sharing `CARGO_TARGET_DIR` cannot replace it before the
/// initramfs is packed.
fn private_copy(root: &Path, bin: &Path) -> Result<PathBuf> {
    let key: String = root
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = target_dir(root).join("vm-bin").join(key);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = bin.file_name().context("a binary has a file name")?;
    let dst = dir.join(name);
    fs::copy(bin, &dst)
        .with_context(|| format!("copying {} to {}", bin.display(), dst.display()))?;
    Ok(dst)
}

/// The kernel passes `KEY=VALUE` words to `/init` as environment variables;
/// a word with spaces or quotes would be split or mangled.
fn check_env_word(kv: &str) -> Result<()> {
    let Some((key, value)) = kv.split_once('=') else {
        bail!("--env {kv:?}: expected KEY=VALUE");
    };
    let key_ok = !key.is_empty()
        && !key.contains('.')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let value_ok = value
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '"' && c != '\'');
    if !key_ok || !value_ok {
        bail!(
            "--env {kv:?}: KEY must be [A-Za-z0-9_]+ and VALUE printable without spaces or quotes"
        );
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// `path` as given if it exists, else relative to the workspace root.
fn resolve(root: &Path, path: &Path) -> Result<PathBuf> {
    let candidates = [path.to_path_buf(), root.join(path)];
    candidates
        .iter()
        .find(|p| p.exists())
        .map(|p| p.canonicalize())
        .transpose()?
        .with_context(|| format!("{} does not exist", path.display()))
}

/// Runs `cmd`, failing with its exit status.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_words_must_survive_the_kernel_command_line() {
        assert!(check_env_word("FERRY_SERVER=10.0.2.2:4433").is_ok());
        assert!(check_env_word("NOEQUALS").is_err());
        assert!(check_env_word("A=b c").is_err());
        assert!(check_env_word("a.b=c").is_err());
        assert!(check_env_word("A='x'").is_err());
    }
}
