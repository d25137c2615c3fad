//! Host set-up for the VM test: Debian packages it needs, and Debian's cloud
//! kernel with its modules, unpacked once into the cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::run;
use crate::setup::{file, Need};

/// Debian packages the harness uses, each with a file that shows it is
/// installed.
pub(crate) const NEEDS: &[Need] = &[
    file("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    file("/bin/busybox", "busybox-static"),
    file("/usr/bin/cpio", "cpio"),
    file("/usr/bin/xz", "xz-utils"),
    file("/usr/bin/zstd", "zstd"),
    file("/usr/sbin/depmod", "kmod"),
    // libublk's -sys crate runs bindgen, which needs libclang.
    crate::setup::LIBCLANG,
    file("/usr/sbin/mkfs.ext4", "e2fsprogs"),
    file("/usr/bin/fio", "fio"),
    file("/usr/sbin/blkdiscard", "util-linux"),
    file("/usr/bin/cmp", "diffutils"),
];

/// The metapackage that depends on the current 6.12 cloud kernel.
const KERNEL_META: &str = "linux-image-6.12-cloud-amd64";

/// Installs whatever of [`NEEDS`] is missing (as root, never removing a
/// package), or fails naming the packages to install.
pub(crate) fn ensure_packages() -> Result<()> {
    crate::setup::ensure(NEEDS).context("vm-test's packages")
}

/// An unpacked kernel: its image and decompressed modules.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// Kernel release, e.g. `6.12.117+deb12-cloud-amd64`.
    pub(crate) release: String,
    /// The bzImage.
    pub(crate) vmlinuz: PathBuf,
    /// Unpacked package root (holds `lib/modules/<release>`).
    pub(crate) root: PathBuf,
}

impl Kernel {
    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// `names` and every module they depend on, dependencies first, as
    /// decompressed `.ko` files under `out`.
    pub(crate) fn modules_with_deps(&self, names: &[&str], out: &Path) -> Result<Vec<PathBuf>> {
        let dep_path = self.modules_dir().join("modules.dep");
        let dep = fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        let order = dependency_order(&dep, names)?;
        fs::create_dir_all(out)?;
        let mut files = Vec::new();
        for rel in order {
            let src = self.modules_dir().join(&rel);
            let name = module_name(&rel);
            let dst = out.join(format!("{name}.ko"));
            if !dst.exists() {
                let ko = if rel.ends_with(".xz") {
                    run_output(Command::new("xz").arg("-dc").arg(&src))?
                } else {
                    fs::read(&src).with_context(|| format!("reading {}", src.display()))?
                };
                fs::write(&dst, ko)?;
            }
            files.push(dst);
        }
        Ok(files)
    }
}

/// Module name of a `modules.dep` path (`kernel/drivers/block/ublk_drv.ko.xz`
/// → `ublk_drv`).
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Paths (relative to the modules directory) of `names` and their
/// dependencies, in an order that `insmod` accepts.
fn dependency_order(modules_dep: &str, names: &[&str]) -> Result<Vec<String>> {
    let mut deps = std::collections::HashMap::new();
    for line in modules_dep.lines() {
        if let Some((module, rest)) = line.split_once(':') {
            let list: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(module), (module.to_string(), list));
        }
    }
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        let Some((path, list)) = deps.get(name) else {
            bail!("kernel module {name} is not in modules.dep");
        };
        if out.contains(path) {
            return Ok(());
        }
        // modules.dep lists the full closure, most dependent first.
        for dep in list.iter().rev() {
            if !out.contains(dep) {
                out.push(dep.clone());
            }
        }
        out.push(path.clone());
        Ok(())
    }
    let mut out = Vec::new();
    for name in names {
        visit(name, &deps, &mut out)?;
    }
    Ok(out)
}

/// Fetches and unpacks Debian's 6.12 cloud kernel into `cache` once.
pub(crate) fn ensure_kernel(cache: &Path) -> Result<Kernel> {
    let dir = cache.join("kernel");
    let ready = dir.join("ready");
    if let Ok(release) = fs::read_to_string(&ready) {
        let kernel = kernel_at(&dir, release.trim());
        if kernel.vmlinuz.exists() && kernel.modules_dir().join("modules.dep").exists() {
            return Ok(kernel);
        }
    }
    let package = concrete_kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .context("unexpected kernel package name")?
        .to_string();
    println!("vm-test: fetching kernel package {package}");
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    // apt-get download drops privileges to _apt, which must write here.
    set_mode(&debs, 0o777)?;
    for entry in fs::read_dir(&debs)? {
        fs::remove_file(entry?.path())?;
    }
    run(Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&debs))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let kernel = kernel_at(&dir, &release);
    if !kernel.vmlinuz.exists() {
        bail!("{} has no {}", package, kernel.vmlinuz.display());
    }
    fs::remove_file(&deb)?;
    fs::write(&ready, &release)?;
    Ok(kernel)
}

fn kernel_at(dir: &Path, release: &str) -> Kernel {
    let root = dir.join("root");
    Kernel {
        release: release.to_string(),
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        root,
    }
}

/// `linux-image-6.12.N+debM-cloud-amd64`, from the metapackage's Depends.
fn concrete_kernel_package() -> Result<String> {
    let query = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_META])
            .output()
            .context("running apt-cache depends")?;
        Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
    };
    if let Some(pkg) = query()? {
        return Ok(pkg);
    }
    if rustix::process::geteuid().is_root() {
        println!("vm-test: {KERNEL_META} unknown to apt; running apt-get update");
        run(Command::new("apt-get").arg("update"))?;
        if let Some(pkg) = query()? {
            return Ok(pkg);
        }
    }
    bail!("apt-cache depends {KERNEL_META} names no kernel package (apt-get update?)")
}

fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p != &KERNEL_META)
        .map(str::to_string)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn run_output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_names_the_concrete_kernel() {
        let out =
            "linux-image-6.12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn dependencies_come_first() {
        let dep = "kernel/drivers/block/ublk_drv.ko.xz:\n\
                   kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
                   kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
                   kernel/net/core/failover.ko.xz:\n";
        let order = dependency_order(dep, &["ublk_drv", "virtio_net", "net_failover"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/block/ublk_drv.ko.xz",
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        assert!(dependency_order(dep, &["nope"]).is_err());
    }

    #[test]
    fn module_names_drop_suffix_and_dashes() {
        assert_eq!(
            module_name("kernel/drivers/block/ublk_drv.ko.xz"),
            "ublk_drv"
        );
        assert_eq!(module_name("a/virtio-blk.ko"), "virtio_blk");
    }
}
