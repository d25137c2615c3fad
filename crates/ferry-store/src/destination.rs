//! A destination disk as a pair of files: the backing file and its state
//! file, opened together (resume) or created together (fresh), locked, and
//! refused in every combination whose contents would be unknown.
//!
//! Creation is atomic: both files are made under temporary names
//! ([`temp_path`]), made durable, then renamed into place, the backing file
//! first. A crash therefore leaves nothing, temporary files only (removed
//! on the next start: nothing in them was ever served), or the backing file
//! plus the temporary state file (the creation is completed on the next
//! start: the pair id proves they belong together). The caller makes the
//! directory entries durable ([`crate::sync_parent_dir`]) before it records
//! anything as durable in the files.
//!
//! A block device as the disk (an LVM volume, a LUN) always exists and is
//! never created, resized or removed: with no state file it is taken
//! fresh (its first bytes zeroed, then the state file created), with one
//! it is resumed ([`open_or_adopt_device`]).

use std::io;
use std::path::{Path, PathBuf};

use ferry_core::Geometry;

use crate::backing::{Backing, BackingError};
use crate::state::{Pairing, StateError, StateFile};

/// Errors opening or creating a destination disk.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The backing file.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// A state file without its disk.
    #[error(
        "state file {state} exists but the disk {disk} does not; refusing to start \
         (remove the state file to start afresh)"
    )]
    StateWithoutDisk {
        /// The disk's path.
        disk: PathBuf,
        /// The state file's path.
        state: PathBuf,
    },
    /// File-system operations around them.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The opened pair.
#[derive(Debug)]
pub struct Destination {
    /// The backing file, locked.
    pub backing: Backing,
    /// The state file, locked.
    pub state: StateFile,
    /// Whether the files existed (with or without anything in them).
    pub resumed: bool,
    /// Whether this call renamed new files into place: their directory
    /// entries are not durable yet.
    pub created: bool,
}

/// Guest writes a previous run of the pull acknowledged on this boot and
/// that [`Destination::keep_recovered_writes`] made durable and present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveredWrites {
    /// Blocks made present.
    pub blocks: u64,
    /// Chunks marked as the guest's.
    pub chunks: usize,
}

impl Destination {
    /// Writes the guest was told were done before a crash of the pull on
    /// this boot are in the page cache: makes them durable and present
    /// now, so nothing fetched later can overwrite them. Their chunks are
    /// the guest's, present blocks or not: never compared with the
    /// source's. Returns what was kept (nothing for a clean start).
    pub fn keep_recovered_writes(&mut self) -> Result<RecoveredWrites, DestinationError> {
        let blocks = self.state.recovered_writes().to_vec();
        let guest_chunks = self.state.recovered_guest_chunks().to_vec();
        if blocks.is_empty() && guest_chunks.is_empty() {
            return Ok(RecoveredWrites::default());
        }
        let kept = RecoveredWrites {
            blocks: blocks.iter().map(|r| r.end - r.start).sum(),
            chunks: guest_chunks.len(),
        };
        self.backing.sync().map_err(|source| DestinationError::Io {
            op: "sync the backing file",
            path: self.backing.path().to_owned(),
            source,
        })?;
        self.state.persist(&ferry_core::SyncBatch {
            blocks,
            guest_chunks,
        })?;
        Ok(kept)
    }
}

/// The temporary name under which `path` is created.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".ferry-new");
    PathBuf::from(s)
}

fn exists(path: &Path) -> Result<bool, DestinationError> {
    path.try_exists().map_err(|source| DestinationError::Io {
        op: "check for",
        path: path.to_owned(),
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), DestinationError> {
    std::fs::rename(from, to).map_err(|source| DestinationError::Io {
        op: "rename into place",
        path: from.to_owned(),
        source,
    })
}

/// Removes a temporary file left by a creation that crashed before both
/// files were in place (nothing in it was served), unless another process
/// holds it (a creation under way: refused with its PID).
fn remove_leftover(path: &Path) -> Result<(), DestinationError> {
    if !exists(path)? {
        return Ok(());
    }
    // Locking needs a descriptor open for writing; any file will do.
    let held = crate::backing::open_locked(path, false);
    if let Err(e @ BackingError::Locked { .. }) = held {
        return Err(e.into());
    }
    tracing::info!(path = %path.display(), "removing a file left by an interrupted creation");
    std::fs::remove_file(path).map_err(|source| DestinationError::Io {
        op: "remove the leftover",
        path: path.to_owned(),
        source,
    })
}

/// Opens (resume) or creates (fresh) the disk `disk` with state `state`
/// for a source of geometry `geo` and id `source_id`. Never modifies an
/// existing file it refuses.
pub fn open_or_create(
    disk: &Path,
    state: &Path,
    geo: Geometry,
    source_id: [u8; 32],
) -> Result<Destination, DestinationError> {
    open_or_create_until(disk, state, geo, source_id, None)
}

/// The steps of a fresh creation, for tests that stop it as a crash would.
const STEP_BACKING: u8 = 1;
const STEP_BOUND: u8 = 2;
const STEP_STATE: u8 = 3;
const STEP_RENAMED_BACKING: u8 = 4;

/// [`open_or_create`]; with `crash_at`, a fresh creation stops after that
/// step leaving everything as it is (a test's crash).
fn open_or_create_until(
    disk: &Path,
    state: &Path,
    geo: Geometry,
    source_id: [u8; 32],
    crash_at: Option<u8>,
) -> Result<Destination, DestinationError> {
    let crash = |step: u8| match crash_at {
        Some(s) if s == step => Err(DestinationError::Io {
            op: "go on (a test's crash) with",
            path: disk.to_owned(),
            source: io::Error::other("crash"),
        }),
        _ => Ok(()),
    };
    let is_device =
        crate::backing::is_block_device(disk).map_err(|source| DestinationError::Io {
            op: "stat",
            path: disk.to_owned(),
            source,
        })?;
    if is_device {
        return open_or_adopt_device(disk, state, geo, source_id);
    }
    let (disk_tmp, state_tmp) = (temp_path(disk), temp_path(state));
    match (exists(disk)?, exists(state)?) {
        (true, true) => {
            let backing = Backing::open(disk, geo.disk_size)?;
            let state = StateFile::open(state, geo, source_id, &backing)?;
            Ok(Destination {
                backing,
                state,
                resumed: true,
                created: false,
            })
        }
        (true, false) if exists(&state_tmp)? => {
            // A creation stopped between its two renames: complete it if
            // the state file is the backing file's.
            let backing = Backing::open(disk, geo.disk_size)?;
            let st = StateFile::open(&state_tmp, geo, source_id, &backing)?;
            rename(&state_tmp, state)?;
            tracing::info!(state = %state.display(), "completed an interrupted creation");
            Ok(Destination {
                backing,
                state: st,
                resumed: true,
                created: true,
            })
        }
        (true, false) => {
            // Check the size first for the clearer message.
            let found = std::fs::metadata(disk)
                .map_err(|source| DestinationError::Io {
                    op: "stat",
                    path: disk.to_owned(),
                    source,
                })?
                .len();
            if found != geo.disk_size {
                return Err(BackingError::SizeMismatch {
                    path: disk.to_owned(),
                    found,
                    expected: geo.disk_size,
                }
                .into());
            }
            Err(BackingError::Orphan {
                path: disk.to_owned(),
                state: state.to_owned(),
            }
            .into())
        }
        (false, true) => Err(DestinationError::StateWithoutDisk {
            disk: disk.to_owned(),
            state: state.to_owned(),
        }),
        (false, false) => {
            remove_leftover(&disk_tmp)?;
            remove_leftover(&state_tmp)?;
            // Fails without touching anything if another creation holds
            // the name.
            let backing = Backing::create_unsynced(&disk_tmp, geo.disk_size)?;
            crash(STEP_BACKING)?;
            let made = create(backing, &disk_tmp, &state_tmp, geo, source_id, &crash).and_then(
                |(b, s)| {
                    rename(&disk_tmp, disk)?;
                    crash(STEP_RENAMED_BACKING)?;
                    rename(&state_tmp, state)?;
                    Ok((b, s))
                },
            );
            match made {
                Err(e) if crash_at.is_some() => Err(e),
                Ok((backing, state)) => Ok(Destination {
                    backing,
                    state,
                    resumed: false,
                    created: true,
                }),
                Err(e) => {
                    for p in [&disk_tmp, &state_tmp, disk] {
                        let _ = std::fs::remove_file(p);
                    }
                    Err(e)
                }
            }
        }
    }
}

/// [`open_or_create`] for a block device `disk`: resumes it with its state
/// file, or takes it fresh: opened exclusively, checked to be large enough,
/// zeroed over the source's size and synced, then the state file is
/// created (under its temporary name, then renamed). A crash before that
/// rename leaves no state file (a temporary one is removed), so the next
/// start takes the device fresh again. Nothing here removes, truncates or resizes the device.
fn open_or_adopt_device(
    disk: &Path,
    state: &Path,
    geo: Geometry,
    source_id: [u8; 32],
) -> Result<Destination, DestinationError> {
    let state_tmp = temp_path(state);
    if exists(state)? {
        let backing = Backing::open(disk, geo.disk_size)?;
        let state = StateFile::open(state, geo, source_id, &backing)?;
        return Ok(Destination {
            backing,
            state,
            resumed: true,
            created: false,
        });
    }
    // A creation that stopped before its state file's rename served
    // nothing: start it again.
    remove_leftover(&state_tmp)?;
    let backing = Backing::open(disk, geo.disk_size)?;
    let t0 = std::time::Instant::now();
    tracing::info!(
        disk = %disk.display(),
        bytes = geo.disk_size,
        "zeroing the block device's first bytes: the source's zero chunks are never fetched"
    );
    backing.zero_all().map_err(|source| DestinationError::Io {
        op: "zero",
        path: disk.to_owned(),
        source,
    })?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "block device zeroed");
    let pairing = Pairing::bind(&backing).map_err(|source| DestinationError::Io {
        op: "bind",
        path: disk.to_owned(),
        source,
    })?;
    let made = StateFile::create(&state_tmp, geo, source_id, pairing)
        .map_err(DestinationError::from)
        .and_then(|st| rename(&state_tmp, state).map(|()| st));
    match made {
        Ok(st) => Ok(Destination {
            backing,
            state: st,
            resumed: false,
            created: true,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&state_tmp);
            Err(e)
        }
    }
}

/// Both files under their temporary names, bound to each other, durable.
fn create(
    backing: Backing,
    disk_tmp: &Path,
    state_tmp: &Path,
    geo: Geometry,
    source_id: [u8; 32],
    crash: &dyn Fn(u8) -> Result<(), DestinationError>,
) -> Result<(Backing, StateFile), DestinationError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| DestinationError::Io { op, path, source }
    };
    let pairing = Pairing::bind(&backing).map_err(io("bind", disk_tmp))?;
    backing.sync_all().map_err(io("sync", disk_tmp))?;
    crash(STEP_BOUND)?;
    let state = StateFile::create(state_tmp, geo, source_id, pairing)?;
    crash(STEP_STATE)?;
    Ok((backing, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::SyncBatch;

    const GEO: Geometry = Geometry {
        disk_size: 16 << 20,
        chunk_size: 65536,
    };

    /// Defect: a crash while a fresh pull created its files left a backing
    /// file without its state file, refused on every restart.
    #[test]
    fn a_crash_at_any_step_of_a_creation_leaves_a_pair_the_next_start_uses() {
        for step in [STEP_BACKING, STEP_BOUND, STEP_STATE, STEP_RENAMED_BACKING] {
            let dir = tempfile::tempdir().unwrap();
            let (disk, state) = (dir.path().join("d.img"), dir.path().join("d.st"));
            let e = open_or_create_until(&disk, &state, GEO, [3; 32], Some(step)).unwrap_err();
            assert!(e.to_string().contains("a test's crash"), "{e}");
            // The process is gone: its locks with it (dropped above).
            let d = open_or_create(&disk, &state, GEO, [3; 32])
                .unwrap_or_else(|e| panic!("after a crash at step {step}: {e}"));
            assert!(d.created, "step {step}");
            assert!(d.state.present_bits(GEO.blocks()).not_any());
            drop(d);
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "step {step}: {names:?}");
            let d = open_or_create(&disk, &state, GEO, [3; 32]).unwrap();
            assert!(d.resumed && !d.created, "step {step}");
        }
    }

    #[test]
    fn a_pair_is_created_owner_only_locked_and_resumed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (disk, state) = (dir.path().join("d.img"), dir.path().join("d.st"));
        let mut d = open_or_create(&disk, &state, GEO, [3; 32]).unwrap();
        assert!(!d.resumed && d.created);
        for f in [&disk, &state] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        d.state
            .persist(&SyncBatch {
                blocks: vec![0..3],
                guest_chunks: vec![],
            })
            .unwrap();
        let e = open_or_create(&disk, &state, GEO, [3; 32]).unwrap_err();
        assert!(e.to_string().contains("is in use by"), "{e}");
        drop(d);
        let d = open_or_create(&disk, &state, GEO, [3; 32]).unwrap();
        assert!(d.resumed);
        assert_eq!(d.state.present_bits(GEO.blocks()).count_ones(), 3);
        // Another pair's state file of the same source is refused.
        let (disk2, state2) = (dir.path().join("e.img"), dir.path().join("e.st"));
        drop(open_or_create(&disk2, &state2, GEO, [3; 32]).unwrap());
        drop(d);
        let e = open_or_create(&disk2, &state, GEO, [3; 32]).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
    }
}
