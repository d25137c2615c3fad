//! `ferry pull`: present the source's disk locally at once, fetch absent
//! data on demand, copy the rest in the background, verify, keep serving.

mod control_socket;
mod gate;
mod multi;
mod precopy;
mod source;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_nbd::{NbdListener, NbdServerConfig};
use ferry_pull::{copier, CopierSettings, PullDevice, Report, ShellOptions, Verification, Window};
use ferry_store::StateFile;
use ferry_transport::{Client, ClientOptions, Fingerprint, Identity, TransportError};
use tracing::Instrument;

use crate::cli::PullArgs;
use source::Quic;

/// The shell of a pull whose source is reached over QUIC.
pub(crate) type Shell = ferry_pull::Shell<Quic>;

/// Resolves `--group` (a group name, or a number) to a group id.
fn resolve_group(name: &str) -> Result<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => name
            .parse::<u32>()
            .with_context(|| format!("--group {name:?}: no such group")),
        Err(e) => Err(e).with_context(|| format!("--group {name:?}: cannot look the group up")),
    }
}

/// Gives group `gid` read and write access to `path` (mode 0660, that
/// group), for `--group`.
fn grant_group(path: &Path, gid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, None, Some(gid))
        .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot make {} group-writable", path.display()))
}

/// Socket files this run bound: removed when the run ends, however it
/// ends (a refused start leaves none behind).
#[derive(Default)]
struct BoundSockets(Vec<PathBuf>);

impl Drop for BoundSockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How a pull reaches its source: `--source` and `--trust-peer`.
fn source_options(
    a: &PullArgs,
    identity: Identity,
    verified: bool,
    state_path: &Path,
) -> Result<Option<ClientOptions>> {
    let fp = match &a.trust_peer {
        Some(t) => Some(
            t.parse::<Fingerprint>()
                .with_context(|| format!("--trust-peer {t:?} is not a certificate fingerprint"))?,
        ),
        None => None,
    };
    match (a.source.clone(), fp) {
        (Some(server), Some(server_fingerprint)) => Ok(Some(ClientOptions {
            server,
            identity,
            server_fingerprint,
            tuning: a.link.tuning(),
            connect_timeout: Duration::from_secs(a.connect_timeout),
            disk: None,
        })),
        (Some(_), None) => {
            bail!("--source needs --trust-peer (the source's certificate fingerprint)")
        }
        (None, _) if verified => Ok(None),
        (None, _) => bail!(
            "--source and --trust-peer are needed: the state file {} does not say the copy is \
             complete and verified",
            state_path.display()
        ),
    }
}

/// Reaches the source of a resumed pull, whose disk is already served:
/// retries with backoff until the source answers, checks it is the one
/// the disk was copied from and that it accepts us, then hands the
/// connection to the copier (or, for a copy already complete and
/// verified, lets it go). Returns an error only for what no retry can
/// fix; the pull then stops, keeping its disk and state.
async fn reach_source(
    shared: Arc<Shell>,
    opts: ClientOptions,
    state_path: PathBuf,
    geo: ferry_core::Geometry,
    id: [u8; 32],
    verified: bool,
    precopy: bool,
) -> Result<()> {
    let addr = opts.server.clone();
    let mut delay = ferry_transport::client::BACKOFF_START;
    let mut failures = 0u64;
    let client = loop {
        match Client::connect(opts.clone()).await {
            Ok(c) => break c,
            Err(
                e @ (TransportError::ServerNotTrusted { .. }
                | TransportError::CertificateRefused { .. }),
            ) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("the source {addr} did not accept this destination")))
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(
                        "cannot reach the source {addr}: {e}; serving the data present here \
                         and retrying in the background"
                    );
                } else {
                    tracing::debug!(failures, "cannot reach the source {addr}: {e}");
                }
                failures += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ferry_transport::client::BACKOFF_MAX);
            }
        }
    };
    let info = *client.info();
    if info.source_id != id || info.geometry != geo {
        client.close();
        bail!(
            "state file {} belongs to another source (its source id {}, size {}; the source at \
             {addr} has id {}, size {}); refusing to go on: the destination disk would mix two \
             sources. Its data and the guest's writes are kept",
            state_path.display(),
            hex(&id),
            geo.disk_size,
            hex(&info.source_id),
            info.geometry.disk_size
        );
    }
    if let Err(e) = client.authenticated().await {
        return Err(anyhow::Error::from(e)
            .context(format!("the source {addr} did not accept this destination")));
    }
    if !verified {
        refuse_live_without_precopy(&client, precopy)?;
    }
    if verified {
        tracing::info!(%addr, "reached the source; the copy is already complete and verified, so it is let go");
        client.close();
        return Ok(());
    }
    tracing::info!(%addr, "reached the source; fetching what is absent");
    shared.set_source(Quic(client.clone()));
    keep_connected(shared, client).await;
    Ok(())
}

/// Keeps the connection to the source up (see
/// [`Client::keep_connected`]) until the copy is verified; a source that
/// changed stops the migration, as a fetch that notices it does.
async fn keep_connected(shared: Arc<Shell>, client: Client) {
    match client.keep_connected().await {
        Ok(()) => {}
        Err(e @ TransportError::SourceChanged { .. }) => {
            shared.fail(ferry_core::Failure::SourceChanged(e.to_string()));
        }
        Err(e) => tracing::warn!(error = %e, "stopped watching the connection to the source"),
    }
}

/// A live source (its VM writes it through `ferry serve --present`) may
/// only be copied by a pre-copying pull, which follows its changes: any
/// other could serve chunks the VM has overwritten since.
fn refuse_live_without_precopy(client: &Client, precopy: bool) -> Result<()> {
    if client.info().live && !precopy {
        client.close();
        bail!(
            "the source is live (its VM writes the disk through `ferry serve --present`): pull it \
             with --precopy, which follows its writes, and switch over with `ferry switchover`"
        );
    }
    Ok(())
}

/// Opens every `--index` (each opening has its own file and cursor: a
/// pull of several disks opens them once per disk).
fn open_indexes(paths: &[PathBuf]) -> Result<Vec<ferry_index::Index>> {
    paths
        .iter()
        .map(|p| {
            ferry_index::Index::open(p)
                .with_context(|| format!("cannot open --index {}", p.display()))
        })
        .collect()
}

/// Where a copy stands for `--exit-when-complete`: `Some(None)` verified,
/// `Some(Some(why))` stopped (its verification failed, or the
/// migration), `None` still under way.
fn verified_or_stopped_now(shared: &Shell, report: &Report) -> Option<Option<String>> {
    let v = report.verify.lock().expect("verify lock").state.clone();
    if v == "ok" {
        return Some(None);
    }
    if v.starts_with("failed") {
        return Some(Some(format!("the verification against the source {v}")));
    }
    if let ferry_core::Phase::Failed(f) = shared.engine_phase() {
        return Some(Some(f.to_string()));
    }
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `ferry abort` of a running pull (its frontends stopped, or never
/// started during a pre-copy): the guest's writes kept aside, the end
/// recorded, the control client answered. Returns how the pull ends.
async fn abort_migration(
    shared: &Arc<Shell>,
    disk: &Path,
    state_path: &Path,
    id: [u8; 32],
    req: control_socket::AbortRequest,
) -> Result<()> {
    if let Some(c) = shared.client_now() {
        ferry_pull::Fetcher::close(&c);
    }
    let (reply, result) =
        match ferry_pull::lifecycle::abort_online(shared, disk, state_path, id).await {
            Ok(kept) => {
                let summary = crate::verbs::Aborted {
                    writes_dir: kept.dir.display().to_string(),
                    extents: kept.extents,
                    bytes: kept.bytes,
                };
                let reply = serde_json::json!({
                    "ok": true,
                    "writes_dir": summary.writes_dir,
                    "extents": summary.extents,
                    "bytes": summary.bytes,
                });
                let msg = format!(
                    "migration aborted by `ferry abort`: the source remains the truth; \
                     the guest's writes made here ({} extent(s), {} bytes) are kept in {}",
                    kept.extents, kept.bytes, summary.writes_dir
                );
                (
                    reply.to_string(),
                    Err(crate::verbs::MigrationAborted(msg).into()),
                )
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context("cannot abort the migration");
                let reply = serde_json::json!({ "ok": false, "error": format!("{e:#}") });
                (reply.to_string(), Err(e))
            }
        };
    let _ = req.reply.send(reply);
    // Until the answer has left (or a while).
    let _ = tokio::time::timeout(Duration::from_secs(10), req.written).await;
    result
}

pub(crate) fn run(mut a: PullArgs) -> Result<()> {
    if a.disks.len() > 1 {
        return multi::run(a);
    }
    a.disk = a.disks.first().cloned().context("--disk is needed")?;
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    if a.exit_when_complete && a.ublk {
        bail!(
            "--exit-when-complete with --ublk: /dev/ublkbN goes when the pull exits, whoever \
             uses it; keep the pull serving (and stop it once the disk's user has moved to the \
             backing file), or use --nbd, with which it waits for the clients to leave"
        );
    }
    if a.nbd.is_none() && !a.ublk {
        bail!("no frontend: pass --ublk, or --nbd unix:PATH (or --nbd ADDR:PORT with --nbd-tls-dir or --nbd-tcp-insecure)");
    }
    let indexes = open_indexes(&a.index)?;
    if a.precopy && !a.index.is_empty() {
        bail!("--index with --precopy: local fills are matched against hashes a live source may change; not supported yet");
    }
    let disk_is_device = ferry_store::backing::is_block_device(&a.disk)
        .with_context(|| format!("cannot stat --disk {}", a.disk.display()))?;
    let state_path = match (&a.state, disk_is_device) {
        (Some(s), _) => s.clone(),
        (None, false) => ferry_pull::open::default_state_path(&a.disk),
        (None, true) => bail!(
            "--disk {} is a block device: pass --state PATH for its block map (a file on a \
             filesystem; it cannot be kept beside a device node)",
            a.disk.display()
        ),
    };
    // An aborted migration is not resumed (unless told to start over); a
    // committed one never contacts its source again.
    let ended = if state_path.exists() {
        StateFile::peek_ended(&state_path)?
    } else {
        None
    };
    if let Some(ferry_store::Ended::Aborted { .. }) = ended {
        if !a.start_over {
            return Err(crate::verbs::refuse_aborted(
                ferry_pull::lifecycle::aborted_refusal(&state_path)
                    .err()
                    .context("the state file changed while it was read")?,
            ));
        }
        crate::verbs::start_over(&a.disk, &state_path)?;
    }
    let committed = matches!(ended, Some(ferry_store::Ended::Committed { .. }));
    // A resumed pull learns the disk from its state file, and serves it
    // before (or without) reaching the source; only a fresh one must ask
    // the source first. Nothing is changed by reading it.
    let header = if state_path.exists() {
        Some(StateFile::peek(&state_path)?)
    } else {
        None
    };
    let verified = header.and_then(|h| h.verified);
    let source = if committed {
        if let Some(s) = &a.source {
            tracing::info!(source = %s, "the migration was committed: the source is not contacted");
        }
        None
    } else {
        source_options(&a, identity, verified.is_some(), &state_path)?
    };
    // The NBD TLS credentials are checked before anything is bound or made.
    let nbd_tls = match &a.nbd_tls_dir {
        Some(dir) => Some(
            ferry_nbd::NbdTls::load_x509_dir(dir)
                .with_context(|| format!("--nbd-tls-dir {}", dir.display()))?,
        ),
        None => None,
    };
    if let Some(spec) = a.nbd.as_deref().filter(|s| !s.starts_with("unix:")) {
        if nbd_tls.is_none() && !a.nbd_tcp_insecure {
            bail!(
                "--nbd {spec}: NBD over TCP without TLS has no authentication and no \
                 encryption, so anyone who can reach that port could read and write the \
                 disk; use --nbd unix:PATH, or --nbd-tls-dir DIR (TLS with client \
                 certificates), or pass --nbd-tcp-insecure to accept that"
            );
        }
        if nbd_tls.is_none() {
            tracing::warn!(
                "INSECURE: --nbd {spec} serves the disk over TCP without authentication or \
                 encryption: anyone who can reach that port can read and write it"
            );
        }
    }
    let access = ferry_nbd::SocketAccess {
        group: a.group.as_deref().map(resolve_group).transpose()?,
    };
    // With --ublk, check for the driver before anything is created.
    let ublk_recover = if a.ublk {
        if !Path::new(ferry_ublk::CONTROL_PATH).exists() {
            return Err(ferry_ublk::UblkError::DriverMissing.into());
        }
        a.ublk_id
            .is_some_and(|id| Path::new(&format!("/dev/ublkc{id}")).exists())
    } else {
        false
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
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        // Bind every listener before touching any file, so a port in use
        // fails the start with nothing changed.
        let mut sockets = BoundSockets::default();
        // A pre-copying pull binds its NBD socket at once too: clients may
        // connect, their requests wait for the switchover (gate.rs).
        let listener = match &a.nbd {
            Some(spec) => {
                if let Some(path) = spec.strip_prefix("unix:") {
                    control_socket::remove_stale_socket(Path::new(path), "--nbd")?;
                }
                let l = NbdListener::bind_with(spec, &access).await?;
                if let NbdListener::Unix(_, path) = &l {
                    sockets.0.push(path.clone());
                }
                Some(l)
            }
            None => None,
        };
        let control = control_socket::ControlListener::bind(&a.control, &access)?;
        sockets.0.push(a.control.clone());
        let metrics = match a.metrics {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let started = Instant::now();
        let (client, geo, id, later) = match (header, source) {
            (Some(h), source) => (None, h.geometry, h.source_id, source),
            (None, Some(opts)) => {
                tracing::info!(source = %opts.server, "connecting to the source");
                let server = opts.server.clone();
                let client = Client::connect(opts)
                    .await
                    .with_context(|| format!("cannot connect to the source {server}"))?;
                let info = *client.info();
                refuse_live_without_precopy(&client, a.precopy)?;
                (Some(client), info.geometry, info.source_id, None)
            }
            (None, None) => bail!("--source and --trust-peer are needed for a fresh pull"),
        };
        let mut dest = ferry_pull::open::open_or_create(&a.disk, &state_path, geo, id)?;
        if let Some(gid) = access.group {
            // A device node's owner and mode are udev's to set.
            if !disk_is_device {
                grant_group(&a.disk, gid)?;
            }
            grant_group(&state_path, gid)?;
        }
        let resumed = dest.resumed;
        let recorded = dest.state.precopy();
        if recorded.is_some_and(|p| !p.switched) && !a.precopy {
            bail!(
                "the disk {} is being pre-copied from a live source and was not switched over: \
                 serving it now could hand out data the source VM has overwritten since; \
                 start it with --precopy and run `ferry switchover`",
                a.disk.display()
            );
        }
        if a.precopy && recorded.is_none() {
            // From now on a start without --precopy is refused.
            dest.state
                .record_precopy(ferry_store::Precopy::default())
                .context("cannot record the pre-copy in the state file")?;
        }
        let precopy_record = recorded.unwrap_or_default();
        let created = dest.created.then(|| {
            ferry_pull::open::creation_sync(&a.disk, &state_path, a.inject_creation_sync_failure_ms)
        });
        ferry_pull::open::keep_recovered_writes(&mut dest)?;
        // Runtime changes of an earlier run (`ferry background`) still in
        // force, unless the command line changed since.
        let cmd = ferry_pull::runtime::CommandLine {
            hold_background: a.hold_background,
            rate: a.rate,
        };
        let at_start = ferry_pull::runtime::at_start(dest.state.runtime_settings(), cmd);
        if let Some(keep) = at_start.record {
            dest.state
                .record_runtime_settings(keep)
                .context("cannot drop the runtime settings the command line replaced")?;
        }
        for note in &at_start.notes {
            tracing::info!("{note}");
        }
        // The disk is served at once; the manifest (zero chunks, hashes)
        // streams in meanwhile and starts the background copy.
        let mut engine = ferry_pull::open::engine(&dest.state, geo, verified.is_some());
        let present_at_start = engine.present_bytes();
        engine.set_background_paused(at_start.paused);
        tracing::info!(
            disk = %a.disk.display(),
            state = %state_path.display(),
            size = geo.disk_size,
            resumed,
            present_bytes = present_at_start,
            "destination disk ready"
        );
        let shared = Shell::new(
            engine,
            dest.backing,
            dest.state,
            created,
            client.clone().map(Quic),
            ShellOptions {
                gated: !resumed,
                absent_timeout: a.absent_timeout_secs.map(Duration::from_secs),
                awaiting_switchover: a.precopy && !precopy_record.switched,
            },
        );
        let settings = Arc::new(CopierSettings {
            rate_limit: AtomicU64::new(at_start.rate),
            batch_chunks: u64::from(a.batch_chunks),
            window,
            sync_bytes: a.sync_bytes,
            link_rtt: Duration::from_millis(a.link.link_rtt_ms),
            budget: Default::default(),
        });
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
            nbd: listener
                .as_ref()
                .map(|l| (l.uri(nbd_tls.is_some()), nbd_tls.is_some())),
            started,
            present_at_start,
            verify: Mutex::new(verification),
            rate: ferry_pull::status::RateMeter::default(),
        });
        if verified.is_some() {
            tracing::info!("the copy is complete and verified: serving it without the source");
        } else {
            tokio::spawn(copier::fetch_manifest(shared.clone()).in_current_span());
            tokio::spawn(
                copier::run_copier(shared.clone(), settings.clone(), report.clone())
                    .in_current_span(),
            );
            tokio::spawn(
                ferry_pull::local::run_local_fill(shared.clone(), indexes, settings.clone())
                    .in_current_span(),
            );
        }
        if let Some(c) = &client {
            tokio::spawn(keep_connected(shared.clone(), c.clone()).in_current_span());
        }
        let reaching = later.map(|opts| {
            tokio::spawn(
                reach_source(
                    shared.clone(),
                    opts,
                    state_path.clone(),
                    geo,
                    id,
                    verified.is_some(),
                    a.precopy,
                )
                .in_current_span(),
            )
        });
        tokio::spawn(
            copier::run_syncer(
                shared.clone(),
                settings.clone(),
                report.clone(),
                |s: &ferry_pull::Status| crate::notify::notify(&crate::notify::progress(s)),
            )
            .in_current_span(),
        );
        let (abort_tx, mut abort_rx) = tokio::sync::mpsc::channel(1);
        let (switch_tx, mut switch_rx) = tokio::sync::mpsc::channel(1);
        let verbs = Arc::new(control_socket::Verbs {
            disk: a.disk.display().to_string(),
            state: state_path.clone(),
            committed: committed.into(),
            aborting: false.into(),
            abort: abort_tx,
            precopy: Mutex::new(None),
            switchover: switch_tx,
        });
        tokio::spawn(
            control
                .serve(shared.clone(), settings.clone(), report.clone(), verbs.clone(), cmd)
                .in_current_span(),
        );
        if let Some(listener) = metrics {
            let addr = listener
                .local_addr()
                .context("cannot read the --metrics listener's address")?;
            println!("ferry pull: metrics on http://{addr}/metrics");
            let (shared, settings, report) = (shared.clone(), settings.clone(), report.clone());
            let render = move || {
                crate::metrics::encode(
                    &ferry_pull::status::snapshot(&shared, &settings, &report),
                    &shared.telemetry(),
                    geo.chunks(),
                )
            };
            tokio::spawn(crate::metrics::serve(listener, Arc::new(render)).in_current_span());
        }
        // With --exit-when-complete: the copy verified (or stopped).
        let verified_or_stopped = {
            let (shared, report) = (shared.clone(), report.clone());
            async move {
                loop {
                    if let Some(outcome) = verified_or_stopped_now(&shared, &report) {
                        return outcome;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        // While pre-copying, /dev/ublkbN (--ublk) and the NBD export exist
        // (their paths known, openable) but no request reaches the disk
        // until the switchover opens the gate: ublk's fail
        // (docs/decisions/ublk-precopy-device-dark.md), NBD's wait
        // (docs/decisions/nbd-held-until-switchover.md).
        let gate = gate::Gate::new(!a.precopy || precopy_record.switched);
        let gated = Arc::new(gate::Gated {
            inner: PullDevice(shared.clone()),
            gate: gate.clone(),
            closed: gate::Closed::Fail,
        });
        let device = Arc::new(gate::Gated {
            inner: PullDevice(shared.clone()),
            gate: gate.clone(),
            closed: gate::Closed::Hold,
        });
        // NBD clients connected: --exit-when-complete waits until none is,
        // so a hypervisor still on the export is never cut off.
        let (clients_tx, mut clients_rx) = tokio::sync::watch::channel(0usize);
        let verified_or_stopped = async move {
            let outcome = verified_or_stopped.await;
            if outcome.is_none() {
                let n = *clients_rx.borrow_and_update();
                if n > 0 {
                    tracing::info!(
                        clients = n,
                        "complete and verified; --exit-when-complete waits for the NBD clients to disconnect"
                    );
                }
                let _ = clients_rx.wait_for(|n| *n == 0).await;
            }
            outcome
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        // The export's URI while its requests wait for the switchover.
        let mut held_nbd = None;
        if let Some(listener) = listener {
            let uri = listener.uri(nbd_tls.is_some());
            let tls_note = match &nbd_tls {
                Some(tls) => format!(
                    "; TLS required, client certificates from the CA of the {}",
                    tls.origin()
                ),
                None => String::new(),
            };
            if gate.is_open() {
                println!("ferry pull: serving {uri} (size {} bytes{tls_note})", geo.disk_size);
            } else {
                println!(
                    "ferry pull: {uri} accepts NBD clients (size {} bytes{tls_note}); their \
                     requests wait until the switchover",
                    geo.disk_size
                );
                held_nbd = Some(uri);
            }
            let device = device.clone();
            let config = NbdServerConfig {
                export_name: a.export_name.clone(),
                read_only: false,
                tls: nbd_tls,
            };
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(
                async move {
                    ferry_nbd::serve_counted(
                        listener,
                        device,
                        config,
                        async move {
                            let _ = rx.wait_for(|s| *s).await;
                        },
                        clients_tx,
                    )
                    .await
                    .map_err(anyhow::Error::from)
                }
                .in_current_span(),
            ));
        }
        // Pre-copy: nothing served until the switchover (or, resumed
        // after it, at once). A switchover asked of a pull that does not
        // pre-copy (or did switch) is refused.
        if !a.precopy || precopy_record.switched {
            switch_rx.close();
        }
        let mut switching = None;
        let mut ublk = None;
        if a.precopy {
            if precopy_record.switched {
                tracing::info!(generation = precopy_record.generation, "the switchover was done before this restart: serving");
            } else {
                if a.ublk {
                    ublk = Some(start_ublk(&a, ublk_recover, gated.clone(), true).await?);
                }
                println!(
                    "ferry pull: pre-copying; nothing is served until `ferry switchover --control {}`",
                    a.control.display()
                );
                crate::notify::notify("READY=1\nSTATUS=pre-copying");
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .context("cannot install a SIGTERM handler")?;
                let mut from = precopy_record.generation;
                loop {
                    let rounds = tokio::spawn(
                        precopy::follow_rounds(shared.clone(), verbs.clone(), from)
                            .in_current_span(),
                    );
                    let reply = tokio::select! {
                        Some(reply) = switch_rx.recv() => reply,
                        Some(req) = abort_rx.recv() => {
                            tracing::warn!("aborting the migration during pre-copy (ferry abort)");
                            rounds.abort();
                            if let Some(u) = ublk.take() {
                                u.shut_down().await;
                            }
                            let result = abort_migration(&shared, &a.disk, &state_path, id, req).await;
                            drop(sockets);
                            return result;
                        }
                        _ = tokio::signal::ctrl_c() => {
                            rounds.abort();
                            if let Some(u) = ublk.take() {
                                u.shut_down().await;
                            }
                            shared.sync().await.context("final sync failed")?;
                            return Ok(());
                        }
                        _ = term.recv() => {
                            rounds.abort();
                            if let Some(u) = ublk.take() {
                                u.shut_down().await;
                            }
                            shared.sync().await.context("final sync failed")?;
                            return Ok(());
                        }
                    };
                    let t0 = Instant::now();
                    rounds.abort();
                    let _ = rounds.await;
                    match precopy::switch(&shared, &verbs).await {
                        Ok(last) => {
                            switch_rx.close();
                            // The last changes are applied: serve.
                            gate.open();
                            if let Some(u) = &ublk {
                                println!(
                                    "ferry pull: serving {} (size {} bytes)",
                                    u.path, geo.disk_size
                                );
                            }
                            if let Some(uri) = &held_nbd {
                                println!(
                                    "ferry pull: serving {uri} (size {} bytes)",
                                    geo.disk_size
                                );
                            }
                            switching = Some((t0, last.generation, reply));
                            break;
                        }
                        Err(e) => {
                            // Nothing served yet: pre-copy goes on, and a
                            // later switchover may work.
                            let e = crate::logging::error_chain(&e);
                            tracing::error!(error = %e, "switchover failed; pre-copy goes on");
                            let _ = reply
                                .send(serde_json::json!({"ok": false, "error": e}).to_string());
                            from = precopy::applied(&verbs);
                        }
                    }
                }
            }
        }
        let mut ublk_id = None;
        if a.ublk {
            let u = match ublk.take() {
                Some(u) => u,
                None => start_ublk(&a, ublk_recover, gated.clone(), false).await?,
            };
            ublk_id = u.id;
            tasks.push(tokio::task::spawn_blocking(move || u.join()));
        }
        if let Some((t0, generation, reply)) = switching {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            precopy::switched(&verbs, generation, ms);
            tracing::info!(switchover_ms = ms, generation, "switched over: serving (post-copy from now on)");
            let _ = reply.send(
                serde_json::json!({"ok": true, "switchover_ms": ms, "generation": generation})
                    .to_string(),
            );
        }
        crate::notify::notify(&format!("READY=1\nSTATUS=serving {}", a.disk.display()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install a SIGTERM handler")?;
        // The source's Welcome came before it had checked our certificate
        // (0.5-RTT, so the disk is served one round trip sooner); should it
        // refuse us, stop at once with its reason instead of serving a disk
        // that can never fill.
        let refused = async move {
            match client {
                Some(c) => match c.authenticated().await {
                    Ok(()) => std::future::pending().await,
                    Err(e) => e,
                },
                None => std::future::pending().await,
            }
        };
        // A resumed pull's source may turn out to be another, or refuse us.
        let unusable = async move {
            match reaching {
                Some(task) => match task.await {
                    Ok(Ok(())) => std::future::pending().await,
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("the task reaching the source failed: {e}"),
                },
                None => std::future::pending().await,
            }
        };
        let mut fatal = None;
        let mut stop_error = None;
        let mut aborting = None;
        let mut ended_early = None;
        tokio::select! {
            Some(req) = abort_rx.recv() => {
                tracing::warn!("aborting the migration (ferry abort): stopping the frontends");
                aborting = Some(req);
            }
            outcome = verified_or_stopped, if a.exit_when_complete => {
                match &outcome {
                    None => tracing::info!("complete and verified: exiting (--exit-when-complete)"),
                    Some(why) => tracing::error!("stopped: {why} (--exit-when-complete)"),
                }
                ended_early = outcome;
            }
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            e = refused => {
                tracing::error!("the source did not accept us: {e}");
                fatal = Some(e);
            }
            e = unusable => {
                tracing::error!("{}", crate::logging::error_chain(&e));
                stop_error = Some(e);
            }
        }
        tracing::info!("stopping: syncing the disk and its state");
        crate::notify::notify("STOPPING=1");
        let _ = stop_tx.send(true);
        if let Some(id) = ublk_id {
            if let Err(e) = ferry_ublk::stop_ublk(id) {
                tracing::warn!(error = %e, "stopping the ublk device failed");
            }
        }
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::logging::error_chain(&e), "frontend ended with an error")
                }
                Err(e) => tracing::warn!(error = %e, "frontend task failed"),
            }
        }
        if let Some(req) = aborting {
            let result = abort_migration(&shared, &a.disk, &state_path, id, req).await;
            drop(sockets);
            return result;
        }
        shared.sync().await.context("final sync failed")?;
        drop(sockets);
        if let Some(why) = ended_early {
            return Err(crate::control::PullStopped(why).into());
        }
        if let Some(e) = stop_error {
            return Err(e);
        }
        match fatal {
            Some(e) => {
                // No guest request was answered before the acceptance (see
                // `ferry_pull::Shell`'s admission), so the files this run created hold
                // nothing of anyone's: remove them, as if it never started.
                if !resumed {
                    if !disk_is_device {
                        let _ = std::fs::remove_file(&a.disk);
                    }
                    let _ = std::fs::remove_file(&state_path);
                }
                Err(anyhow::Error::from(e).context(format!(
                    "the source {} did not accept this destination",
                    a.source
                        .as_ref()
                        .map_or_else(|| "(none)".to_string(), |s| s.to_string())
                )))
            }
            None => Ok(()),
        }
    })
}

/// The device `--ublk` serves: the pull's, behind the pre-copy's gate.
type GatedDevice = gate::Gated<PullDevice<Quic>>;

/// The ublk frontend, its device live.
struct Ublk {
    /// /dev/ublkbN.
    path: String,
    /// Its N.
    id: Option<u32>,
    thread: std::thread::JoinHandle<Result<(), ferry_ublk::UblkError>>,
}

impl Ublk {
    /// Waits for the frontend's thread (after `ferry_ublk::stop_ublk`).
    fn join(self) -> Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the ublk thread panicked"))?
            .map_err(anyhow::Error::from)
    }

    /// Stops the device and waits for its thread (a pull leaving during
    /// the pre-copy).
    async fn shut_down(self) {
        if let Some(id) = self.id {
            if let Err(e) = ferry_ublk::stop_ublk(id) {
                tracing::warn!(error = %e, "stopping the ublk device failed");
            }
        }
        match tokio::task::spawn_blocking(move || self.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::logging::error_chain(&e), "the ublk frontend ended with an error")
            }
            Err(e) => tracing::warn!(error = %e, "the ublk frontend's task failed"),
        }
    }
}

/// Adds and starts /dev/ublkbN for `device` (recovering the device a
/// crashed run left when `recover`); returns once it is live. `dark`: the
/// gate is closed (pre-copy), which the line printed says.
async fn start_ublk(
    a: &PullArgs,
    recover: bool,
    device: Arc<GatedDevice>,
    dark: bool,
) -> Result<Ublk> {
    let opts = ferry_ublk::UblkOptions {
        dev_id: a.ublk_id,
        queues: a.queues,
        depth: a.depth,
        recover,
        user_copy: !a.ublk_no_user_copy,
        ..Default::default()
    };
    let (live_tx, live_rx) = tokio::sync::oneshot::channel::<String>();
    let handle = tokio::runtime::Handle::current();
    let size = ferry_device::BlockDevice::size(&*device);
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new()
        .name("ublk".into())
        .spawn(move || {
            let _in = span.enter();
            ferry_ublk::serve_ublk(device, handle, opts, move |path| {
                if dark {
                    println!(
                        "ferry pull: {path} added (size {size} bytes): every request fails \
                         until the switchover"
                    );
                } else {
                    println!("ferry pull: serving {path} (size {size} bytes)");
                }
                let _ = live_tx.send(path.to_string());
            })
        })
        .context("cannot start the ublk thread")?;
    match live_rx.await {
        Ok(path) => Ok(Ublk {
            id: ferry_ublk::dev_id_of(&path),
            path,
            thread,
        }),
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e.into()),
            _ => bail!("the ublk device did not come up"),
        },
    }
}
