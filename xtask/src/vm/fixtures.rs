//! Source images for the ferry checks and the benchmark, made on the host
//! and attached to the VM as read-only virtio disks. The guest finds each by
//! its serial number (`/sys/block/vdX/serial`), so other `--drive`s do not
//! shift them.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::run;

const MIB: u64 = 1 << 20;

/// Serial of the random-data source image (`checks-ferry.sh`).
pub(crate) const SERIAL_RAW: &str = "ferry-src-raw";
/// Serial of the ext4 source image (`checks-ferry.sh`).
pub(crate) const SERIAL_EXT4: &str = "ferry-src-ext4";
/// Serial of the benchmark's source image (`bench-ublk.sh`).
pub(crate) const SERIAL_BENCH: &str = "ferry-bench-src";

/// Name, in the VM's /ferry/files, of the ext4 image's SHA-256 list.
const EXT4_SUMS: &str = "ext4.sha256";

/// A host file attached as a virtio disk.
#[derive(Debug)]
pub(crate) struct Drive {
    pub(crate) path: PathBuf,
    /// `Some`: attached read-only with this serial number; `None`: a plain
    /// read-write `if=virtio` drive (`--drive`).
    pub(crate) serial: Option<String>,
}

/// The source images of `checks-ferry.sh`, and the files it reads.
pub(crate) struct Fixtures {
    pub(crate) drives: Vec<Drive>,
    pub(crate) includes: Vec<PathBuf>,
}

/// Makes, in `dir`:
/// - `src-raw.img`, 32 MiB: random data with a zero hole at 8..24 MiB;
/// - `src-ext4.img`, 64 MiB: ext4 (4 KiB blocks) holding known files, whose
///   SHA-256 list (paths relative to the file system's root) goes to the VM
///   as `/ferry/files/ext4.sha256`.
pub(crate) fn test_fixtures(dir: &Path) -> Result<Fixtures> {
    fresh_dir(dir)?;
    let raw = dir.join("src-raw.img");
    {
        let mut f = fs::File::create(&raw)?;
        write_random(&mut f, 8 * MIB)?;
        f.write_all(&vec![0u8; (16 * MIB) as usize])?;
        write_random(&mut f, 8 * MIB)?;
    }

    let tree = dir.join("ext4-root");
    make_tree(&tree)?;
    let ext4 = dir.join("src-ext4.img");
    fs::File::create(&ext4)?.set_len(64 * MIB)?;
    // -b 4096: the ublk device has 4 KiB logical blocks, and mke2fs would
    // pick 1 KiB blocks for a file system this small.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "ferry-src", "-d"])
        .arg(&tree)
        .arg(&ext4))?;
    let sums = dir.join(EXT4_SUMS);
    sha256_list(&tree, &sums)?;

    Ok(Fixtures {
        drives: vec![
            Drive {
                path: raw,
                serial: Some(SERIAL_RAW.into()),
            },
            Drive {
                path: ext4,
                serial: Some(SERIAL_EXT4.into()),
            },
        ],
        includes: vec![sums],
    })
}

/// The benchmark's source: `size_mib` MiB of random data (every chunk is
/// data, so every byte crosses the wire before the measurement).
pub(crate) fn bench_fixture(dir: &Path, size_mib: u64) -> Result<Drive> {
    fresh_dir(dir)?;
    let path = dir.join("src-bench.img");
    write_random(&mut fs::File::create(&path)?, size_mib * MIB)?;
    Ok(Drive {
        path,
        serial: Some(SERIAL_BENCH.into()),
    })
}

fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn write_random(out: &mut impl Write, len: u64) -> Result<()> {
    let mut urandom = fs::File::open("/dev/urandom")?.take(len);
    let copied = std::io::copy(&mut urandom, out)?;
    if copied != len {
        bail!("/dev/urandom gave {copied} of {len} bytes");
    }
    Ok(())
}

/// Known files of the ext4 image: a few sizes (one not a multiple of the
/// block size), nested directories, and many small files.
fn make_tree(tree: &Path) -> Result<()> {
    fs::create_dir_all(tree.join("data"))?;
    fs::create_dir_all(tree.join("deep/a/b/c"))?;
    fs::create_dir_all(tree.join("many"))?;
    fs::write(
        tree.join("README.txt"),
        "ferry vm-test: source file system, checked through /dev/ublkb0 during the copy\n",
    )?;
    fs::write(tree.join("deep/a/b/c/note.txt"), "four levels down\n")?;
    for (name, len) in [
        ("data/random-1m.bin", MIB),
        ("data/random-odd.bin", 3 * MIB + 4321),
        ("data/small.bin", 100_000),
    ] {
        write_random(&mut fs::File::create(tree.join(name))?, len)?;
    }
    for i in 0..40 {
        let name = tree.join(format!("many/f{i:03}.bin"));
        write_random(&mut fs::File::create(name)?, 4096 + i * 97)?;
    }
    Ok(())
}

/// `sha256sum ./PATH...` of every file under `tree`, run in `tree`.
fn sha256_list(tree: &Path, out: &Path) -> Result<()> {
    let mut files = Vec::new();
    collect_files(tree, Path::new("."), &mut files)?;
    files.sort();
    let output = Command::new("sha256sum")
        .args(&files)
        .current_dir(tree)
        .output()
        .context("running sha256sum")?;
    if !output.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::write(out, output.stdout)?;
    Ok(())
}

fn collect_files(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(base.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            collect_files(base, &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}
