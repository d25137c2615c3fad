//! Builds the VM's initramfs: busybox, the binaries under test, the tools
//! the checks use, their shared libraries, kernel modules, `/init` and the
//! check script.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::run;

/// Tools the checks may use, copied with their libraries when present on
/// the host (busybox provides the rest).
const TOOLS: &[&str] = &[
    "/usr/bin/dd",
    "/usr/bin/cmp",
    "/usr/bin/fio",
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/mke2fs",
    "/usr/sbin/e2fsck",
    "/usr/sbin/blkdiscard",
    // util-linux losetup: `--show`, `-r` (busybox's has neither).
    "/usr/sbin/losetup",
    // The source VM of checks-precopy.sh, writing over NBD.
    "/usr/bin/qemu-io",
];

/// Host configuration files the tools read.
const CONFIG_FILES: &[&str] = &["/etc/mke2fs.conf", "/etc/ld.so.cache"];

/// What goes into the initramfs.
pub(crate) struct Contents<'a> {
    /// Binaries under test, installed in `/usr/local/bin`.
    pub(crate) binaries: &'a [PathBuf],
    /// Decompressed kernel modules, inserted by `/init` in this order.
    pub(crate) modules: &'a [PathBuf],
    /// The `/init` script.
    pub(crate) init: &'a Path,
    /// Shell helpers the check script sources (`$FERRY_LIB`).
    pub(crate) lib: &'a Path,
    /// The check scripts, installed as `/ferry/checks/NN-NAME` and run by
    /// `/init` in this order.
    pub(crate) checks: &'a [PathBuf],
    /// Extra files, installed in `/ferry/files/`.
    pub(crate) includes: &'a [PathBuf],
}

/// Builds the tree under `work/root` and packs it as an uncompressed newc
/// cpio archive (the kernel then has nothing to decompress under TCG).
pub(crate) fn build(contents: &Contents<'_>, work: &Path) -> Result<PathBuf> {
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "lib",
        "lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "root",
        "ferry/files",
        "ferry/modules",
        "ferry/checks",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }

    install_busybox(&root)?;

    let mut elfs = Vec::new();
    for tool in TOOLS {
        let src = Path::new(tool);
        if src.exists() {
            copy_host_file(src, &root)?;
            elfs.push(src.to_path_buf());
        }
    }
    for bin in contents.binaries {
        let name = bin.file_name().context("binary path has no file name")?;
        let dst = root.join("usr/local/bin").join(name);
        copy_stripped(bin, &dst)?;
        elfs.push(bin.clone());
    }
    let mut libs = BTreeSet::new();
    for elf in &elfs {
        libs.extend(shared_libraries(elf)?);
    }
    for lib in &libs {
        copy_host_file(lib, &root)?;
    }
    for conf in CONFIG_FILES {
        if Path::new(conf).exists() {
            copy_host_file(Path::new(conf), &root)?;
        }
    }

    let mut order = String::new();
    for module in contents.modules {
        let name = module.file_name().context("module path has no file name")?;
        fs::copy(module, root.join("ferry/modules").join(name))?;
        order.push_str(&name.to_string_lossy());
        order.push('\n');
    }
    fs::write(root.join("ferry/modules/order"), order)?;

    install_script(contents.init, &root.join("init"))?;
    install_script(contents.lib, &root.join("ferry/lib.sh"))?;
    for (i, script) in contents.checks.iter().enumerate() {
        let name = script
            .file_name()
            .context("check script has no file name")?;
        let mut dst = format!("{:02}-{}", i + 1, name.to_string_lossy());
        if !dst.ends_with(".sh") {
            dst.push_str(".sh");
        }
        install_script(script, &root.join("ferry/checks").join(dst))?;
    }
    for file in contents.includes {
        let name = file.file_name().context("include path has no file name")?;
        fs::copy(file, root.join("ferry/files").join(name))
            .with_context(|| format!("copying {}", file.display()))?;
    }

    let archive = work.join("initramfs.cpio");
    pack(&root, &archive)?;
    Ok(archive)
}

fn install_busybox(root: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    fs::copy(busybox, root.join("bin/busybox")).context("copying /bin/busybox")?;
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet == "busybox" {
            continue;
        }
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    Ok(())
}

/// Shared libraries `ldd` lists for `elf` (empty for a static binary),
/// including the dynamic loader.
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .with_context(|| format!("running ldd {}", elf.display()))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `cp -L --parents`: the file at the same path under `root`.
fn copy_host_file(src: &Path, root: &Path) -> Result<()> {
    run(Command::new("cp")
        .args(["-L", "--parents"])
        .arg(src)
        .arg(root))
}

/// Copies an ELF binary without its debug info (smaller initramfs).
fn copy_stripped(src: &Path, dst: &Path) -> Result<()> {
    if !src.exists() {
        bail!("binary {} does not exist", src.display());
    }
    let stripped = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(dst)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

fn install_script(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `find . | cpio -o -H newc` in `root`, written to `archive`.
fn pack(root: &Path, archive: &Path) -> Result<()> {
    let out = fs::File::create(archive)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
        .current_dir(root)
        .stdout(out)
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("packing the initramfs with cpio failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths_and_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}
