//! `ferry serve --present`: the source image served read-write to the
//! running source VM over NBD. Every write is passed through to the image
//! and recorded in the change log (per chunk, by generation); the hashes
//! of written chunks are forgotten. The switchover freezes it: writes in
//! progress end, later writes are held, never failed (flushes are still
//! answered: they cover completed writes only)
//! (docs/decisions/precopy-switchover.md).

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

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
        let me = self.clone();
        let c = chunks.clone();
        tokio::task::spawn_blocking(move || {
            me.manifest.begin_write(c.clone());
            let r = me.image.write_presented(offset, &data, fua);
            me.manifest.end_write(c);
            r
        })
        .await
        .map_err(io::Error::other)??;
        self.log().record(chunks);
        Ok(())
    }
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
