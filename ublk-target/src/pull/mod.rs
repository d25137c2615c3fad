//! `ferry pull`: present the source's disk locally at once, fetch absent
//! data on demand, copy the rest in the background, verify, keep serving.

mod copier;
mod device;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_core::{ChunkKind, Engine};
use ferry_nbd::{NbdListener, NbdServerConfig};
use ferry_store::{Backing, BackingError, StateFile};
use ferry_transport::{Client, ClientOptions, Fingerprint, Identity, Tuning};
use tokio::sync::Notify;

use crate::cli::PullArgs;
pub(crate) use device::{PullDevice, Shared};

/// Default state path: beside the disk.
fn default_state_path(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".ferry-state");
    PathBuf::from(s)
}

/// Opens (resume) or creates (fresh) the backing file and its state,
/// refusing every combination whose contents would be unknown. Never
/// modifies an existing file it refuses.
fn open_or_create(
    disk: &Path,
    state_path: &Path,
    manifest: &ferry_core::Manifest,
) -> Result<(Backing, StateFile, bool)> {
    let geo = manifest.geometry();
    let id = manifest.source_id();
    match (disk.exists(), state_path.exists()) {
        (true, true) => {
            let backing = Backing::open(disk, geo.disk_size)?;
            let state = StateFile::open(state_path, geo, id)?;
            Ok((backing, state, true))
        }
        (true, false) => {
            // Check the size first for the clearer message.
            let found = std::fs::metadata(disk)
                .with_context(|| format!("cannot stat {}", disk.display()))?
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
                state: state_path.to_owned(),
            }
            .into())
        }
        (false, true) => bail!(
            "state file {} exists but the disk {} does not; refusing to start \
             (remove the state file to start afresh)",
            state_path.display(),
            disk.display()
        ),
        (false, false) => {
            let backing = Backing::create(disk, geo.disk_size)?;
            match StateFile::create(state_path, geo, id) {
                Ok(state) => Ok((backing, state, false)),
                Err(e) => {
                    drop(backing);
                    let _ = std::fs::remove_file(disk);
                    Err(e.into())
                }
            }
        }
    }
}

/// Settings of the background copier that can change while running.
pub(crate) struct CopierSettings {
    pub(crate) rate_limit: AtomicU64,
    pub(crate) batch_chunks: u64,
    pub(crate) window: usize,
    pub(crate) sync_bytes: u64,
}

/// Facts for the status report.
pub(crate) struct Report {
    pub(crate) started: Instant,
    pub(crate) present_at_start: u64,
    pub(crate) skipped_zero: u64,
    pub(crate) verify: Mutex<copier::Verification>,
    pub(crate) rate: device::RateMeter,
}

pub(crate) fn run(a: PullArgs) -> Result<()> {
    let fp: Fingerprint = a.trust_peer.parse().with_context(|| {
        format!(
            "--trust-peer {:?} is not a certificate fingerprint",
            a.trust_peer
        )
    })?;
    let identity = Identity::load(&a.identity)
        .with_context(|| format!("cannot load identity from {}", a.identity.display()))?;
    let Some(nbd_spec) = a.nbd.clone() else {
        bail!("no frontend: pass --nbd ADDR:PORT or --nbd unix:PATH");
    };
    if a.batch_chunks == 0 || a.window == 0 {
        bail!("--batch-chunks and --window must be at least 1");
    }
    let state_path = a
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&a.disk));
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        // Bind every listener before touching any file, so a port in use
        // fails the start with nothing changed.
        if let Some(path) = nbd_spec.strip_prefix("unix:") {
            copier::remove_stale_socket(Path::new(path), "--nbd")?;
        }
        let listener = NbdListener::bind(&nbd_spec).await?;
        let control = copier::ControlListener::bind(&a.control)?;
        let tuning = Tuning::for_link(
            a.link_mbit * 1_000_000,
            Duration::from_millis(a.link_rtt_ms),
        );
        let started = Instant::now();
        let client = Client::connect(ClientOptions {
            server: a.source,
            identity,
            server_fingerprint: fp,
            tuning,
            connect_timeout: Duration::from_secs(a.connect_timeout),
        })
        .await
        .with_context(|| format!("cannot connect to the source {}", a.source))?;
        let manifest = client.manifest().clone();
        let geo = manifest.geometry();
        let (backing, state, resumed) = open_or_create(&a.disk, &state_path, &manifest)?;
        let engine = Engine::new(
            manifest.clone(),
            state.present_bits(geo.blocks()),
            state.guest_bits(geo.chunks()),
        );
        let skipped_zero: u64 = (0..geo.chunks())
            .filter(|c| manifest.chunk(*c) == ChunkKind::Zero)
            .map(|c| u64::from(geo.chunk_len(c)))
            .sum();
        let present_at_start = engine.present_bytes() - skipped_zero.min(engine.present_bytes());
        let mut engine = engine;
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
            client,
            bg_in_flight: AtomicU64::new(0),
        });
        let settings = Arc::new(CopierSettings {
            rate_limit: AtomicU64::new(a.rate),
            batch_chunks: u64::from(a.batch_chunks),
            window: a.window,
            sync_bytes: a.sync_bytes,
        });
        let report = Arc::new(Report {
            started,
            present_at_start,
            skipped_zero,
            verify: Mutex::new(copier::Verification::default()),
            rate: device::RateMeter::default(),
        });
        let device = Arc::new(PullDevice(shared.clone()));
        let uri = listener.describe();
        tokio::spawn(copier::run_copier(
            shared.clone(),
            settings.clone(),
            report.clone(),
        ));
        tokio::spawn(copier::run_syncer(
            shared.clone(),
            settings.clone(),
            report.clone(),
        ));
        tokio::spawn(control.serve(shared.clone(), settings.clone(), report.clone()));
        println!("ferry pull: serving {uri} (size {} bytes)", geo.disk_size);
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping: syncing the disk and its state");
        };
        ferry_nbd::serve(
            listener,
            device,
            NbdServerConfig {
                export_name: a.export_name.clone(),
                read_only: false,
            },
            shutdown,
        )
        .await?;
        shared.sync().await.context("final sync failed")?;
        let _ = std::fs::remove_file(&a.control);
        Ok(())
    })
}
