//! Host set-up shared by the xtask commands: find what a command needs
//! (tools on PATH, files, libclang for libublk's bindgen), install the
//! Debian packages that provide it when running as root, or stop at once
//! naming every missing package.
//!
//! An install never removes a package: apt's plan is simulated first. If
//! apt would remove an installed package to make room (a backported
//! `qemu-utils` against Debian's `qemu-system-common`, seen on these
//! machines), the package is kept by installing the version Debian's
//! configured suites carry instead, so every tool stays; if no such plan
//! exists the install is refused, naming the package and the fix
//! (docs/decisions/setup-never-removes.md).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// How to tell that a need is met.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Probe {
    /// A command on PATH.
    Tool(&'static str),
    /// A file that the package installs.
    File(&'static str),
    /// libclang, which bindgen (libublk's -sys crate) loads at build time.
    Libclang,
}

/// Something a command needs and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Need {
    /// The Debian package.
    pub(crate) package: &'static str,
    /// How to check for it.
    pub(crate) probe: Probe,
}

/// A tool on PATH from `package`.
pub(crate) const fn tool(tool: &'static str, package: &'static str) -> Need {
    Need {
        package,
        probe: Probe::Tool(tool),
    }
}

/// A file from `package`.
pub(crate) const fn file(path: &'static str, package: &'static str) -> Need {
    Need {
        package,
        probe: Probe::File(path),
    }
}

/// libclang, needed to build the `ferry` binary (libublk's bindgen), even
/// one that only serves NBD.
pub(crate) const LIBCLANG: Need = Need {
    package: "libclang-dev",
    probe: Probe::Libclang,
};

/// Whether `tool` is on PATH.
pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether a libclang shared library is where bindgen (clang-sys) looks:
/// `LIBCLANG_PATH`, or Debian's LLVM directories.
fn have_libclang() -> bool {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LIBCLANG_PATH") {
        dirs.push(p.into());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("llvm-") {
                dirs.push(e.path().join("lib"));
            }
        }
    }
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("libclang") && n.contains(".so") && !n.starts_with("libclang-cpp")
            })
        })
    })
}

impl Need {
    fn met(&self) -> bool {
        match self.probe {
            Probe::Tool(t) => have(t),
            Probe::File(f) => Path::new(f).exists(),
            Probe::Libclang => have_libclang(),
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Makes sure every need is met: installs the missing packages with
/// apt-get when root (never removing one), or fails naming all of them.
pub(crate) fn ensure(needs: &[Need]) -> Result<()> {
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|n| !n.met())
        .map(|n| n.package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!(
            "missing Debian packages: {}; install them first (as root: apt-get install --no-install-recommends {}), \
             or run this command as root and it installs them",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update failed")?;
    apt_install(&missing)?;
    let still: Vec<String> = needs
        .iter()
        .filter(|n| !n.met())
        .map(|n| format!("{} ({:?})", n.package, n.probe))
        .collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// What apt would do, from `apt-get -s install`'s `Inst` and `Remv` lines.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct AptPlan {
    /// Installed packages apt would remove, with their versions.
    pub(crate) removes: Vec<(String, String)>,
    /// Installed packages apt would replace by an older version.
    pub(crate) downgrades: Vec<(String, String, String)>,
}

/// Parses the output of `apt-get -s install ...`.
pub(crate) fn parse_apt_plan(out: &str) -> AptPlan {
    let mut plan = AptPlan::default();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Remv"), Some(name)) => {
                let ver = bracketed(line, '[', ']').unwrap_or_default();
                plan.removes.push((name.to_string(), ver));
            }
            (Some("Inst"), Some(name)) => {
                // `Inst NAME [OLD] (NEW SUITE [ARCH])`: OLD only when upgrading or downgrading.
                let rest = line
                    .split_once(name)
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or_default();
                let old = rest
                    .starts_with('[')
                    .then(|| bracketed(rest, '[', ']'))
                    .flatten();
                if let (Some(old), Some(new)) = (old, bracketed(rest, '(', ')')) {
                    let new = new
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    if version_lt(&new, &old) {
                        plan.downgrades.push((name.to_string(), old, new));
                    }
                }
            }
            _ => {}
        }
    }
    plan
}

fn bracketed(line: &str, open: char, close: char) -> Option<String> {
    let start = line.find(open)? + 1;
    let len = line[start..].find(close)?;
    Some(line[start..start + len].to_string())
}

/// Debian version order, as dpkg decides it.
fn version_lt(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "lt", b])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn simulate(args: &[String]) -> Result<AptPlan> {
    let out = Command::new("apt-get")
        .args([
            "-s",
            "install",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("cannot run apt-get -s install")?;
    if !out.status.success() {
        bail!(
            "apt-get cannot install {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_apt_plan(&String::from_utf8_lossy(&out.stdout)))
}

/// The newest version of `package` that a configured repository offers
/// (`apt-cache madison`), if any.
fn repository_version(package: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["madison", package])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|').map(str::trim);
            let (name, ver) = (f.next()?, f.next()?);
            (name == package).then(|| ver.to_string())
        })
        .next()
}

fn installed_packages() -> Result<BTreeSet<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status} ${Package}\n"])
        .output()
        .context("cannot run dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("installed "))
        .map(str::to_string)
        .collect())
}

/// Installs `packages`, never removing an installed package.
fn apt_install(packages: &[&str]) -> Result<()> {
    let mut args: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    let plan = simulate(&args)?;
    if !plan.removes.is_empty() {
        let mut kept = Vec::new();
        for (name, ver) in &plan.removes {
            match repository_version(name) {
                Some(v) => {
                    args.push(format!("{name}={v}"));
                    kept.push(format!("{name} {ver} -> {v}"));
                }
                None => bail!(refusal(packages, &plan)),
            }
        }
        let again = simulate(&args)?;
        if !again.removes.is_empty() {
            bail!(refusal(packages, &again));
        }
        eprintln!(
            "xtask: installing {} would remove {}; keeping {} by installing the configured suites' version instead ({}), so every tool stays",
            packages.join(" "),
            names(&plan.removes),
            if kept.len() == 1 { "it" } else { "them" },
            kept.join(", ")
        );
    }
    let before = installed_packages()?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(["--no-remove", "--allow-downgrades"])
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", args.join(" ")))?;
    let after = installed_packages()?;
    let lost: Vec<&String> = before.difference(&after).collect();
    if !lost.is_empty() {
        bail!("apt-get install removed packages it must not: {lost:?}");
    }
    Ok(())
}

fn names(list: &[(String, String)]) -> String {
    list.iter()
        .map(|(n, v)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn refusal(packages: &[&str], plan: &AptPlan) -> String {
    format!(
        "refusing to install {}: apt would remove {} and no configured repository offers a version that stays \
         installed beside them. Fix: make a version of each removed package co-installable (e.g. add the suite \
         it came from, such as bookworm-backports, to apt's sources) and run this again, or install the packages \
         by hand once you accept the removal",
        packages.join(" "),
        names(&plan.removes)
    )
}

/// promtool, for the metrics test (`promtool check metrics`), taken from
/// Debian's `prometheus` package (`apt-get download`, `dpkg-deb -x` into
/// a scratch directory) to `target/tools/promtool`; the package is never
/// installed, since that would start its service, listening. Returns
/// promtool's path.
pub(crate) fn promtool() -> Result<std::path::PathBuf> {
    let tools = target_dir().join("tools");
    let bin = tools.join("promtool");
    if bin.exists() {
        return Ok(bin);
    }
    let scratch = tools.join("prometheus-deb");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let got = extract_promtool(&scratch, &bin);
    let _ = std::fs::remove_dir_all(&scratch);
    got?;
    Ok(bin)
}

/// Downloads Debian's `prometheus` package into `scratch`, unpacks it
/// there and copies its promtool to `bin`.
fn extract_promtool(scratch: &Path, bin: &Path) -> Result<()> {
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "prometheus"])
            .current_dir(scratch)
            .status()
            .is_ok_and(|s| s.success())
    };
    // A machine whose package lists were never fetched knows no package.
    if !download() {
        if !is_root() {
            bail!(
                "cannot download Debian's prometheus package (for promtool) with apt-get \
                 download; run `apt-get update` as root, or set FERRY_PROMTOOL to a promtool"
            );
        }
        run(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update failed")?;
        anyhow::ensure!(
            download(),
            "apt-get download prometheus failed (for promtool) even after apt-get update"
        );
    }
    let deb = std::fs::read_dir(scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", scratch.display()))?;
    let unpacked = scratch.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let from = unpacked.join("usr/bin/promtool");
    let partial = bin.with_extension("partial");
    std::fs::copy(&from, &partial)
        .with_context(|| format!("{} holds no usr/bin/promtool", deb.display()))?;
    std::fs::rename(&partial, bin)
        .with_context(|| format!("cannot move {} to {}", partial.display(), bin.display()))
}

/// Runs a command, failing with its name when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("cannot run {desc}"))?;
    if !st.success() {
        bail!("{desc} failed with {st}");
    }
    Ok(())
}

/// The workspace root.
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo target directory.
pub(crate) fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The cargo binary running us.
pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apt-get -s install qemu-system-x86` on a machine with a backported
    /// qemu-utils (abridged from a real run here).
    const BACKPORT_CLASH: &str = "\
NOTE: This is only a simulation!
Reading package lists...
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst liblzma5 [5.4.1-1] (5.4.1-1+deb12u2 Debian-Security:12/oldstable-security [amd64])
Inst cpio (2.13+dfsg-7.1 Debian:12.15/oldstable [amd64])
Inst qemu-system-common (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
";

    #[test]
    fn a_plan_that_removes_a_package_is_seen() {
        let plan = parse_apt_plan(BACKPORT_CLASH);
        assert_eq!(
            plan.removes,
            vec![(
                "qemu-utils".to_string(),
                "1:10.0.2+ds-2+deb13u1~bpo12+1".to_string()
            )]
        );
        // An upgrade is not a downgrade; fresh installs are neither.
        assert!(plan.downgrades.is_empty(), "{:?}", plan.downgrades);
    }

    #[test]
    fn a_downgrade_is_told_apart_from_an_upgrade() {
        let plan = parse_apt_plan(
            "Inst qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1] (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])\n\
             Inst libzstd1 [1.5.4+dfsg2-5] (1.5.4+dfsg2-5+deb12u1 Debian-Security:12/oldstable-security [amd64])\n",
        );
        assert!(plan.removes.is_empty());
        assert_eq!(plan.downgrades.len(), 1, "{:?}", plan.downgrades);
        assert_eq!(plan.downgrades[0].0, "qemu-utils");
    }

    #[test]
    fn every_command_that_builds_ferry_needs_libclang() {
        // demo and ci build the ferry binary, whose libublk-sys runs bindgen.
        assert!(crate::demo::NEEDS
            .iter()
            .any(|n| matches!(n.probe, Probe::Libclang)));
        assert!(crate::ci::NEEDS
            .iter()
            .any(|n| matches!(n.probe, Probe::Libclang)));
    }

    #[test]
    fn ci_installs_up_front_what_its_later_steps_need() {
        // The VM test's and the bench's packages are installed in the first
        // step, so a missing one stops CI at once, all named together.
        let ci: BTreeSet<&str> = crate::ci::NEEDS.iter().map(|n| n.package).collect();
        for n in crate::vm::host::NEEDS
            .iter()
            .chain(crate::bench::NEEDS)
            .chain(crate::demo::NEEDS)
            .chain(crate::dist::NEEDS)
        {
            assert!(ci.contains(n.package), "ci does not install {}", n.package);
        }
    }
}
