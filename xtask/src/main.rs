//! `cargo xtask`: the project's automation. `cargo xtask ci` runs exactly
//! what CI runs; `cargo xtask demo` runs a migration on loopback.

mod vm;

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
    /// Run everything CI runs: fmt, clippy, all tests, the VM test.
    Ci,
    /// Boot a VM with the real ublk driver and run ferry's ublk checks in it.
    VmTest(vm::VmTestArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ci => anyhow::bail!("ci: not written yet"),
        Cmd::VmTest(args) => vm::vm_test(&args),
    }
}
