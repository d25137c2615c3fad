//! `cargo xtask vm-test`: boots a kernel with the real ublk driver under QEMU
//! and runs ferry's ublk checks inside it.

use anyhow::Result;

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug)]
pub(crate) struct VmTestArgs {}

/// Runs the VM test.
pub(crate) fn vm_test(_args: &VmTestArgs) -> Result<()> {
    anyhow::bail!("vm-test: not written yet")
}
