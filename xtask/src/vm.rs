//! `cargo xtask vm-test`: boots a kernel with the real ublk driver under QEMU
//! and runs ferry's ublk checks inside it.
//!
//! The host kernel has no ublk driver, so the checks run in a VM: Debian's
//! 6.12 cloud kernel (fetched once into the cache), an initramfs holding
//! busybox, the binaries under test and the tools the checks use, and a
//! check script that prints one `FERRY-CHECK` line per check on the serial
//! console. QEMU runs under TCG (never KVM) and always under `timeout`.

mod host;
mod initramfs;
mod serial;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Kernel modules `/init` inserts, with their dependencies.
const MODULES: &[&str] = &["ublk_drv", "virtio_blk", "virtio_net"];

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
    /// (repeatable). Without any, the `ublk-mem` example is built in release
    /// mode and used.
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// The check script run inside the VM (sources $FERRY_LIB for the
    /// `check`/`pass`/`fail` helpers).
    #[arg(long, value_name = "PATH", default_value = "scripts/vm/checks-ublk.sh")]
    checks: PathBuf,
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
    /// (repeatable).
    #[arg(long = "drive", value_name = "FILE")]
    drives: Vec<PathBuf>,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 240)]
    timeout_secs: u64,
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

/// Runs the VM test.
pub(crate) fn vm_test(args: &VmTestArgs) -> Result<()> {
    let args = &*args.opts;
    let started = Instant::now();
    for kv in &args.env {
        check_env_word(kv)?;
    }
    let root = workspace_root();
    let cache = args
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
    let binaries = if args.binaries.is_empty() {
        vec![build_example(&root)?]
    } else {
        args.binaries
            .iter()
            .map(|b| resolve(&root, b))
            .collect::<Result<_>>()?
    };
    let build_time = build_started.elapsed();

    let initramfs_started = Instant::now();
    let checks = resolve(&root, &args.checks)?;
    let includes = args
        .includes
        .iter()
        .map(|p| resolve(&root, p))
        .collect::<Result<Vec<_>>>()?;
    let run_dir = cache.join("run");
    fs::create_dir_all(&run_dir)?;
    let initrd = initramfs::build(
        &initramfs::Contents {
            binaries: &binaries,
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

    let drives = args
        .drives
        .iter()
        .map(|p| resolve(&root, p))
        .collect::<Result<Vec<_>>>()?;
    let log_path = run_dir.join("serial.log");
    println!(
        "vm-test: kernel {}, initramfs {initrd_mib:.0} MiB, checks {}, console log {}",
        kernel.release,
        checks.display(),
        log_path.display()
    );
    let vm = boot(args, &kernel.vmlinuz, &initrd, &drives, &log_path)?;

    let mut problems = vm.report.problems(&["ublk_drv"]);
    if vm.timed_out {
        problems.push(format!("the VM was killed after {} s", args.timeout_secs));
    }
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "vm-test: timings: setup {:.1}s, build {:.1}s, initramfs {:.1}s, boot to /init {}, checks {}, VM total {:.1}s, overall {:.1}s",
        secs(setup_time),
        secs(build_time),
        secs(initramfs_time),
        vm.boot.map_or("-".into(), |d| format!("{:.1}s", secs(d))),
        vm.checks.map_or("-".into(), |d| format!("{:.1}s", secs(d))),
        secs(vm.total),
        secs(started.elapsed()),
    );
    for problem in &problems {
        println!("vm-test: FAILED: {problem}");
    }
    let non_check_problems = problems.len() - vm.report.failed.len();
    println!(
        "vm-test: {} passed, {} failed",
        vm.report.passed.len(),
        vm.report.failed.len() + non_check_problems
    );
    if !problems.is_empty() {
        if !vm.stderr.trim().is_empty() {
            println!("vm-test: qemu stderr:\n{}", vm.stderr.trim());
        }
        bail!(
            "vm-test failed ({} problem(s)); console log: {}",
            problems.len(),
            log_path.display()
        );
    }
    Ok(())
}

/// Outcome of one VM run.
struct VmRun {
    report: serial::Report,
    timed_out: bool,
    /// QEMU start to `FERRY-BOOT`.
    boot: Option<Duration>,
    /// `FERRY-BOOT` to `FERRY-DONE`.
    checks: Option<Duration>,
    total: Duration,
    stderr: String,
}

/// Boots the VM, streams its console into `log_path` and parses it.
fn boot(
    args: &VmOptions,
    vmlinuz: &Path,
    initrd: &Path,
    drives: &[PathBuf],
    log_path: &Path,
) -> Result<VmRun> {
    let net = args.net || !args.hostfwd_udp.is_empty() || !args.hostfwd_tcp.is_empty();
    let mut append = vec![
        "console=ttyS0".to_string(),
        "quiet".to_string(),
        "panic=-1".to_string(),
        format!("ferry_net={}", u8::from(net)),
    ];
    append.extend(args.env.iter().cloned());

    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", &args.timeout_secs.to_string()])
        .arg("qemu-system-x86_64")
        // Single-threaded TCG: with one host thread per vCPU (MTTCG) the
        // guest kernel's int3-based code patching races and oopses
        // (seen: "Oops: int3" in urandom_read_iter, a panic mid-run).
        .args(["-nographic", "-no-reboot", "-accel", "tcg,thread=single"])
        .args(["-m", &args.memory_mib.to_string()])
        .args(["-smp", &args.smp.to_string()])
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
    for drive in drives {
        cmd.arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", drive.display()));
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
        match event {
            Some(serial::Event::Boot) => {
                boot = Some(started.elapsed());
                booted_at = Some(Instant::now());
            }
            Some(serial::Event::Done) => checks = booted_at.map(|t| t.elapsed()),
            _ => {}
        }
        if event.is_some() || args.verbose {
            println!(
                "[{:6.1}s] {}",
                started.elapsed().as_secs_f64(),
                line.trim_start()
            );
        }
    }
    let status = child.wait()?;
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    Ok(VmRun {
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
    println!("vm-test: building the ublk-mem example (release)");
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
    Ok(bin)
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
