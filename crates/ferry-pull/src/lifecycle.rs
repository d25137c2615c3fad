//! The end of a migration, as `rbd migration abort/commit` end one:
//! `ferry abort` stops it with the source remaining the truth and keeps the
//! guest's writes at the destination aside ([`ferry_store::guest_writes`])
//! for the operator to apply or discard; `ferry commit` records, once the
//! copy is verified, that the source is no longer needed. Both are recorded
//! in the state file ([`Ended`]). Online through a running pull's shell, or
//! offline on a stopped pull's files.

use std::path::Path;
use std::sync::Arc;

use bitvec::prelude::*;
use ferry_store::guest_writes::{self, Kept, Origin};
use ferry_store::{Ended, StateFile};

use crate::disk::Disk;
use crate::error::PullError;
use crate::fetcher::Fetcher;
use crate::shell::Shell;

/// `p` made absolute (the writes directory is named to clients that may
/// run elsewhere); as it is if that fails.
fn absolute(p: &Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the state file at `state` says of the migration's end; refuses a
/// migration already aborted.
fn check_not_ended(state: &Path) -> Result<Option<Ended>, PullError> {
    let ended = StateFile::peek_ended(state)?;
    if let Some(Ended::Aborted { at_unix, writes }) = &ended {
        return Err(PullError::Aborted {
            state: state.to_owned(),
            at_unix: *at_unix,
            writes: writes.clone(),
        });
    }
    Ok(ended)
}

/// Stops a running pull's migration for `ferry abort`, after its frontends
/// have stopped: holds back the background copy, syncs, keeps the guest's
/// writes (the present blocks of every chunk the guest wrote into, and
/// every block it wrote on this boot) in a new writes directory beside the
/// state file (at `state_path`), and records the abort. `disk` and
/// `source_id` are named in the writes' index.
pub async fn abort_online<F: Fetcher, D: Disk>(
    shell: &Arc<Shell<F, D, StateFile>>,
    disk: &Path,
    state_path: &Path,
    source_id: [u8; 32],
) -> Result<Kept, PullError> {
    shell.lock().set_background_paused(true);
    shell.sync().await.map_err(|e| PullError::Io {
        op: "sync the disk before keeping the guest's writes",
        source: e,
    })?;
    let state = shell.state.clone();
    let dir = guest_writes::free_dir_name(&absolute(state_path))?;
    let extents = {
        let written = state
            .lock()
            .expect("state lock")
            .written_bits(shell.geo_blocks());
        let e = shell.lock();
        guest_writes::extents_of(
            e.geometry(),
            |b| e.is_present(b),
            |c| e.guest_wrote(c),
            Some(&written),
        )
    };
    let backing = shell.backing.clone();
    let (disk, size) = (absolute(disk), shell.size());
    let kept = D::offload(move || {
        let origin = Origin {
            disk: &disk,
            disk_size: size,
            source_id,
        };
        let kept = guest_writes::keep(&dir, &origin, &extents, |buf, off| {
            backing.read_at(buf, off)
        })
        .map_err(std::io::Error::other)?;
        state
            .lock()
            .expect("state lock")
            .record_ended(&Ended::Aborted {
                at_unix: now_unix(),
                writes: kept.dir.clone(),
            })
            .map_err(std::io::Error::other)?;
        Ok(kept)
    })
    .await
    .map_err(|e| PullError::Io {
        op: "keep the guest's writes",
        source: e,
    })?;
    tracing::warn!(
        writes = %kept.dir.display(),
        extents = kept.extents,
        bytes = kept.bytes,
        "migration aborted: the source remains the truth; the guest's writes here are kept aside"
    );
    Ok(kept)
}

/// Records that a running pull's copy, verified, no longer needs its
/// source (`ferry commit`); the caller checked the verification. Returns
/// whether it was committed before. `state_path`: the state file's path.
pub async fn commit_online<F: Fetcher, D: Disk>(
    shell: &Arc<Shell<F, D, StateFile>>,
    state_path: &Path,
) -> Result<bool, PullError> {
    let state = shell.state.clone();
    if let Some(Ended::Committed { .. }) = check_not_ended(state_path)? {
        return Ok(true);
    }
    D::offload(move || {
        state
            .lock()
            .expect("state lock")
            .record_ended(&Ended::Committed {
                at_unix: now_unix(),
            })
            .map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| PullError::Io {
        op: "record the commit",
        source: e,
    })?;
    tracing::info!("migration committed: the source is no longer needed");
    Ok(false)
}

/// Opens a stopped pull's disk and state (locked: refused while a pull
/// runs), keeping the writes a crash of it on this boot left.
fn open_stopped(
    disk: &Path,
    state: &Path,
) -> Result<(ferry_store::Destination, ferry_store::StateHeader), PullError> {
    if !state.exists() {
        return Err(PullError::NoState {
            state: state.to_owned(),
        });
    }
    let h = StateFile::peek(state)?;
    let mut dest = crate::open::open_or_create(disk, state, h.geometry, h.source_id)?;
    crate::open::keep_recovered_writes(&mut dest)?;
    Ok((dest, h))
}

/// `ferry abort --disk`: aborts the migration of a stopped pull, keeping
/// the guest's writes aside as [`abort_online`] does.
pub fn abort_offline(disk: &Path, state: &Path) -> Result<Kept, PullError> {
    if let Some(Ended::Committed { at_unix }) = check_not_ended_path(state)? {
        return Err(PullError::Committed {
            state: state.to_owned(),
            at_unix,
        });
    }
    let (mut dest, h) = open_stopped(disk, state)?;
    let geo = h.geometry;
    let present = if h.verified.is_some() {
        bitvec![1; geo.blocks() as usize]
    } else {
        dest.state.present_bits(geo.blocks())
    };
    let guest = dest.state.guest_bits(geo.chunks());
    let written = dest.state.written_bits(geo.blocks());
    let extents = guest_writes::extents_of(
        geo,
        |b| present[b as usize],
        |c| guest[c as usize],
        Some(&written),
    );
    let dir = guest_writes::free_dir_name(&absolute(state))?;
    let disk = absolute(disk);
    let origin = Origin {
        disk: &disk,
        disk_size: geo.disk_size,
        source_id: h.source_id,
    };
    let backing = &dest.backing;
    let kept = guest_writes::keep(&dir, &origin, &extents, |buf, off| {
        backing.read_at(buf, off)
    })?;
    dest.state.record_ended(&Ended::Aborted {
        at_unix: now_unix(),
        writes: kept.dir.clone(),
    })?;
    Ok(kept)
}

/// `ferry commit --disk`: commits the verified copy of a stopped pull.
/// Returns whether it was committed before.
pub fn commit_offline(disk: &Path, state: &Path) -> Result<bool, PullError> {
    if let Some(Ended::Committed { .. }) = check_not_ended_path(state)? {
        return Ok(true);
    }
    let (mut dest, h) = open_stopped(disk, state)?;
    if h.verified.is_none() {
        return Err(PullError::NotVerified {
            what: format!(
                "the state file {} does not record a verified copy",
                state.display()
            ),
        });
    }
    dest.state.record_ended(&Ended::Committed {
        at_unix: now_unix(),
    })?;
    Ok(false)
}

/// [`check_not_ended`], with a missing state file named as such.
fn check_not_ended_path(state: &Path) -> Result<Option<Ended>, PullError> {
    if !state.exists() {
        return Err(PullError::NoState {
            state: state.to_owned(),
        });
    }
    check_not_ended(state)
}

/// The refusal of `ferry pull` on a disk whose migration was aborted.
pub fn aborted_refusal(state: &Path) -> Result<(), PullError> {
    check_not_ended(state).map(|_| ())
}

/// `at_unix` (seconds since the epoch) as a UTC date and time, for
/// messages: `2026-12-07 06:56:33 UTC`.
pub fn utc(at_unix: u64) -> String {
    let (days, secs) = (at_unix / 86_400, at_unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Where a path is kept, for messages: `(path not recorded)` if empty.
pub fn shown(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "(path not recorded)".into()
    } else {
        p.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_625_393), "2026-12-07 06:36:33 UTC");
    }
}
