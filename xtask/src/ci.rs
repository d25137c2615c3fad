//! `cargo xtask ci`: exactly what CI runs. Formatting, clippy with
//! `-D warnings`, every test of the workspace (with the tools they need
//! required, not skipped), a short run of the emulated WAN, then the VM
//! test on the real ublk driver.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::setup::{cargo, ensure_tools, run, workspace_root};

/// Tools the tests need, and the Debian packages that have them.
pub(crate) const TEST_TOOLS: &[(&str, &str)] = &[
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("mkfs.ext4", "e2fsprogs"),
];

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t0 = Instant::now();
    eprintln!("==> ci: {name}");
    f().with_context(|| format!("ci step `{name}` failed"))?;
    eprintln!("==> ci: {name}: ok ({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Runs CI.
pub(crate) fn run_ci() -> Result<()> {
    let root = workspace_root();
    step("tools", || ensure_tools(TEST_TOOLS))?;
    step("fmt", || {
        run(Command::new(cargo())
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        run(Command::new(cargo()).current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("build ferry", || {
        run(Command::new(cargo())
            .current_dir(&root)
            .args(["build", "-p", "ferry", "--bin", "ferry"]))
    })?;
    step("tests", || {
        run(Command::new(cargo())
            .current_dir(&root)
            .env("FERRY_REQUIRE_ALL", "1")
            .args(["test", "--workspace", "--exclude", "xtask"]))
    })?;
    step("xtask tests", || {
        run(Command::new(cargo())
            .current_dir(&root)
            .env("FERRY_REQUIRE_ALL", "1")
            .args(["test", "-p", "xtask"]))
    })?;
    step(
        "wan-smoke (emulated WAN: UDP relay and TUN link between namespaces)",
        || {
            run(Command::new(cargo()).current_dir(&root).args([
                "run",
                "--quiet",
                "-p",
                "xtask",
                "--",
                "wan-smoke",
            ]))
        },
    )?;
    step("vm-test (real ublk driver in a VM)", || {
        run(Command::new(cargo())
            .current_dir(&root)
            .args(["run", "--quiet", "-p", "xtask", "--", "vm-test"]))
    })?;
    eprintln!("==> ci: all steps passed");
    Ok(())
}
