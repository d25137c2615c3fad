//! A read-IOPS budget for the source side's servers (`cargo xtask bench
//! --source-read-iops N`): a source disk on a cloud volume or a busy array
//! answers only so many reads per second, and whatever a server queues at
//! it delays its next read. The servers of the source side (`ferry serve`,
//! `qemu-nbd`) are moved into a cgroup whose reads from the image's disk
//! are throttled to N per second: the blkio controller of cgroup v1
//! (`blkio.throttle.read_iops_device`) where it is mounted, else the io
//! controller of cgroup v2 (`io.max riops=`). The cgroup is removed when
//! the guard is dropped, its processes moved back to the root first.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const V1: &str = "/sys/fs/cgroup/blkio";
const V2: &str = "/sys/fs/cgroup";

/// The throttled cgroup; dropped, it is removed.
pub(crate) struct ReadThrottle {
    dir: PathBuf,
    root: PathBuf,
    /// `major:minor` of the throttled disk.
    pub(crate) device: String,
}

impl ReadThrottle {
    /// A cgroup whose reads of the disk holding `image` are limited to
    /// `iops` per second.
    pub(crate) fn new(image: &Path, iops: u64) -> Result<ReadThrottle> {
        let device = whole_disk(image)?;
        let name = format!("ferry-bench-src-{}", std::process::id());
        let (root, limit_file, limit) = if Path::new(V1).join("cgroup.procs").exists() {
            (
                PathBuf::from(V1),
                "blkio.throttle.read_iops_device",
                format!("{device} {iops}"),
            )
        } else if std::fs::read_to_string(Path::new(V2).join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|w| w == "io"))
            .unwrap_or(false)
        {
            // Best effort: the root may already delegate io.
            let _ = std::fs::write(Path::new(V2).join("cgroup.subtree_control"), "+io");
            (
                PathBuf::from(V2),
                "io.max",
                format!("{device} riops={iops}"),
            )
        } else {
            bail!(
                "--source-read-iops needs the cgroup v1 blkio controller ({V1}) or the \
                 cgroup v2 io controller ({V2}/cgroup.controllers lists `io`); neither is here"
            );
        };
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = ReadThrottle { dir, root, device };
        std::fs::write(t.dir.join(limit_file), &limit).with_context(|| {
            format!("writing {limit:?} to {}", t.dir.join(limit_file).display())
        })?;
        Ok(t)
    }

    /// Moves process `pid` (all its threads) into the throttled cgroup.
    pub(crate) fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving process {pid} into {}", self.dir.display()))
    }

    /// The processes inside now.
    pub(crate) fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for ReadThrottle {
    fn drop(&mut self) {
        for pid in self.procs() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// `major:minor` of the whole disk that holds `path` (throttling works on
/// whole disks, not partitions).
fn whole_disk(path: &Path) -> Result<String> {
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        bail!(
            "{} is on device {major}:{minor}, which is not a block device (a tmpfs or overlay?): \
             --source-read-iops needs the image on a disk",
            path.display()
        );
    }
    if sys.join("partition").exists() {
        let parent = std::fs::canonicalize(&sys)?.join("..").join("dev");
        let d = std::fs::read_to_string(&parent)
            .with_context(|| format!("reading {}", parent.display()))?;
        return Ok(d.trim().to_string());
    }
    Ok(format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_of_a_file_on_a_tmpfs_is_refused_by_name() {
        // /dev/shm is a tmpfs on Debian.
        let p = Path::new("/dev/shm");
        let e = whole_disk(p).unwrap_err().to_string();
        assert!(e.contains("not a block device"), "{e}");
    }

    #[test]
    fn a_throttled_process_is_in_the_cgroup_until_the_guard_goes() {
        let here = crate::setup::workspace_root();
        let t = match ReadThrottle::new(&here, 300) {
            Ok(t) => t,
            Err(e) => {
                if std::env::var("FERRY_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!("a read throttle is required (FERRY_REQUIRE_ALL=1): {e:#}");
                }
                eprintln!("\n!!!!!! SKIPPED: no read throttle here (root and a cgroup io controller needed): {e:#} !!!!!!\n");
                return;
            }
        };
        let dir = t.dir.clone();
        let limit = std::fs::read_to_string(dir.join("blkio.throttle.read_iops_device"))
            .or_else(|_| std::fs::read_to_string(dir.join("io.max")))
            .unwrap();
        assert!(limit.contains(&t.device), "{limit}");
        assert!(limit.contains("300"), "{limit}");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        t.add(child.id()).unwrap();
        assert_eq!(t.procs(), vec![child.id()]);
        drop(t);
        assert!(!dir.exists(), "{} left behind", dir.display());
        let _ = child.kill();
        let _ = child.wait();
    }
}
