//! `ferry pull --disk NAME=PATH --disk NAME=PATH …`: several disks of one
//! VM in one pull (docs/decisions/many-disks-one-budget.md). Each disk has
//! its own state file, shell and connection to the source's disk of the
//! same name (`ferry serve --disk NAME=PATH`), and is served over NBD at
//! `DIR/NAME.sock` (`--nbd unix:DIR`); all of them share one
//! [`CopierSettings`], so one rate limit and one window
//! ([`ferry_pull::Budget`]) bound their background copies together, and
//! one control socket answers for all: `ferry status` shows the totals
//! with each disk's status in `disks`, `ferry background` acts on every
//! disk (and is recorded in each state file).
//!
//! With `--exit-when-complete` it exits once every disk is complete and
//! verified and no NBD client is connected to any of them.
//!
//! `--index` serves every disk: each fills what it can from the local
//! copies the indexes name.
//!
//! `--metrics` serves every disk's figures, each series labelled with its
//! disk's name.
//!
//! `ferry commit` commits every disk once all are verified (one not yet
//! verified: none is committed); a committed pull restarts without its
//! source.
//!
//! `ferry abort` aborts every disk: the frontends stop, each disk's guest
//! writes are kept beside its state file, and the pull exits as a pull of
//! one disk does after an abort.
//!
//! `--start-over` pulls afresh every disk whose migration was aborted
//! (their kept writes stay).
//!
//! Not (yet) with several disks: --ublk, --precopy, --state, NBD over TCP
//! or TLS, `ferry switchover`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_core::{ControlParseError, ControlRequest};
use ferry_nbd::{NbdListener, NbdServerConfig};
use ferry_pull::runtime::{self, Change, CommandLine};
use ferry_pull::{copier, CopierSettings, PullDevice, Report, ShellOptions, Verification, Window};
use ferry_store::StateFile;
use ferry_transport::{Client, ClientOptions, Fingerprint, Identity};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::control_socket::{self, ControlListener, Request};
use super::{hex, keep_connected, reach_source, refuse_live_without_precopy, BoundSockets};
use super::{Quic, Shell};
use crate::cli::PullArgs;

/// One disk of the pull, running.
struct Running {
    name: String,
    path: PathBuf,
    shell: Arc<Shell>,
    report: Arc<Report>,
    size: u64,
    /// Its number of chunks.
    chunks: u64,
    /// Its state file.
    state_path: PathBuf,
    /// Whether its migration was committed (`ferry commit`).
    committed: AtomicBool,
    /// The source's id (named in the writes an abort keeps).
    source_id: [u8; 32],
}

/// Refuses the options a pull of several disks does not take yet.
fn refuse_unsupported(a: &PullArgs) -> Result<()> {
    let mut bad = Vec::new();
    for (given, opt) in [
        (a.ublk, "--ublk"),
        (a.precopy, "--precopy"),
        (a.state.is_some(), "--state"),
        (a.nbd_tls_dir.is_some(), "--nbd-tls-dir"),
    ] {
        if given {
            bad.push(opt);
        }
    }
    if !bad.is_empty() {
        bail!(
            "several --disk: not (yet) with {} (each disk's state file is beside it, \
             DISK.ferry-state)",
            bad.join(", ")
        );
    }
    Ok(())
}

/// Runs a pull of several disks (`a.disks` has more than one).
pub(crate) fn run(a: PullArgs) -> Result<()> {
    refuse_unsupported(&a)?;
    let named = crate::cli::named_disks(&a.disks)?;
    let nbd_dir = match a.nbd.as_deref().map(|s| s.strip_prefix("unix:")) {
        Some(Some(dir)) => PathBuf::from(dir),
        _ => bail!(
            "several --disk: pass --nbd unix:DIR (an existing directory): disk NAME is served \
             at DIR/NAME.sock"
        ),
    };
    if !nbd_dir.is_dir() {
        bail!("--nbd unix:{}: not a directory", nbd_dir.display());
    }
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    let fp = match &a.trust_peer {
        Some(t) => Some(
            t.parse::<Fingerprint>()
                .with_context(|| format!("--trust-peer {t:?} is not a certificate fingerprint"))?,
        ),
        None => None,
    };
    if a.batch_chunks == 0 || a.window == Some(0) {
        bail!("--batch-chunks and --window must be at least 1");
    }
    let window = match a.window {
        Some(n) => Window::Fixed(n),
        None => Window::wire(
            ferry_transport::tuning::bdp_bytes(
                a.link.link_mbit.saturating_mul(1_000_000),
                Duration::from_millis(a.link.link_rtt_ms),
            ),
            u64::from(a.batch_chunks) * u64::from(ferry_core::geometry::DEFAULT_CHUNK_SIZE),
        ),
    };
    let access = ferry_nbd::SocketAccess {
        group: a.group.as_deref().map(super::resolve_group).transpose()?,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut sockets = BoundSockets::default();
        let mut listeners = Vec::new();
        for (name, _) in &named {
            let path = nbd_dir.join(format!("{name}.sock"));
            control_socket::remove_stale_socket(&path, "--nbd")?;
            let spec = format!("unix:{}", path.display());
            let l = NbdListener::bind_with(&spec, &access).await?;
            sockets.0.push(path);
            listeners.push(l);
        }
        let control = ControlListener::bind(&a.control, &access)?;
        sockets.0.push(a.control.clone());
        let metrics = match a.metrics {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let cmd = CommandLine {
            hold_background: a.hold_background,
            rate: a.rate,
        };
        let settings = Arc::new(CopierSettings {
            rate_limit: AtomicU64::new(a.rate),
            batch_chunks: u64::from(a.batch_chunks),
            window,
            sync_bytes: a.sync_bytes,
            link_rtt: Duration::from_millis(a.link.link_rtt_ms),
            budget: Default::default(),
        });
        let started = Instant::now();
        let mut disks = Vec::new();
        let mut tasks = Vec::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // NBD clients connected, per disk (for --exit-when-complete).
        let mut clients = Vec::new();
        for ((name, path), listener) in named.into_iter().zip(listeners) {
            let span = tracing::info_span!("disk", name = %name);
            let opts = match (&a.source, fp) {
                (Some(server), Some(server_fingerprint)) => Some(ClientOptions {
                    server: server.clone(),
                    identity: identity.clone(),
                    server_fingerprint,
                    tuning: a.link.tuning(),
                    connect_timeout: Duration::from_secs(a.connect_timeout),
                    disk: Some(name.clone()),
                }),
                (Some(_), None) => {
                    bail!("--source needs --trust-peer (the source's certificate fingerprint)")
                }
                (None, _) => None,
            };
            let indexes = super::open_indexes(&a.index)?;
            let d = start_disk(
                &name,
                &path,
                opts,
                &settings,
                cmd,
                started,
                &listener,
                indexes,
                a.start_over,
            )
                .instrument(span.clone())
                .await
                .with_context(|| format!("disk {name} ({})", path.display()))?;
            let device = Arc::new(PullDevice(d.shell.clone()));
            let config = NbdServerConfig {
                export_name: name.clone(),
                read_only: false,
                tls: None,
            };
            println!(
                "ferry pull: serving disk {name} at {} (size {} bytes)",
                listener.uri(false),
                d.size
            );
            let mut rx = stop_rx.clone();
            let (clients_tx, clients_rx) = tokio::sync::watch::channel(0usize);
            clients.push(clients_rx);
            tasks.push(tokio::spawn(
                async move {
                    let stop = async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    ferry_nbd::serve_counted(listener, device, config, stop, clients_tx).await
                }
                .instrument(span),
            ));
            disks.push(d);
        }
        let disks = Arc::new(disks);
        let (abort_tx, mut abort_rx) = tokio::sync::mpsc::channel(1);
        if let Some(listener) = metrics {
            let addr = listener
                .local_addr()
                .context("cannot read the --metrics listener's address")?;
            println!("ferry pull: metrics on http://{addr}/metrics");
            let (disks, settings) = (disks.clone(), settings.clone());
            let render = move || {
                let figures: Vec<crate::metrics::DiskFigures> = disks
                    .iter()
                    .map(|d| crate::metrics::DiskFigures {
                        name: d.name.clone(),
                        status: ferry_pull::status::snapshot(&d.shell, &settings, &d.report),
                        telemetry: d.shell.telemetry(),
                        chunks: d.chunks,
                    })
                    .collect();
                crate::metrics::encode_disks(&figures)
            };
            tokio::spawn(crate::metrics::serve(listener, Arc::new(render)).in_current_span());
        }
        tokio::spawn(
            serve_control(control, disks.clone(), settings.clone(), cmd, abort_tx)
                .in_current_span(),
        );
        crate::notify::notify("READY=1\nSTATUS=serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install a SIGTERM handler")?;
        let mut ended_early = None;
        let mut aborting = None;
        tokio::select! {
            Some(req) = abort_rx.recv() => {
                tracing::warn!("aborting the migration of every disk (ferry abort): stopping the frontends");
                aborting = Some(req);
            }
            outcome = all_verified_and_left(disks.clone(), clients), if a.exit_when_complete => {
                match &outcome {
                    None => tracing::info!("every disk complete and verified: exiting (--exit-when-complete)"),
                    Some(why) => tracing::error!("stopped: {why} (--exit-when-complete)"),
                }
                ended_early = outcome;
            }
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: syncing the disks and their states");
        crate::notify::notify("STOPPING=1");
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        if let Some(req) = aborting {
            let result = abort_all(&disks, req).await;
            drop(sockets);
            return result;
        }
        for d in disks.iter() {
            d.shell
                .sync()
                .await
                .with_context(|| format!("final sync of disk {} failed", d.name))?;
        }
        drop(sockets);
        match ended_early {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    })
}

/// Resolves once every disk is complete and verified and no NBD client
/// is connected to any of them (`None`), or as soon as one disk stops or
/// fails its verification (`Some(why)`, naming it).
async fn all_verified_and_left(
    disks: Arc<Vec<Running>>,
    mut clients: Vec<tokio::sync::watch::Receiver<usize>>,
) -> Option<String> {
    loop {
        let mut all = true;
        for d in disks.iter() {
            match super::verified_or_stopped_now(&d.shell, &d.report) {
                Some(Some(why)) => return Some(format!("disk {}: {why}", d.name)),
                Some(None) => {}
                None => all = false,
            }
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let connected: usize = clients.iter().map(|c| *c.borrow()).sum();
    if connected > 0 {
        tracing::info!(
            clients = connected,
            "every disk complete and verified; --exit-when-complete waits for the NBD clients to disconnect"
        );
    }
    for c in &mut clients {
        let _ = c.wait_for(|n| *n == 0).await;
    }
    None
}

/// Opens (or creates) one disk and starts its copy; a fresh disk asks the
/// source for its geometry first, a resumed one is served at once and
/// reaches the source in the background.
#[allow(clippy::too_many_arguments)]
async fn start_disk(
    name: &str,
    path: &Path,
    source: Option<ClientOptions>,
    settings: &Arc<CopierSettings>,
    cmd: CommandLine,
    started: Instant,
    listener: &NbdListener,
    indexes: Vec<ferry_index::Index>,
    start_over: bool,
) -> Result<Running> {
    let state_path = ferry_pull::open::default_state_path(path);
    // A committed disk never contacts its source again; an aborted one is
    // not resumed here.
    let mut committed = false;
    if state_path.exists() {
        match StateFile::peek_ended(&state_path)? {
            Some(ferry_store::Ended::Committed { .. }) => committed = true,
            Some(ferry_store::Ended::Aborted { writes, .. }) if !start_over => bail!(
                "its migration was aborted (the guest's writes are kept in {}): pass \
                 --start-over to pull it afresh",
                writes.display()
            ),
            Some(ferry_store::Ended::Aborted { .. }) => {
                crate::verbs::start_over(path, &state_path)?;
            }
            None => {}
        }
    }
    let header = if state_path.exists() {
        Some(StateFile::peek(&state_path)?)
    } else {
        None
    };
    let source = if committed { None } else { source };
    let verified = header.and_then(|h| h.verified);
    if source.is_none() && verified.is_none() {
        bail!(
            "--source and --trust-peer are needed: the state file {} does not say the copy is \
             complete and verified",
            state_path.display()
        );
    }
    let (client, geo, id, later) = match header {
        Some(h) => (None, h.geometry, h.source_id, source),
        None => {
            let opts = source.expect("checked above");
            let server = opts.server.clone();
            let client = Client::connect(opts)
                .await
                .with_context(|| format!("cannot connect to the source {server}"))?;
            refuse_live_without_precopy(&client, false)?;
            let info = *client.info();
            (Some(client), info.geometry, info.source_id, None)
        }
    };
    let mut dest = ferry_pull::open::open_or_create(path, &state_path, geo, id)?;
    if dest.state.precopy().is_some() {
        bail!("it is being pre-copied: not with several disks (yet)");
    }
    let resumed = dest.resumed;
    let created = dest
        .created
        .then(|| ferry_pull::open::creation_sync(path, &state_path, None));
    ferry_pull::open::keep_recovered_writes(&mut dest)?;
    let at_start = runtime::at_start(dest.state.runtime_settings(), cmd);
    if let Some(keep) = at_start.record {
        dest.state
            .record_runtime_settings(keep)
            .context("cannot drop the runtime settings the command line replaced")?;
    }
    for note in &at_start.notes {
        tracing::info!("{note}");
    }
    // The rate is the pull's: a recorded one (the same in every disk's
    // state, as `ferry background` records it in all) applies to all.
    if at_start.rate != cmd.rate {
        ferry_pull::status::set_rate_limit(settings, at_start.rate);
    }
    let mut engine = ferry_pull::open::engine(&dest.state, geo, verified.is_some());
    let present_at_start = engine.present_bytes();
    engine.set_background_paused(at_start.paused);
    tracing::info!(
        disk = %path.display(),
        size = geo.disk_size,
        resumed,
        present_bytes = present_at_start,
        "destination disk ready"
    );
    let shell = Shell::new(
        engine,
        dest.backing,
        dest.state,
        created,
        client.clone().map(Quic),
        ShellOptions {
            gated: !resumed,
            absent_timeout: None,
            // Several disks are refused with --precopy.
            awaiting_switchover: false,
        },
    );
    let verification = match verified {
        Some(v) => Verification {
            state: "ok".into(),
            chunks_checked: v.chunks_checked,
            mismatches: Vec::new(),
            disk_blake3: Some(hex(&v.disk_blake3)),
            disk_blake3_bytes: v.disk_blake3,
            refetched: 0,
        },
        None => Verification::default(),
    };
    let report = Arc::new(Report {
        nbd: Some((listener.uri(false), false)),
        started,
        present_at_start,
        verify: Mutex::new(verification),
        rate: ferry_pull::status::RateMeter::default(),
    });
    if verified.is_none() {
        tokio::spawn(copier::fetch_manifest(shell.clone()).in_current_span());
        tokio::spawn(
            copier::run_copier(shell.clone(), settings.clone(), report.clone()).in_current_span(),
        );
        tokio::spawn(
            ferry_pull::local::run_local_fill(shell.clone(), indexes, settings.clone())
                .in_current_span(),
        );
    }
    if let Some(c) = &client {
        tokio::spawn(keep_connected(shell.clone(), c.clone()).in_current_span());
        // The source accepts us or says why not: a refusal stops this
        // disk (its status says so), not the others.
        let s = shell.clone();
        let c = c.clone();
        tokio::spawn(
            async move {
                if let Err(e) = c.authenticated().await {
                    tracing::error!("the source did not accept us: {e}");
                    s.fail(ferry_core::Failure::NoManifest(format!(
                        "the source did not accept this destination: {e}"
                    )));
                }
            }
            .in_current_span(),
        );
    }
    if let Some(opts) = later {
        let s = shell.clone();
        let sp = state_path.clone();
        let v = verified.is_some();
        tokio::spawn(
            async move {
                if let Err(e) = reach_source(s, opts, sp, geo, id, v, false).await {
                    tracing::error!("{}", crate::logging::error_chain(&e));
                }
            }
            .in_current_span(),
        );
    }
    tokio::spawn(
        copier::run_syncer(shell.clone(), settings.clone(), report.clone(), |_| {})
            .in_current_span(),
    );
    Ok(Running {
        name: name.to_string(),
        path: path.to_owned(),
        shell,
        report,
        size: geo.disk_size,
        chunks: geo.chunks(),
        state_path,
        committed: AtomicBool::new(committed),
        source_id: id,
    })
}

/// `ferry commit` of every disk: only when every one is complete and
/// verified (else none is committed and the reply names the first that is
/// not); each is recorded in its own state file.
async fn commit(disks: &[Running], settings: &Arc<CopierSettings>) -> String {
    for d in disks {
        let s = ferry_pull::status::snapshot(&d.shell, settings, &d.report);
        if let Some(why) = control_socket::not_verified(&s) {
            return control_socket::error_reply(&format!(
                "disk {} {why} (no disk is committed)",
                d.name
            ));
        }
    }
    let mut already = true;
    for d in disks {
        match ferry_pull::lifecycle::commit_online(&d.shell, &d.state_path).await {
            Ok(before) => {
                already &= before;
                d.committed.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                return control_socket::error_reply(&format!(
                    "disk {}: {:#}",
                    d.name,
                    anyhow::Error::from(e)
                ))
            }
        }
    }
    serde_json::json!({ "ok": true, "committed": true, "already": already }).to_string()
}

/// `ferry abort` of every disk: handed to the pull, which stops the
/// frontends, keeps each disk's guest writes and answers. Returns the
/// answer and what to tell once it is sent.
async fn abort_request(
    disks: &[Running],
    abort: &tokio::sync::mpsc::Sender<control_socket::AbortRequest>,
    aborting: &AtomicBool,
) -> (String, Option<tokio::sync::oneshot::Sender<()>>) {
    let committed = disks
        .iter()
        .find(|d| d.committed.load(Ordering::Relaxed))
        .map(|d| {
            format!(
                "disk {} was committed: the destination is the disk now and its source may be \
                 gone, so the migration cannot be aborted",
                d.name
            )
        });
    control_socket::hand_over_abort(committed, aborting, abort).await
}

/// Aborts every disk once the frontends stopped: each disk's guest writes
/// kept aside and the abort recorded in its state file; answers the
/// control client with every disk's writes. Returns how the pull ends.
async fn abort_all(disks: &[Running], req: control_socket::AbortRequest) -> Result<()> {
    let mut kept = Vec::new();
    let mut failed = None;
    for d in disks {
        if let Some(c) = d.shell.client_now() {
            ferry_pull::Fetcher::close(&c);
        }
        match ferry_pull::lifecycle::abort_online(&d.shell, &d.path, &d.state_path, d.source_id)
            .await
        {
            Ok(k) => kept.push((d.name.clone(), k)),
            Err(e) => {
                failed = Some(
                    anyhow::Error::from(e)
                        .context(format!("cannot abort the migration of disk {}", d.name)),
                );
                break;
            }
        }
    }
    let (reply, result) = match failed {
        None => {
            let list: Vec<_> = kept
                .iter()
                .map(|(name, k)| {
                    serde_json::json!({
                        "name": name,
                        "writes_dir": k.dir.display().to_string(),
                        "extents": k.extents,
                        "bytes": k.bytes,
                    })
                })
                .collect();
            let msg = format!(
                "migration of {} disks aborted by `ferry abort`: the source remains the truth; \
                 the guest's writes made here are kept in {}",
                kept.len(),
                kept.iter()
                    .map(|(n, k)| format!("{} (disk {n})", k.dir.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            (
                serde_json::json!({ "ok": true, "disks": list }).to_string(),
                Err(crate::verbs::MigrationAborted(msg).into()),
            )
        }
        Some(e) => (
            serde_json::json!({ "ok": false, "error": format!("{e:#}") }).to_string(),
            Err(e),
        ),
    };
    let _ = req.reply.send(reply);
    let _ = tokio::time::timeout(Duration::from_secs(10), req.written).await;
    result
}

/// The status of every disk, and their totals.
fn status(disks: &[Running], settings: &CopierSettings) -> ferry_pull::Status {
    ferry_pull::status::totals(
        disks
            .iter()
            .map(|d| {
                let mut s = ferry_pull::status::snapshot(&d.shell, settings, &d.report);
                s.name = Some(d.name.clone());
                s.disk = Some(d.path.display().to_string());
                s.committed = d.committed.load(Ordering::Relaxed);
                s
            })
            .collect(),
    )
}

/// The control socket of a pull of several disks: `status` (totals and
/// each disk), `pause`, `resume` and `rate=` for all disks (recorded in
/// each disk's state file before the answer); the rest is refused.
async fn serve_control(
    control: ControlListener,
    disks: Arc<Vec<Running>>,
    settings: Arc<CopierSettings>,
    cmd: CommandLine,
    abort: tokio::sync::mpsc::Sender<control_socket::AbortRequest>,
) {
    let _keep = control.path.clone();
    let changing = Arc::new(tokio::sync::Mutex::new(()));
    let aborting = Arc::new(AtomicBool::new(false));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        control_socket::MAX_CONTROL_CONNECTIONS,
    ));
    loop {
        let stream = match control.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ =
                stream.try_write(b"{\"ok\":false,\"error\":\"too many control connections\"}\n");
            continue;
        };
        let (disks, settings, changing) = (disks.clone(), settings.clone(), changing.clone());
        let (abort, aborting) = (abort.clone(), aborting.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (r, mut w) = stream.into_split();
            let (reply, written) = match tokio::time::timeout(
                control_socket::CONTROL_IDLE_TIMEOUT,
                control_socket::read_request(r),
            )
            .await
            {
                Ok(Ok(Request::Line(line)))
                    if ControlRequest::parse(line.trim()) == Ok(ControlRequest::Abort) =>
                {
                    abort_request(&disks, &abort, &aborting).await
                }
                Ok(Ok(Request::Line(line))) => (
                    handle(line.trim(), &disks, &settings, cmd, &changing).await,
                    None,
                ),
                Ok(Ok(Request::Bad(why))) => (control_socket::error_reply(&why), None),
                _ => return,
            };
            let _ = tokio::time::timeout(
                control_socket::CONTROL_IDLE_TIMEOUT,
                w.write_all(format!("{reply}\n").as_bytes()),
            )
            .await;
            if let Some(written) = written {
                let _ = written.send(());
            }
        });
    }
}

async fn handle(
    req: &str,
    disks: &[Running],
    settings: &Arc<CopierSettings>,
    cmd: CommandLine,
    changing: &tokio::sync::Mutex<()>,
) -> String {
    let change = match ControlRequest::parse(req) {
        Ok(ControlRequest::Status) => {
            return serde_json::to_string(&status(disks, settings)).expect("status serialises")
        }
        Ok(ControlRequest::Commit) => {
            let _one = changing.lock().await;
            return commit(disks, settings).await;
        }
        Ok(ControlRequest::Abort) => {
            unreachable!("an abort is answered by abort_request")
        }
        Ok(ControlRequest::Switchover) => {
            return control_socket::error_reply(
                "switchover acts on one disk: not with several disks (yet)",
            )
        }
        Ok(ControlRequest::Pause) => Change::Paused(true),
        Ok(ControlRequest::Resume) => Change::Paused(false),
        Ok(ControlRequest::Rate(v)) => Change::Rate(v),
        Err(ControlParseError::Unknown(_)) => {
            return r#"{"ok":false,"error":"unknown request"}"#.into()
        }
        Err(e) => return control_socket::error_reply(&e.to_string()),
    };
    let _one = changing.lock().await;
    for d in disks {
        if let Err(e) = runtime::change(&d.shell, settings, cmd, change).await {
            let e = crate::logging::error_chain(&anyhow::Error::from(e));
            tracing::error!(disk = %d.name, error = %e, "a runtime change of the background copy was not made");
            return control_socket::error_reply(&format!("not changed on disk {}: {e}", d.name));
        }
    }
    match change {
        Change::Paused(true) => r#"{"ok":true,"background":"paused"}"#.into(),
        Change::Paused(false) => r#"{"ok":true,"background":"running"}"#.into(),
        Change::Rate(v) => format!(r#"{{"ok":true,"rate_limit_bytes_per_sec":{v}}}"#),
    }
}
