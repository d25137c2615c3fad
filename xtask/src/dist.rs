//! `cargo xtask dist`: the Debian package. Builds `ferry` with the `dist`
//! profile (release, debug info stripped), has that binary write its man
//! pages and shell completions (`ferry generate-docs`, from its own clap
//! CLI, so they never drift), copies the systemd units with `ExecStart=`
//! pointed at the package's `/usr/bin/ferry`, and runs cargo-deb with the
//! metadata in `ublk-target/Cargo.toml` (docs/decisions/packaging.md).
//! `--check` then installs the package into a scratch root with dpkg and
//! checks what it installed: the binary runs, `man ferry-pull` renders.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::setup::{cargo, run, target_dir, tool, workspace_root, Need, LIBCLANG};

/// What packaging needs: dpkg-deb (cargo-deb packs with it when present,
/// and the check lists and installs with dpkg), dpkg-shlibdeps for the
/// package's `Depends:` on the shared libraries ferry links, man-db for
/// the check that the pages render, gzip for the pages, and libclang to
/// build ferry.
pub(crate) const NEEDS: &[Need] = &[
    tool("dpkg-deb", "dpkg"),
    tool("gzip", "gzip"),
    tool("dpkg-shlibdeps", "dpkg-dev"),
    tool("man", "man-db"),
    LIBCLANG,
];

/// The cargo-deb release used (installed from crates.io if missing).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Where the units in `scripts/systemd/` run ferry from (a `cargo install`
/// or hand-copied binary), and where the package puts it.
const UNIT_BIN: &str = "/usr/local/bin/ferry";
const PACKAGE_BIN: &str = "/usr/bin/ferry";

/// Options of `cargo xtask dist`.
#[derive(clap::Args, Debug)]
pub(crate) struct DistArgs {
    /// Then install the package into a scratch root with dpkg and check it:
    /// its files, `ferry --version`, and that `man ferry-pull` renders.
    #[arg(long)]
    pub(crate) check: bool,
}

/// Runs `cargo xtask dist`.
pub(crate) fn run_dist(args: &DistArgs) -> Result<()> {
    let deb = build_deb()?;
    if args.check {
        check_deb(&deb)?;
    }
    println!("{}", deb.display());
    Ok(())
}

/// The `dist` profile's output directory.
fn dist_dir() -> PathBuf {
    target_dir().join("dist")
}

/// Makes sure `cargo deb` is the pinned cargo-deb, installing it (from
/// crates.io, into cargo's own bin directory) if not.
fn ensure_cargo_deb() -> Result<()> {
    let out = Command::new(cargo()).args(["deb", "--version"]).output();
    let have = out
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have
        .as_deref()
        .is_some_and(|v| v.ends_with(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-deb {CARGO_DEB_VERSION} (found: {})",
        have.as_deref().unwrap_or("none")
    );
    run(Command::new(cargo())
        .args(["install", "cargo-deb", "--locked", "--version"])
        .arg(CARGO_DEB_VERSION))
    .context("cannot install cargo-deb")
}

/// A unit from `scripts/systemd/` as the package installs it: `ExecStart=`
/// runs the package's `/usr/bin/ferry`.
pub(crate) fn packaged_unit(name: &str, text: &str) -> Result<String> {
    let exec = text
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect::<Vec<_>>();
    ensure!(
        exec.len() == 1 && exec[0].starts_with(&format!("ExecStart={UNIT_BIN} ")),
        "{name}: expected one `ExecStart={UNIT_BIN} ...` line, found {exec:?}"
    );
    Ok(text.replace(
        &format!("ExecStart={UNIT_BIN} "),
        &format!("ExecStart={PACKAGE_BIN} "),
    ))
}

/// Builds the package; returns the path of the `.deb`.
fn build_deb() -> Result<PathBuf> {
    let root = workspace_root();
    crate::setup::ensure(NEEDS)?;
    ensure_cargo_deb()?;
    let t0 = Instant::now();
    run(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--profile",
        "dist",
        "-p",
        "ferry",
        "--bin",
        "ferry",
    ]))?;
    let bin = dist_dir().join("ferry");
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("the dist build left no {}", bin.display()))?
        .len();
    eprintln!(
        "dist: {} is {:.1} MB (built in {:.0} s)",
        bin.display(),
        size as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    // Everything cargo-deb packs besides the binary, under target/dist/pkg
    // (`target/release/pkg/...` in the metadata: cargo-deb maps
    // `target/release/` to the profile's directory).
    let stage = dist_dir().join("pkg");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    run(Command::new(&bin)
        .arg("generate-docs")
        .arg("--out")
        .arg(&stage))?;
    // Debian ships man pages gzipped; cargo-deb compresses only the
    // pages it does not take from the build's output directory.
    let man = stage.join("man");
    for e in std::fs::read_dir(&man).with_context(|| format!("listing {}", man.display()))? {
        run(Command::new("gzip")
            .args(["-9", "--no-name"])
            .arg(e?.path()))?;
    }
    let units = stage.join("systemd");
    std::fs::create_dir_all(&units)?;
    for name in ["ferry-serve@.service", "ferry-pull@.service"] {
        let src = root.join("scripts/systemd").join(name);
        let text =
            std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
        std::fs::write(units.join(name), packaged_unit(name, &text)?)
            .with_context(|| format!("writing {}", units.join(name).display()))?;
    }

    let out = dist_dir().join("deb");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)?;
    run(Command::new(cargo())
        .current_dir(&root)
        .args(["deb", "-p", "ferry", "--profile", "dist", "--no-build"])
        // The profile already strips debug info and keeps the symbol table
        // (names in backtraces): ship the binary as built.
        .arg("--no-strip")
        .arg("--output")
        .arg(&out))?;
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    let [deb] = debs.as_slice() else {
        bail!("expected one .deb in {}, found {debs:?}", out.display());
    };
    let size = std::fs::metadata(deb)?.len();
    eprintln!("dist: {} is {:.1} MB", deb.display(), size as f64 / 1e6);
    Ok(deb.clone())
}

/// Runs a command and returns its standard output; fails with its
/// standard error.
fn output(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs `deb` into a scratch root with dpkg and checks the result.
fn check_deb(deb: &Path) -> Result<()> {
    // What the package holds: the binary, a page per subcommand (as
    // written by generate-docs), the completions, the units, the licence.
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let mut want: Vec<String> = [
        "usr/bin/ferry",
        "usr/share/bash-completion/completions/ferry",
        "usr/share/zsh/vendor-completions/_ferry",
        "usr/share/fish/vendor_completions.d/ferry.fish",
        "usr/lib/systemd/system/ferry-serve@.service",
        "usr/lib/systemd/system/ferry-pull@.service",
        "usr/share/doc/ferry/copyright",
        "usr/share/doc/ferry/handoff.md",
        "usr/share/doc/ferry/examples/libvirt-hook-qemu",
    ]
    .map(String::from)
    .to_vec();
    let man = dist_dir().join("pkg/man");
    for e in std::fs::read_dir(&man).with_context(|| format!("listing {}", man.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        want.push(format!("usr/share/man/man1/{name}"));
    }
    ensure!(
        want.iter().any(|w| w.ends_with("/ferry-pull.1.gz")),
        "generate-docs wrote no ferry-pull.1: {want:?}"
    );
    for w in &want {
        ensure!(
            listing.lines().any(|l| l.ends_with(&format!("./{w}"))),
            "the package lacks /{w}:\n{listing}"
        );
    }

    // Install into a scratch root with its own dpkg database. Only the
    // dependencies are forced: the scratch database knows no libc6 (the
    // binary runs against the host's).
    let scratch = dist_dir().join("root");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("clearing {}", scratch.display()))?;
    }
    let admin = scratch.join("var/lib/dpkg");
    for d in ["info", "updates"] {
        std::fs::create_dir_all(admin.join(d))?;
    }
    std::fs::write(admin.join("status"), "")?;
    run(Command::new("dpkg")
        .arg(format!("--root={}", scratch.display()))
        .args(["--force-depends", "--install"])
        .arg(deb))?;
    let status = output(
        Command::new("dpkg")
            .arg(format!("--root={}", scratch.display()))
            .args(["--status", "ferry"]),
    )?;
    ensure!(
        status.contains("Status: install ok installed"),
        "dpkg does not have ferry installed in {}:\n{status}",
        scratch.display()
    );
    for w in &want {
        ensure!(
            scratch.join(w).is_file(),
            "dpkg did not install /{w} into {}",
            scratch.display()
        );
    }

    // The installed binary runs.
    let version = output(Command::new(scratch.join("usr/bin/ferry")).arg("--version"))?;
    ensure!(
        version.trim() == format!("ferry {}", env!("CARGO_PKG_VERSION")),
        "the installed ferry says {version:?}"
    );

    // The installed units run the installed binary.
    for unit in ["ferry-serve@.service", "ferry-pull@.service"] {
        let path = scratch.join("usr/lib/systemd/system").join(unit);
        let text = std::fs::read_to_string(&path)?;
        let sub = unit
            .trim_start_matches("ferry-")
            .trim_end_matches("@.service");
        ensure!(
            text.contains(&format!("ExecStart={PACKAGE_BIN} {sub} ")) && !text.contains(UNIT_BIN),
            "{} does not run {PACKAGE_BIN} {sub}:\n{text}",
            path.display()
        );
    }

    // The installed bash completion loads and completes ferry.
    let bash = scratch.join("usr/share/bash-completion/completions/ferry");
    let complete = output(
        Command::new("bash")
            .arg("-c")
            .arg("source \"$1\" && complete -p ferry")
            .arg("bash")
            .arg(&bash),
    )?;
    ensure!(
        complete.contains("-F _ferry ferry"),
        "{} does not complete ferry: {complete}",
        bash.display()
    );

    // `man ferry-pull` finds the installed page (MANPATH: the scratch
    // root's pages only) and renders it; so does `man -l` on the file.
    let pages = scratch.join("usr/share/man");
    let by_name = output(man_command().env("MANPATH", &pages).arg("ferry-pull"))
        .context("man ferry-pull (MANPATH: the scratch root)")?;
    check_pull_page(&by_name).context("man ferry-pull")?;
    let by_file = output(
        man_command()
            .arg("-l")
            .arg(pages.join("man1/ferry-pull.1.gz")),
    )?;
    check_pull_page(&by_file).context("man -l ferry-pull.1.gz")?;
    eprintln!(
        "dist: installed into {}; `man ferry-pull` renders {} lines",
        scratch.display(),
        by_name.lines().count()
    );
    Ok(())
}

/// `man` printing plain text (no pager, no terminal formatting).
fn man_command() -> Command {
    let mut cmd = Command::new("man");
    cmd.env("LC_ALL", "C")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .env("MANWIDTH", "80")
        .env_remove("MAN_KEEP_FORMATTING");
    cmd
}

/// Checks `man ferry-pull`'s rendered text: its name line, and an OPTIONS
/// section that has --disk and --source.
pub(crate) fn check_pull_page(text: &str) -> Result<()> {
    let options = text
        .split_once("\nOPTIONS\n")
        .map(|(_, rest)| rest)
        .with_context(|| format!("no OPTIONS section in:\n{text}"))?;
    // man justifies lines: compare with runs of spaces made one.
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    ensure!(
        flat.contains("NAME ferry-pull - Present a source's disk locally"),
        "no NAME line for ferry-pull in:\n{text}"
    );
    for opt in ["--disk", "--source", "--control"] {
        ensure!(
            options.lines().any(|l| l.trim_start().starts_with(opt)),
            "OPTIONS lacks {opt}:\n{text}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_units_run_the_packaged_binary_and_are_otherwise_the_same() {
        for name in ["ferry-serve@.service", "ferry-pull@.service"] {
            let src = workspace_root().join("scripts/systemd").join(name);
            let text = std::fs::read_to_string(&src).unwrap();
            let unit = packaged_unit(name, &text).unwrap();
            assert!(!unit.contains(UNIT_BIN), "{unit}");
            assert!(unit.contains("ExecStart=/usr/bin/ferry "), "{unit}");
            assert_eq!(unit.replace(PACKAGE_BIN, UNIT_BIN), text);
        }
    }

    #[test]
    fn a_unit_whose_exec_start_is_elsewhere_is_refused() {
        let e = packaged_unit("x.service", "[Service]\nExecStart=/opt/ferry pull\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.service"), "{e}");
    }

    #[test]
    fn a_page_without_its_options_is_refused() {
        let good = "FERRY-PULL(1)\n\nNAME\n       ferry-pull - Present a source's disk locally at once\n\nOPTIONS\n       --source <SOURCE>\n       --disk <DISK>\n       --control <CONTROL>\n";
        check_pull_page(good).unwrap();
        assert!(check_pull_page(&good.replace("--disk", "--dusk")).is_err());
        assert!(check_pull_page(&good.replace("\nOPTIONS\n", "\n")).is_err());
    }
}
