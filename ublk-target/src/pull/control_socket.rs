//! The control socket of a pull: `ferry status`, `ferry background`,
//! `ferry commit` and `ferry abort` talk to it (one request line in, one
//! JSON line out); the answers come from [`ferry_pull::status`] and
//! [`ferry_pull::lifecycle`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_core::{ControlParseError, ControlRequest};
use ferry_pull::runtime::{self, Change, CommandLine};
use ferry_pull::{status, CopierSettings, Report};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::Shell;

/// Removes a unix socket left behind by a crashed process, but never a
/// live one (something accepts on it) nor a file that is not a socket.
pub(crate) fn remove_stale_socket(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{what} {} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{what} {} is in use by another running process",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale socket {}", path.display()))
}

/// Longest control request line, newline included; a longer one is
/// refused (the requests are a few bytes; without a cap a peer that never
/// sends a newline made the pull buffer all it sent).
pub(crate) const MAX_REQUEST_BYTES: usize = 4096;

/// Control connections served at once; more are closed at once, so idle
/// connections cannot take every file descriptor.
pub(crate) const MAX_CONTROL_CONNECTIONS: usize = 64;

/// How long a control client may take to send its request line.
pub(crate) const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// `ferry abort` asks the pull to stop: the pull answers on `reply` once
/// the guest's writes are kept, and waits (a while) for `written` to be
/// dropped, when the answer has been sent.
pub(crate) struct AbortRequest {
    pub(crate) reply: tokio::sync::oneshot::Sender<String>,
    pub(crate) written: tokio::sync::oneshot::Receiver<()>,
}

/// What the control socket knows of the migration's end.
pub(crate) struct Verbs {
    /// The destination disk, as given.
    pub(crate) disk: String,
    /// Its state file.
    pub(crate) state: PathBuf,
    /// Committed (in the state file).
    pub(crate) committed: AtomicBool,
    /// An abort is under way.
    pub(crate) aborting: AtomicBool,
    /// Where an abort is asked for.
    pub(crate) abort: tokio::sync::mpsc::Sender<AbortRequest>,
    /// A pre-copy's state, for the status (`None` without --precopy).
    pub(crate) precopy: std::sync::Mutex<Option<PrecopyView>>,
    /// Where a switchover is asked for (with the reply's sender).
    pub(crate) switchover: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
}

/// What the status says of a pre-copy.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrecopyView {
    /// "copying" or "switched".
    pub(crate) phase: String,
    /// The last generation applied.
    pub(crate) generation: u64,
    /// Freeze to serving, in ms.
    pub(crate) switchover_ms: Option<f64>,
}

/// The control socket.
pub(crate) struct ControlListener {
    pub(super) listener: UnixListener,
    pub(super) path: PathBuf,
}

impl ControlListener {
    /// Binds `path`, replacing a stale socket but never a live one, with
    /// the mode of `access` (owner-only by default) whatever the umask.
    pub(crate) fn bind(path: &Path, access: &ferry_nbd::SocketAccess) -> Result<Self> {
        remove_stale_socket(path, "--control")?;
        let listener = ferry_nbd::bind_unix_socket(path, access)
            .and_then(UnixListener::from_std)
            .with_context(|| format!("cannot bind control socket {}", path.display()))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Answers requests until the process ends: one request line per
    /// connection, at most [`MAX_CONTROL_CONNECTIONS`] connections at once.
    /// `cmd`: the background copy's settings on the command line, recorded
    /// with each runtime change of them.
    pub(crate) async fn serve(
        self,
        shared: Arc<Shell>,
        settings: Arc<CopierSettings>,
        report: Arc<Report>,
        verbs: Arc<Verbs>,
        cmd: CommandLine,
    ) {
        let _keep = self.path;
        // Runtime changes one at a time, so the record and what runs agree.
        let changing = Arc::new(tokio::sync::Mutex::new(()));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
        let mut refusing = false;
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: back off, do not spin.
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if !refusing {
                    refusing = true;
                    tracing::warn!(
                        open = MAX_CONTROL_CONNECTIONS,
                        "too many control connections at once; closing new ones until one ends"
                    );
                }
                let _ = stream
                    .try_write(b"{\"ok\":false,\"error\":\"too many control connections\"}\n");
                continue;
            };
            refusing = false;
            let (shared, settings, report, changing) = (
                shared.clone(),
                settings.clone(),
                report.clone(),
                changing.clone(),
            );
            let verbs = verbs.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let (r, mut w) = stream.into_split();
                let reply = match tokio::time::timeout(CONTROL_IDLE_TIMEOUT, read_request(r)).await
                {
                    Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "control connection failed");
                        return;
                    }
                    Ok(Ok(Request::Line(line))) => match ControlRequest::parse(line.trim()) {
                        Ok(ControlRequest::Commit) => {
                            commit(&shared, &settings, &report, &verbs).await
                        }
                        Ok(ControlRequest::Switchover) => {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            if verbs.switchover.send(tx).await.is_err() {
                                error_reply("this pull is not pre-copying (no --precopy, or it has switched over)")
                            } else {
                                rx.await.unwrap_or_else(|_| {
                                    error_reply("the pull stopped before it could switch over")
                                })
                            }
                        }
                        Ok(ControlRequest::Abort) => {
                            let (reply, written) = abort(&verbs).await;
                            let _ = tokio::time::timeout(
                                CONTROL_IDLE_TIMEOUT,
                                w.write_all(format!("{reply}\n").as_bytes()),
                            )
                            .await;
                            drop(written);
                            return;
                        }
                        _ => {
                            let ctx = Ctx {
                                shared: &shared,
                                settings: &settings,
                                report: &report,
                                verbs: &verbs,
                                cmd,
                                changing: &changing,
                            };
                            handle(line.trim(), ctx).await
                        }
                    },
                    Ok(Ok(Request::Bad(why))) => error_reply(&why),
                };
                let _ = tokio::time::timeout(
                    CONTROL_IDLE_TIMEOUT,
                    w.write_all(format!("{reply}\n").as_bytes()),
                )
                .await;
            });
        }
    }
}

/// One control request as read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Request {
    /// A line of UTF-8 (without its newline).
    Line(String),
    /// Not a request: why.
    Bad(String),
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`].
pub(super) async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut r = BufReader::new(r.take(MAX_REQUEST_BYTES as u64 + 1));
    r.read_until(b'\n', &mut buf).await?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Ok(Request::Bad(format!(
            "request longer than {MAX_REQUEST_BYTES} bytes"
        )));
    }
    Ok(match String::from_utf8(buf) {
        Ok(line) => Request::Line(line),
        Err(_) => Request::Bad("request is not UTF-8 text".into()),
    })
}

/// A JSON error reply.
pub(super) fn error_reply(why: &str) -> String {
    serde_json::json!({ "ok": false, "error": why }).to_string()
}

/// The status report, with what the control socket knows.
fn snapshot(
    shared: &Arc<Shell>,
    settings: &Arc<CopierSettings>,
    report: &Arc<Report>,
    verbs: &Verbs,
) -> status::Status {
    let mut s = status::snapshot(shared, settings, report);
    s.disk = Some(verbs.disk.clone());
    s.committed = verbs.committed.load(Ordering::Relaxed);
    if let Some(p) = verbs.precopy.lock().expect("precopy lock").clone() {
        s.precopy = Some(p.phase);
        s.precopy_generation = Some(p.generation);
        s.switchover_ms = p.switchover_ms;
    }
    s
}

/// `ferry commit`: only once verified; records it in the state file.
async fn commit(
    shared: &Arc<Shell>,
    settings: &Arc<CopierSettings>,
    report: &Arc<Report>,
    verbs: &Verbs,
) -> String {
    if verbs.aborting.load(Ordering::Relaxed) {
        return error_reply("the migration is being aborted");
    }
    let s = snapshot(shared, settings, report, verbs);
    if let Some(why) = not_verified(&s) {
        return error_reply(&format!("the copy {why}"));
    }
    match ferry_pull::lifecycle::commit_online(shared, &verbs.state).await {
        Ok(before) => {
            verbs.committed.store(true, Ordering::Relaxed);
            serde_json::json!({ "ok": true, "committed": true, "already": before }).to_string()
        }
        Err(e) => error_reply(&format!("{:#}", anyhow::Error::from(e))),
    }
}

/// Why `ferry commit` must wait for a copy whose status is `s` ("is not
/// verified yet …"), or `None` when it is complete and verified.
pub(crate) fn not_verified(s: &status::Status) -> Option<String> {
    if s.phase == "complete" && s.verified == "ok" {
        return None;
    }
    let pct = if s.total_bytes == 0 {
        100.0
    } else {
        s.present_bytes as f64 * 100.0 / s.total_bytes as f64
    };
    Some(format!(
        "is not verified yet (phase {}, {pct:.1}% present, verification {}): the source is \
         still needed; `ferry status --wait` waits for the verification",
        s.phase, s.verified
    ))
}

/// `ferry abort`: hands the request to the pull, which stops serving,
/// keeps the guest's writes and answers. Returns the answer and what to
/// drop once it is sent.
async fn abort(verbs: &Verbs) -> (String, Option<tokio::sync::oneshot::Sender<()>>) {
    let committed = verbs.committed.load(Ordering::Relaxed).then(|| {
        "the migration was committed: the destination is the disk now and its source may be \
         gone, so it cannot be aborted"
            .to_string()
    });
    hand_over_abort(committed, &verbs.aborting, &verbs.abort).await
}

/// Hands `ferry abort` to the pull unless `refused` says why not or an
/// abort is under way (`aborting`); the pull stops serving, keeps the
/// guest's writes and answers on the request. Returns the answer and what
/// to drop once it is sent.
pub(crate) async fn hand_over_abort(
    refused: Option<String>,
    aborting: &AtomicBool,
    pull: &tokio::sync::mpsc::Sender<AbortRequest>,
) -> (String, Option<tokio::sync::oneshot::Sender<()>>) {
    if let Some(why) = refused {
        return (error_reply(&why), None);
    }
    if aborting.swap(true, Ordering::Relaxed) {
        return (error_reply("an abort is already under way"), None);
    }
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let req = AbortRequest {
        reply: reply_tx,
        written: written_rx,
    };
    if pull.send(req).await.is_err() {
        return (error_reply("the pull is stopping"), None);
    }
    match reply_rx.await {
        Ok(reply) => (reply, Some(written_tx)),
        Err(_) => (error_reply("the pull stopped before it could abort"), None),
    }
}

/// What a control request acts on.
struct Ctx<'a> {
    shared: &'a Arc<Shell>,
    settings: &'a Arc<CopierSettings>,
    report: &'a Arc<Report>,
    verbs: &'a Verbs,
    cmd: CommandLine,
    changing: &'a tokio::sync::Mutex<()>,
}

async fn handle(req: &str, ctx: Ctx<'_>) -> String {
    let change = match ControlRequest::parse(req) {
        Ok(ControlRequest::Status) => {
            return serde_json::to_string(&snapshot(
                ctx.shared,
                ctx.settings,
                ctx.report,
                ctx.verbs,
            ))
            .expect("status serialises")
        }
        Ok(ControlRequest::Commit | ControlRequest::Abort | ControlRequest::Switchover) => {
            return error_reply("commit, abort and switchover are answered elsewhere")
        }
        Ok(ControlRequest::Pause) => Change::Paused(true),
        Ok(ControlRequest::Resume) => Change::Paused(false),
        Ok(ControlRequest::Rate(v)) => Change::Rate(v),
        Err(ControlParseError::Unknown(_)) => {
            return r#"{"ok":false,"error":"unknown request"}"#.into()
        }
        Err(e) => return error_reply(&e.to_string()),
    };
    // Recorded durably before it is acknowledged: a restart keeps it.
    let _one = ctx.changing.lock().await;
    if let Err(e) = runtime::change(ctx.shared, ctx.settings, ctx.cmd, change).await {
        let e = crate::logging::error_chain(&anyhow::Error::from(e));
        tracing::error!(error = %e, "a runtime change of the background copy was not made");
        return error_reply(&format!("not changed: {e}"));
    }
    match change {
        Change::Paused(true) => r#"{"ok":true,"background":"paused"}"#.into(),
        Change::Paused(false) => r#"{"ok":true,"background":"running"}"#.into(),
        Change::Rate(v) => format!(r#"{{"ok":true,"rate_limit_bytes_per_sec":{v}}}"#),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_pull::Window;

    /// The source can buffer only what the destination's connection
    /// receive window credits, for all streams together: what the copier
    /// keeps outstanding on the wire, plus a hedged 1 MiB guest read (three
    /// copies), must fit in it, less the eighth by which quinn lets the
    /// credit it has sent lag behind. Else an on-demand answer waits for
    /// the background answers ahead of it to be read.
    #[test]
    fn the_background_window_leaves_flow_control_credit_for_on_demand_reads() {
        let request = 16 * u64::from(ferry_core::geometry::DEFAULT_CHUNK_SIZE);
        let on_demand = u64::from(ferry_transport::path::MAX_COPIES) * (1 << 20);
        for (mbit, rtt_ms) in [
            (1, 1),
            (10, 10),
            (200, 50),
            (200, 150),
            (1000, 100),
            (10_000, 300),
        ] {
            let tuning =
                ferry_transport::Tuning::for_link(mbit * 1_000_000, Duration::from_millis(rtt_ms));
            let credit = tuning.receive_window - tuning.receive_window / 8;
            let window = Window::wire(
                ferry_transport::tuning::bdp_bytes(mbit * 1_000_000, Duration::from_millis(rtt_ms)),
                request,
            );
            for ratio in [1.0, 2.6, 16.0] {
                let fetched = 1u64 << 30;
                let wire = (fetched as f64 / ratio) as u64;
                let outstanding =
                    (window.requests(fetched, wire) as f64 * request as f64 / ratio) as u64;
                assert!(
                    outstanding + on_demand <= credit,
                    "{mbit} Mbit/s, {rtt_ms} ms, {ratio}:1: {outstanding} B outstanding + \
                     {on_demand} B on demand > {credit} B of credit"
                );
            }
        }
    }
}
