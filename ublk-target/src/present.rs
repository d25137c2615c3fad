//! `ferry serve --present`: the source image served read-write to the
//! running source VM over NBD. Every write is passed through to the image
//! and recorded in the change log (per chunk, by generation); the hashes
//! of written chunks are forgotten. The switchover freezes it: writes in
//! progress end, later writes are held, never failed (flushes are still
//! answered: they cover completed writes only)
//! (docs/decisions/precopy-switchover.md). It runs on a thread of its
//! own, apart from the copy's runtime, and writes without a hop through
//! the blocking pool (docs/decisions/present-own-thread.md).

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use ferry_core::changes::ChangeLog;
use ferry_core::{Geometry, SharedManifest};
use ferry_device::BlockDevice;
use ferry_store::SourceImage;
use ferry_transport::LiveChanges;

/// The image as the source VM's disk.
pub(crate) struct Presented {
    image: Arc<SourceImage>,
    manifest: Arc<SharedManifest>,
    log: Mutex<ChangeLog>,
    /// Writes hold it shared; the switchover takes it for good.
    gate: Arc<tokio::sync::RwLock<()>>,
    frozen: Mutex<Option<tokio::sync::OwnedRwLockWriteGuard<()>>>,
}

impl Presented {
    pub(crate) fn new(image: Arc<SourceImage>, manifest: Arc<SharedManifest>) -> Self {
        Self {
            image,
            manifest,
            log: Mutex::new(ChangeLog::new()),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            frozen: Mutex::new(None),
        }
    }

    fn geo(&self) -> Geometry {
        self.manifest.geometry()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, ChangeLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset` through to the image: the chunks' hashes
    /// are forgotten before and after, the change is recorded once done.
    async fn write_through(
        self: &Arc<Self>,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> io::Result<()> {
        let _open = self.gate.read().await;
        if data.is_empty() {
            return Ok(());
        }
        let chunks = self.geo().chunks_touching(offset, data.len() as u64);
        let c = chunks.clone();
        let write = move |me: &Self| {
            me.manifest.begin_write(c.clone());
            let r = me.image.write_presented(offset, &data, fua);
            me.manifest.end_write(c);
            r
        };
        if fua {
            // A durable write waits for the disk: not on the thread that
            // answers the VM's other requests.
            let me = self.clone();
            tokio::task::spawn_blocking(move || write(&me))
                .await
                .map_err(io::Error::other)??;
        } else {
            // Into the page cache: a hop to the blocking pool and back
            // would cost more than the write itself on a busy host.
            write(self)?;
        }
        self.log().record(chunks);
        Ok(())
    }
}

/// Serves `p` to the source VM over NBD on the unix socket `path`, on a
/// thread of its own with its own single-threaded runtime (the copy's
/// reads, compression and QUIC never hold up the VM's writes); returns
/// where it listens once it does. Runs until the process ends.
pub(crate) fn start(p: Arc<Presented>, path: &Path) -> Result<String> {
    let spec = format!("unix:{}", path.display());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ferry-present".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(
                        anyhow::Error::new(e).context("cannot start the runtime")
                    ));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match ferry_nbd::NbdListener::bind(&spec).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(
                            anyhow::Error::new(e).context(format!("--present {spec}"))
                        ));
                        return;
                    }
                };
                let _ = tx.send(Ok(listener.describe()));
                let config = ferry_nbd::NbdServerConfig {
                    export_name: String::new(),
                    read_only: false,
                    tls: None,
                };
                if let Err(e) = ferry_nbd::serve(
                    listener,
                    Arc::new(PresentedDevice(p)),
                    config,
                    std::future::pending(),
                )
                .await
                {
                    tracing::error!(error = %e, "the presented disk's NBD server stopped");
                }
            });
        })
        .context("cannot start the presenting thread")?;
    rx.recv()
        .context("the presenting thread ended before it listened")?
}

/// The NBD device over a [`Presented`] image.
#[derive(Clone)]
pub(crate) struct PresentedDevice(pub(crate) Arc<Presented>);

impl BlockDevice for PresentedDevice {
    fn size(&self) -> u64 {
        self.0.image.size()
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let p = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            p.image.read_at(offset, &mut buf).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.0.write_through(offset, data, fua).await
    }

    /// Not held by the freeze: a flush covers completed writes only, and
    /// a held write has not completed.
    async fn flush(&self) -> io::Result<()> {
        let p = self.0.clone();
        tokio::task::spawn_blocking(move || p.image.sync_presented())
            .await
            .map_err(io::Error::other)?
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // Written as zeros (not a hole): the change log records it like
        // any other write.
        const STEP: u64 = 4 << 20;
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at);
            self.0.write_through(at, vec![0; n as usize], fua).await?;
            at += n;
        }
        Ok(())
    }
}

impl LiveChanges for Presented {
    fn end_round(&self, force: bool) -> u64 {
        self.log().end_round(force)
    }

    fn since(&self, applied: u64) -> (u64, Option<Vec<Range<u64>>>) {
        let log = self.log();
        (log.generation(), log.since(applied))
    }

    fn frozen(&self) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn freeze(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self
                .frozen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                return Ok(());
            }
            let guard = self.gate.clone().write_owned().await;
            let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
            if frozen.is_none() {
                tracing::info!("the presented disk is frozen: further writes are held");
                *frozen = Some(guard);
            }
            Ok(())
        })
    }
}
