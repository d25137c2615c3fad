//! `ferry pull`: present the source's disk locally at once, fetch absent
//! data on demand, copy the rest in the background, verify, keep serving.

mod copier;
mod device;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_core::Engine;
use ferry_nbd::{NbdListener, NbdServerConfig};
use ferry_store::StateFile;
use ferry_transport::{Client, ClientOptions, Fingerprint, Identity, TransportError};
use tokio::sync::Notify;

use crate::cli::PullArgs;
pub(crate) use device::{PullDevice, Shared};

/// Default state path: beside the disk.
fn default_state_path(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".ferry-state");
    PathBuf::from(s)
}

/// Opens (resume) or creates (fresh) the backing file and its state, locked
/// and bound to each other, refusing every combination whose contents would
/// be unknown ([`ferry_store::destination`]). Never modifies an existing
/// file it refuses.
///
/// New files are made durable before they get their final names; their
/// directory entries are not: [`creation_sync`] does that on a blocking
/// thread, and the first sync round waits for it, so nothing is recorded as
/// durable before the files themselves are.
fn open_or_create(
    disk: &Path,
    state_path: &Path,
    geo: ferry_core::Geometry,
    id: [u8; 32],
) -> Result<ferry_store::Destination> {
    Ok(ferry_store::open_or_create(disk, state_path, geo, id)?)
}

/// Makes freshly created files' directory entries durable on a blocking
/// thread; see [`open_or_create`].
///
/// `inject_failure_ms` is a test hook: the fsyncs then fail that many ms
/// after they begin (`--inject-creation-sync-failure-ms`), so a test can
/// tell whether the first sync round waited for them.
fn creation_sync(
    disk: &Path,
    state_path: &Path,
    inject_failure_ms: Option<u64>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let paths = [disk.to_owned(), state_path.to_owned()];
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        if let Some(ms) = inject_failure_ms {
            std::thread::sleep(Duration::from_millis(ms));
            tracing::warn!("test hook: failing the new files' fsyncs");
            return Err(std::io::Error::other(
                "test hook: the new files' fsyncs failed",
            ));
        }
        for p in &paths {
            ferry_store::sync_parent_dir(p)?;
        }
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "new disk and state files durable"
        );
        Ok(())
    })
}

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

/// Settings of the background copier that can change while running.
pub(crate) struct CopierSettings {
    pub(crate) rate_limit: AtomicU64,
    pub(crate) batch_chunks: u64,
    pub(crate) window: copier::Window,
    pub(crate) sync_bytes: u64,
    /// The link's round-trip time (`--link-rtt-ms`), for the rate limit.
    pub(crate) link_rtt: Duration,
}

/// Facts for the status report.
pub(crate) struct Report {
    /// The NBD listener's URI and whether it requires TLS.
    pub(crate) nbd: Option<(String, bool)>,
    pub(crate) started: Instant,
    pub(crate) present_at_start: u64,
    pub(crate) verify: Mutex<copier::Verification>,
    pub(crate) rate: device::RateMeter,
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
    match (a.source, fp) {
        (Some(server), Some(server_fingerprint)) => Ok(Some(ClientOptions {
            server,
            identity,
            server_fingerprint,
            tuning: a.link.tuning(),
            connect_timeout: Duration::from_secs(a.connect_timeout),
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
    shared: Arc<Shared>,
    opts: ClientOptions,
    state_path: PathBuf,
    geo: ferry_core::Geometry,
    id: [u8; 32],
    verified: bool,
) -> Result<()> {
    let addr = opts.server;
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
    if verified {
        tracing::info!(%addr, "reached the source; the copy is already complete and verified, so it is let go");
        client.close();
        return Ok(());
    }
    tracing::info!(%addr, "reached the source; fetching what is absent");
    shared.source.send_replace(Some(client.clone()));
    shared.changed.notify_waiters();
    keep_connected(shared, client).await;
    Ok(())
}

/// Keeps the connection to the source up (see
/// [`Client::keep_connected`]) until the copy is verified; a source that
/// changed stops the migration, as a fetch that notices it does.
async fn keep_connected(shared: Arc<Shared>, client: Client) {
    match client.keep_connected().await {
        Ok(()) => {}
        Err(e @ TransportError::SourceChanged { .. }) => {
            shared.engine.lock().expect("engine lock").fail(format!(
                "{e}; the source must not change after switchover; the destination's writes are kept"
            ));
            shared.changed.notify_waiters();
        }
        Err(e) => tracing::warn!(error = %e, "stopped watching the connection to the source"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn run(a: PullArgs) -> Result<()> {
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    if a.nbd.is_none() && !a.ublk {
        bail!("no frontend: pass --ublk, or --nbd unix:PATH (or --nbd ADDR:PORT with --nbd-tls-dir or --nbd-tcp-insecure)");
    }
    let state_path = a
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&a.disk));
    // A resumed pull learns the disk from its state file, and serves it
    // before (or without) reaching the source; only a fresh one must ask
    // the source first. Nothing is changed by reading it.
    let header = if state_path.exists() {
        Some(StateFile::peek(&state_path)?)
    } else {
        None
    };
    let verified = header.and_then(|h| h.verified);
    let source = source_options(&a, identity, verified.is_some(), &state_path)?;
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
        Some(n) => copier::Window::Fixed(n),
        None => copier::Window::wire(
            a.link.link_mbit,
            a.link.link_rtt_ms,
            u64::from(a.batch_chunks) * u64::from(ferry_core::geometry::DEFAULT_CHUNK_SIZE),
        ),
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        // Bind every listener before touching any file, so a port in use
        // fails the start with nothing changed.
        let mut sockets = BoundSockets::default();
        let listener = match &a.nbd {
            Some(spec) => {
                if let Some(path) = spec.strip_prefix("unix:") {
                    copier::remove_stale_socket(Path::new(path), "--nbd")?;
                }
                let l = NbdListener::bind_with(spec, &access).await?;
                if let NbdListener::Unix(_, path) = &l {
                    sockets.0.push(path.clone());
                }
                Some(l)
            }
            None => None,
        };
        let control = copier::ControlListener::bind(&a.control, &access)?;
        sockets.0.push(a.control.clone());
        let started = Instant::now();
        let (client, geo, id, later) = match (header, source) {
            (Some(h), source) => (None, h.geometry, h.source_id, source),
            (None, Some(opts)) => {
                tracing::info!(source = %opts.server, "connecting to the source");
                let server = opts.server;
                let client = Client::connect(opts)
                    .await
                    .with_context(|| format!("cannot connect to the source {server}"))?;
                let info = *client.info();
                (Some(client), info.geometry, info.source_id, None)
            }
            (None, None) => bail!("--source and --trust-peer are needed for a fresh pull"),
        };
        let ferry_store::Destination {
            backing,
            mut state,
            resumed,
            created,
        } = open_or_create(&a.disk, &state_path, geo, id)?;
        if let Some(gid) = access.group {
            grant_group(&a.disk, gid)?;
            grant_group(&state_path, gid)?;
        }
        let created =
            created.then(|| creation_sync(&a.disk, &state_path, a.inject_creation_sync_failure_ms));
        // Writes the guest was told were done before a crash of ours on this
        // boot are in the page cache: make them durable and present now, so
        // nothing fetched later can overwrite them.
        // Their chunks are the guest's, present blocks or not: never
        // compared with the source's.
        let recovered = state.recovered_writes().to_vec();
        let guest_chunks = state.recovered_guest_chunks().to_vec();
        if !recovered.is_empty() || !guest_chunks.is_empty() {
            let blocks: u64 = recovered.iter().map(|r| r.end - r.start).sum();
            let guest_chunks_n = guest_chunks.len();
            backing.sync().context("cannot sync the backing file")?;
            state.persist(&ferry_core::SyncBatch {
                blocks: recovered,
                guest_chunks,
            })?;
            tracing::info!(
                blocks,
                chunks = guest_chunks_n,
                "kept guest writes acknowledged before the previous run stopped"
            );
        }
        // The disk is served at once; the manifest (zero chunks, hashes)
        // streams in meanwhile and starts the background copy.
        // A copy complete and verified has every block: it needs no
        // manifest (which would mark the zero chunks present) nor source.
        let present = if verified.is_some() {
            bitvec::bitvec![1; geo.blocks() as usize]
        } else {
            state.present_bits(geo.blocks())
        };
        let mut engine = Engine::new(geo, present, state.guest_bits(geo.chunks()));
        let present_at_start = engine.present_bytes();
        engine.set_background_paused(a.hold_background);
        tracing::info!(
            disk = %a.disk.display(),
            state = %state_path.display(),
            size = geo.disk_size,
            resumed,
            present_bytes = present_at_start,
            "destination disk ready"
        );
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            changed: Notify::new(),
            backing: Arc::new(backing),
            state: Arc::new(Mutex::new(state)),
            sync_lock: tokio::sync::Mutex::new(()),
            created: Mutex::new(created),
            source: tokio::sync::watch::Sender::new(client.clone()),
            gated: !resumed,
            absent_timeout: a.absent_timeout_secs.map(Duration::from_secs),
            bg_in_flight: AtomicU64::new(0),
            bg_in_flight_bytes: AtomicU64::new(0),
            fill_trouble: Mutex::default(),
        });
        let settings = Arc::new(CopierSettings {
            rate_limit: AtomicU64::new(a.rate),
            batch_chunks: u64::from(a.batch_chunks),
            window,
            sync_bytes: a.sync_bytes,
            link_rtt: Duration::from_millis(a.link.link_rtt_ms),
        });
        let verification = match verified {
            Some(v) => copier::Verification {
                state: "ok".into(),
                chunks_checked: v.chunks_checked,
                mismatches: Vec::new(),
                disk_blake3: Some(hex(&v.disk_blake3)),
                disk_blake3_bytes: v.disk_blake3,
                refetched: 0,
            },
            None => copier::Verification::default(),
        };
        let report = Arc::new(Report {
            nbd: listener
                .as_ref()
                .map(|l| (l.uri(nbd_tls.is_some()), nbd_tls.is_some())),
            started,
            present_at_start,
            verify: Mutex::new(verification),
            rate: device::RateMeter::default(),
        });
        let device = Arc::new(PullDevice(shared.clone()));
        if verified.is_some() {
            tracing::info!("the copy is complete and verified: serving it without the source");
        } else {
            tokio::spawn(copier::fetch_manifest(shared.clone()));
            tokio::spawn(copier::run_copier(
                shared.clone(),
                settings.clone(),
                report.clone(),
            ));
        }
        if let Some(c) = &client {
            tokio::spawn(keep_connected(shared.clone(), c.clone()));
        }
        let reaching = later.map(|opts| {
            tokio::spawn(reach_source(
                shared.clone(),
                opts,
                state_path.clone(),
                geo,
                id,
                verified.is_some(),
            ))
        });
        tokio::spawn(copier::run_syncer(
            shared.clone(),
            settings.clone(),
            report.clone(),
        ));
        tokio::spawn(control.serve(shared.clone(), settings.clone(), report.clone()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(listener) = listener {
            let uri = listener.uri(nbd_tls.is_some());
            match &nbd_tls {
                Some(tls) => println!(
                    "ferry pull: serving {uri} (size {} bytes; TLS required, client \
                     certificates from the CA of the {})",
                    geo.disk_size,
                    tls.origin()
                ),
                None => println!("ferry pull: serving {uri} (size {} bytes)", geo.disk_size),
            }
            let device = device.clone();
            let config = NbdServerConfig {
                export_name: a.export_name.clone(),
                read_only: false,
                tls: nbd_tls,
            };
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                ferry_nbd::serve(listener, device, config, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
                .map_err(anyhow::Error::from)
            }));
        }
        let mut ublk_id = None;
        if a.ublk {
            let opts = ferry_ublk::UblkOptions {
                dev_id: a.ublk_id,
                queues: a.queues,
                depth: a.depth,
                recover: ublk_recover,
                user_copy: !a.ublk_no_user_copy,
                ..Default::default()
            };
            let (live_tx, live_rx) = tokio::sync::oneshot::channel::<String>();
            let handle = tokio::runtime::Handle::current();
            let device = device.clone();
            let size = geo.disk_size;
            let ublk_thread = std::thread::Builder::new()
                .name("ublk".into())
                .spawn(move || {
                    ferry_ublk::serve_ublk(device, handle, opts, move |path| {
                        println!("ferry pull: serving {path} (size {size} bytes)");
                        let _ = live_tx.send(path.to_string());
                    })
                })
                .context("cannot start the ublk thread")?;
            match live_rx.await {
                Ok(path) => ublk_id = ferry_ublk::dev_id_of(&path),
                Err(_) => {
                    let r = ublk_thread.join();
                    match r {
                        Ok(Err(e)) => return Err(e.into()),
                        _ => bail!("the ublk device did not come up"),
                    }
                }
            }
            tasks.push(tokio::task::spawn_blocking(move || {
                ublk_thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the ublk thread panicked"))?
                    .map_err(anyhow::Error::from)
            }));
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
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            e = refused => {
                tracing::error!("the source did not accept us: {e}");
                fatal = Some(e);
            }
            e = unusable => {
                tracing::error!("{e:#}");
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
                    tracing::warn!(error = %format!("{e:#}"), "frontend ended with an error")
                }
                Err(e) => tracing::warn!(error = %e, "frontend task failed"),
            }
        }
        shared.sync().await.context("final sync failed")?;
        drop(sockets);
        if let Some(e) = stop_error {
            return Err(e);
        }
        match fatal {
            Some(e) => {
                // No guest request was answered before the acceptance (see
                // `Shared::admitted`), so the files this run created hold
                // nothing of anyone's: remove them, as if it never started.
                if !resumed {
                    let _ = std::fs::remove_file(&a.disk);
                    let _ = std::fs::remove_file(&state_path);
                }
                Err(anyhow::Error::from(e).context(format!(
                    "the source {} did not accept this destination",
                    a.source
                        .map_or_else(|| "(none)".to_string(), |s| s.to_string())
                )))
            }
            None => Ok(()),
        }
    })
}
