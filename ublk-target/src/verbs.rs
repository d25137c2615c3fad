//! The migration's verbs, as operators know them from `rbd migration
//! abort/commit` and `virsh blockjob`: `ferry abort` (the source remains the
//! truth; the guest's writes at the destination are kept aside),
//! `ferry commit` (alias `release`: the verified copy no longer needs its
//! source), `ferry list` (every migration running on this host, by the
//! control sockets in the runtime directory the units use) and
//! `ferry apply-writes` (the operator's explicit act of applying kept
//! writes to the source's image).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_core::units::Bytes;
use ferry_core::ControlRequest;
use ferry_pull::PullError;
use serde::Serialize;

use crate::control::{emit, Status};

/// The runtime directory of the systemd units (`RuntimeDirectory=ferry`):
/// `ferry-pull@NAME` binds its control socket at `/run/ferry/NAME.ctl`.
pub(crate) const RUNTIME_DIR: &str = "/run/ferry";

/// How long `ferry abort` waits for the pull to stop and keep the guest's
/// writes (they are read and written once: minutes for many GiB).
const ABORT_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long `ferry list` waits for each pull's answer.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// The migration was aborted: `ferry pull` exits with
/// [`MigrationAborted::EXIT_CODE`] after an abort, and when refusing to
/// resume an aborted disk (the units do not restart on it).
#[derive(Debug)]
pub(crate) struct MigrationAborted(pub(crate) String);

impl MigrationAborted {
    /// Exit code of `ferry pull` for an aborted migration.
    pub(crate) const EXIT_CODE: u8 = 4;
}

impl std::fmt::Display for MigrationAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MigrationAborted {}

/// Which migration a verb acts on: a running pull, or a stopped one's
/// files.
#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "which")]
pub(crate) struct Which {
    /// Control socket of a running `ferry pull`.
    #[arg(long, group = "which")]
    pub(crate) control: Option<PathBuf>,
    /// The disk of a stopped `ferry pull` (its --disk).
    #[arg(long, group = "which")]
    pub(crate) disk: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct AbortArgs {
    #[command(flatten)]
    pub(crate) which: Which,
    /// The state file of the stopped pull, if not DISK.ferry-state.
    #[arg(long, requires = "disk")]
    pub(crate) state: Option<PathBuf>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CommitArgs {
    #[command(flatten)]
    pub(crate) which: Which,
    /// The state file of the stopped pull, if not DISK.ferry-state.
    #[arg(long, requires = "disk")]
    pub(crate) state: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Directory of the control sockets (`NAME.ctl`).
    #[arg(long = "run-dir", alias = "dir", default_value = RUNTIME_DIR)]
    pub(crate) dir: PathBuf,
    /// Print JSON (an array, one object per control socket).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ApplyWritesArgs {
    /// The writes directory `ferry abort` made.
    pub(crate) dir: PathBuf,
    /// The image (or block device) to write them into: the source's, or a
    /// copy of it. Checked first: its size, and the kept data's hash.
    #[arg(long)]
    pub(crate) to: PathBuf,
}

/// Connects to a running pull's control socket, naming what to do when
/// none answers.
fn connect(control: &Path, verb: &str) -> Result<UnixStream> {
    UnixStream::connect(control).with_context(|| {
        format!(
            "no `ferry pull` answers at control socket {} (not running, or the path is wrong); \
             `ferry list` shows the migrations running here, and a stopped pull's migration is \
             acted on with `ferry {verb} --disk DISK`",
            control.display()
        )
    })
}

/// Sends `req` to a running pull and returns its JSON reply; a refusal
/// (`"ok": false`) is an error with the pull's reason.
fn ask(
    control: &Path,
    verb: &str,
    req: ControlRequest,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let mut s = connect(control, verb)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .with_context(|| format!("no answer from the pull at {}", control.display()))?;
    if reply.is_empty() {
        bail!("the pull closed the control connection without a reply");
    }
    let v: serde_json::Value = serde_json::from_str(&reply).context("malformed control reply")?;
    if v["ok"] == false {
        bail!(
            "`ferry {verb}` refused: {}",
            v["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(v)
}

fn state_of(disk: &Path, state: Option<&PathBuf>) -> PathBuf {
    state
        .cloned()
        .unwrap_or_else(|| ferry_pull::open::default_state_path(disk))
}

/// The outcome of an abort, as `ferry abort --json` prints it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct Aborted {
    /// The writes directory.
    pub(crate) writes_dir: String,
    /// Extents kept.
    pub(crate) extents: usize,
    /// Bytes kept.
    pub(crate) bytes: u64,
}

impl Aborted {
    fn human(&self) -> String {
        format!(
            "migration aborted: the source remains the truth.\n\
             kept the guest's writes made at the destination: {} extent(s), {} ({} bytes), in {}\n  \
             apply them to the source's image: ferry apply-writes {} --to IMAGE\n  \
             or discard them:                  rm -r {}\n\
             the pull has stopped; `ferry pull --start-over` pulls the disk afresh\n",
            self.extents,
            Bytes(self.bytes),
            self.bytes,
            self.writes_dir,
            self.writes_dir,
            self.writes_dir
        )
    }
}

/// One disk's outcome of an abort of a pull of several disks.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct DiskAborted {
    /// The disk's name.
    pub(crate) name: String,
    /// What was kept of it.
    #[serde(flatten)]
    pub(crate) aborted: Aborted,
}

pub(crate) fn abort_command(a: &AbortArgs) -> Result<()> {
    let outcome = match (&a.which.control, &a.which.disk) {
        (Some(control), _) => {
            let v = ask(control, "abort", ControlRequest::Abort, ABORT_TIMEOUT)?;
            if let Some(list) = v.get("disks") {
                // A pull of several disks: every disk's writes.
                let disks: Vec<DiskAborted> =
                    serde_json::from_value(list.clone()).context("malformed abort reply")?;
                if a.json {
                    return emit(&format!("{}\n", serde_json::to_string(&disks)?));
                }
                let text: String = disks
                    .iter()
                    .map(|d| format!("disk {}: {}", d.name, d.aborted.human()))
                    .collect();
                return emit(&text);
            }
            serde_json::from_value::<Aborted>(v).context("malformed abort reply")?
        }
        (None, Some(disk)) => {
            let state = state_of(disk, a.state.as_ref());
            let kept = ferry_pull::lifecycle::abort_offline(disk, &state)
                .with_context(|| format!("cannot abort the migration of {}", disk.display()))?;
            Aborted {
                writes_dir: kept.dir.display().to_string(),
                extents: kept.extents,
                bytes: kept.bytes,
            }
        }
        (None, None) => {
            bail!("pass --control SOCKET (a running pull) or --disk DISK (a stopped one)")
        }
    };
    if a.json {
        emit(&format!("{}\n", serde_json::to_string(&outcome)?))
    } else {
        emit(&outcome.human())
    }
}

pub(crate) fn commit_command(a: &CommitArgs) -> Result<()> {
    let before = match (&a.which.control, &a.which.disk) {
        (Some(control), _) => {
            let v = ask(
                control,
                "commit",
                ControlRequest::Commit,
                Duration::from_secs(60),
            )?;
            v["already"] == true
        }
        (None, Some(disk)) => {
            let state = state_of(disk, a.state.as_ref());
            ferry_pull::lifecycle::commit_offline(disk, &state)
                .with_context(|| format!("cannot commit the migration of {}", disk.display()))?
        }
        (None, None) => {
            bail!("pass --control SOCKET (a running pull) or --disk DISK (a stopped one)")
        }
    };
    emit(if before {
        "already committed: the source is no longer needed\n"
    } else {
        "committed: the source is no longer needed; the destination disk stands alone \
         (a restart serves it without contacting the source)\n"
    })
}

pub(crate) fn apply_writes_command(a: &ApplyWritesArgs) -> Result<()> {
    let applied = ferry_store::guest_writes::apply(&a.dir, &a.to)
        .with_context(|| format!("cannot apply {} to {}", a.dir.display(), a.to.display()))?;
    emit(&format!(
        "applied {} extent(s), {} ({} bytes), from {} to {} (synced)\n",
        applied.extents,
        Bytes(applied.bytes),
        applied.bytes,
        a.dir.display(),
        a.to.display()
    ))
}

/// One migration as `ferry list` shows it.
#[derive(Debug, Serialize)]
pub(crate) struct Listed {
    /// The socket's name without `.ctl` (the unit's instance).
    pub(crate) name: String,
    /// The control socket.
    pub(crate) control: String,
    /// `copying`, `verifying`, `verified` (ready to commit), `committed`,
    /// `error`, `verify-failed`; or `stale` (a socket left by a process
    /// that is gone) or `unreachable` (see `problem`).
    pub(crate) phase: String,
    /// Why it could not be asked (stale or unreachable).
    pub(crate) problem: Option<String>,
    /// Its status, when it answered.
    pub(crate) status: Option<Status>,
}

/// The phase of a migration from its status.
pub(crate) fn phase_of(s: &Status) -> &'static str {
    if s.phase == "error" {
        "error"
    } else if s.committed {
        "committed"
    } else if s.verified == "ok" && s.phase == "complete" {
        "verified"
    } else if s.verified.starts_with("failed") {
        "verify-failed"
    } else if s.phase == "complete" {
        "verifying"
    } else {
        "copying"
    }
}

fn ask_status(control: &Path) -> Result<Status, (&'static str, String)> {
    let mut s = UnixStream::connect(control).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            (
                "stale",
                "no process listens (left by a pull that is gone)".to_string(),
            )
        } else {
            ("unreachable", format!("cannot connect: {e}"))
        }
    })?;
    let unreachable = |e: std::io::Error| ("unreachable", format!("no answer: {e}"));
    s.set_read_timeout(Some(LIST_TIMEOUT))
        .map_err(unreachable)?;
    s.set_write_timeout(Some(LIST_TIMEOUT))
        .map_err(unreachable)?;
    s.write_all(format!("{}\n", ControlRequest::Status).as_bytes())
        .map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    serde_json::from_str(&reply).map_err(|_| {
        (
            "unreachable",
            "its answer is not a ferry status (not a ferry control socket?)".to_string(),
        )
    })
}

/// The migrations whose control sockets (`*.ctl`) are in `dir`, by name.
pub(crate) fn list(dir: &Path) -> Result<Vec<Listed>> {
    use std::os::unix::fs::FileTypeExt;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut sockets = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = e.path();
        let is_socket = e.file_type().is_ok_and(|t| t.is_socket());
        if is_socket && path.extension().is_some_and(|x| x == "ctl") {
            sockets.push(path);
        }
    }
    sockets.sort();
    Ok(sockets
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let control = path.display().to_string();
            match ask_status(&path) {
                Ok(s) => Listed {
                    name,
                    control,
                    phase: phase_of(&s).into(),
                    problem: None,
                    status: Some(s),
                },
                Err((phase, why)) => Listed {
                    name,
                    control,
                    phase: phase.into(),
                    problem: Some(why),
                    status: None,
                },
            }
        })
        .collect())
}

/// `ferry list` as a table.
fn table(listed: &[Listed]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "PHASE".into(),
        "PRESENT".into(),
        "SOURCE".into(),
        "DISK".into(),
    ]];
    for l in listed {
        rows.push(match &l.status {
            Some(s) => {
                let pct = if s.total_bytes == 0 {
                    100.0
                } else {
                    s.present_bytes as f64 * 100.0 / s.total_bytes as f64
                };
                [
                    l.name.clone(),
                    l.phase.clone(),
                    format!("{pct:.1}% of {}", Bytes(s.total_bytes)),
                    s.source_state.clone(),
                    s.disk.clone().unwrap_or_default(),
                ]
            }
            None => [
                l.name.clone(),
                l.phase.clone(),
                "-".into(),
                "-".into(),
                l.problem.clone().unwrap_or_default(),
            ],
        });
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn list_command(a: &ListArgs) -> Result<()> {
    let listed = list(&a.dir)?;
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string(&listed)?));
    }
    if listed.is_empty() {
        return emit(&format!(
            "no migrations: no control sockets (NAME.ctl) in {}\n",
            a.dir.display()
        ));
    }
    let mut text = table(&listed);
    if std::io::stdout().is_terminal() {
        text.push_str(&format!(
            "({} in {}; `ferry status --control SOCKET` for one)\n",
            listed.len(),
            a.dir.display()
        ));
    }
    emit(&text)
}

/// `ferry pull --start-over` on an aborted disk: discards the disk and its
/// state (locked first, so never under a running pull).
pub(crate) fn start_over(disk: &Path, state: &Path) -> Result<()> {
    let h = ferry_store::StateFile::peek(state)?;
    let dest = ferry_pull::open::open_or_create(disk, state, h.geometry, h.source_id)
        .with_context(|| format!("cannot open {} to start over", disk.display()))?;
    tracing::warn!(
        disk = %disk.display(),
        state = %state.display(),
        "--start-over: discarding the aborted migration's disk and state; pulling afresh"
    );
    // A block device is never removed: without its state file the fresh
    // pull takes it anew (and zeroes it).
    let device = ferry_store::backing::is_block_device(disk)
        .with_context(|| format!("cannot stat {}", disk.display()))?;
    let remove: &[&Path] = if device { &[state] } else { &[disk, state] };
    for p in remove {
        std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    drop(dest);
    ferry_store::sync_parent_dir(state).context("cannot sync the state file's directory")?;
    Ok(())
}

/// The refusal of `ferry pull` on an aborted disk, as [`MigrationAborted`].
pub(crate) fn refuse_aborted(e: PullError) -> anyhow::Error {
    MigrationAborted(format!("refusing to resume: {e}")).into()
}
