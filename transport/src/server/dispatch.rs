//! Dispatch: reads the one request of a stream and hands it to its
//! handler (manifest, read, or an `Error` for anything else), answering
//! through a [`Responder`] that resets the stream if the answer is cut off.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_core::{ChunkKind, Manifest};
use quinn::{RecvStream, SendStream};

use super::read::read;
use super::Shared;
use crate::codec::{self, ReadFail, CODE_ABORTED, CODE_MALFORMED};
use crate::wire::{ErrorCode, Message, Priority, MAX_MANIFEST_PART, PROTOCOL_VERSION};

/// Largest request frame accepted (requests are a few bytes).
const MAX_REQUEST_FRAME: usize = 1024;

/// A response stream that is reset, not finished, if dropped before
/// [`Responder::finish`]: a cancelled response must not look complete.
pub(super) struct Responder {
    send: Option<SendStream>,
}

impl Responder {
    pub(super) fn stream(&mut self) -> &mut SendStream {
        self.send.as_mut().expect("responder used after finish")
    }

    pub(super) async fn send(&mut self, msg: &Message) -> Result<(), quinn::WriteError> {
        codec::write_msg(self.stream(), msg).await
    }

    pub(super) async fn error(&mut self, code: ErrorCode, message: String) {
        if let Err(e) = self.send(&Message::Error { code, message }).await {
            tracing::debug!("cannot send error frame: {e}");
        }
        self.finish();
    }

    pub(super) fn finish(&mut self) {
        if let Some(mut s) = self.send.take() {
            let _ = s.finish();
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(mut s) = self.send.take() {
            let _ = s.reset(CODE_ABORTED);
        }
    }
}

/// Serves the one request of a stream.
pub(super) async fn handle_stream(
    send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    remote: SocketAddr,
) {
    let mut resp = Responder { send: Some(send) };
    let request = match codec::read_frame(&mut recv, MAX_REQUEST_FRAME).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            resp.finish();
            return;
        }
        Err(ReadFail::Wire(e)) => {
            tracing::warn!(%remote, "malformed request: {e}");
            let _ = recv.stop(CODE_MALFORMED);
            resp.error(ErrorCode::Malformed, format!("malformed request: {e}"))
                .await;
            return;
        }
        Err(ReadFail::Stream(e)) => {
            tracing::debug!(%remote, "request stream failed: {e}");
            return;
        }
    };
    match request {
        Message::Hello { version } => hello(&mut resp, version, remote).await,
        Message::GetManifest { complete } => {
            send_manifest(&mut resp, &shared, complete, remote).await
        }
        Message::Read {
            first_chunk,
            count,
            priority,
        } => {
            let t0 = std::time::Instant::now();
            let read_ms = read(&mut resp, &shared, first_chunk, count, priority, remote).await;
            if priority != Priority::Background {
                tracing::debug!(
                    %remote,
                    first_chunk,
                    priority = priority.name(),
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    read_ms,
                    "on-demand read written"
                );
            }
        }
        Message::Precopy { since } => {
            super::precopy::subscribe(&mut resp, recv, &shared, since, remote).await
        }
        Message::Switchover { since } => {
            super::precopy::switchover(&mut resp, &shared, since, remote).await
        }
        other => {
            tracing::warn!(%remote, request = crate::codec::frame_name(&other), "unexpected request");
            let _ = recv.stop(CODE_MALFORMED);
            resp.error(
                ErrorCode::UnexpectedMessage,
                "expected Hello, GetManifest, Read, Precopy or Switchover".to_string(),
            )
            .await;
        }
    }
}

/// Since protocol 3 the source pushes its Welcome; a Hello comes only from
/// a destination of an older version, and is told so.
async fn hello(resp: &mut Responder, version: u16, remote: SocketAddr) {
    tracing::warn!(%remote, version, "destination speaks another protocol version");
    resp.error(
        ErrorCode::VersionMismatch,
        format!("source speaks protocol version {PROTOCOL_VERSION}, destination {version}"),
    )
    .await;
}

/// Stream priority of the manifest: below on-demand reads (the guest
/// waits for those), above the background copy (which needs the manifest).
const MANIFEST_PRIORITY: i32 = 50;

async fn send_manifest(
    resp: &mut Responder,
    shared: &Arc<Shared>,
    complete: bool,
    remote: SocketAddr,
) {
    let _ = resp.stream().set_priority(MANIFEST_PRIORITY);
    if let Some(why) = shared.source.changed() {
        resp.error(ErrorCode::SourceChanged, why).await;
        return;
    }
    let manifest = if complete {
        match complete_manifest(shared).await {
            Ok(m) => m,
            Err((code, message)) => {
                tracing::warn!(%remote, "cannot complete the manifest: {message}");
                resp.error(code, message).await;
                return;
            }
        }
    } else {
        shared.source.manifest().snapshot()
    };
    let bytes = manifest.encode();
    // Empty manifests (a zero-size disk) still get their one frame.
    let mut parts = bytes.chunks(MAX_MANIFEST_PART).peekable();
    if parts.peek().is_none() {
        let _ = resp.send(&Message::ManifestBytes(Vec::new())).await;
    }
    for part in parts {
        if let Err(e) = resp.send(&Message::ManifestBytes(part.to_vec())).await {
            tracing::debug!(%remote, "sending the manifest failed: {e}");
            return;
        }
    }
    resp.finish();
}

/// The manifest with every chunk hashed: the chunks not hashed yet are
/// read (runs of up to a background read, on the background pool, one at
/// a time with the background copy's reads) and hashed. Whole-disk work,
/// asked for by a destination about to verify its copy.
async fn complete_manifest(shared: &Arc<Shared>) -> Result<Manifest, (ErrorCode, String)> {
    let _one = shared.completing.lock().await;
    let m = shared.source.manifest().snapshot();
    let unhashed = m.unhashed();
    if unhashed > 0 {
        tracing::info!(
            unhashed,
            "hashing the chunks not read yet for a complete manifest"
        );
    }
    let geo = m.geometry();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (c, k) in m.chunks().iter().enumerate() {
        let c = c as u64;
        if *k != ChunkKind::Unhashed {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == c && *n < shared.chunks_per_read => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    for (first, count) in runs {
        let Ok(_disk) = shared.background_disk.clone().acquire_owned().await else {
            return Err((ErrorCode::ReadFailed, "server shutting down".into()));
        };
        let s = shared.clone();
        let job = move || -> Result<(), (ErrorCode, String)> {
            let mut buf = Vec::new();
            let token = s.source.manifest().token();
            s.source.read_chunks(first, count, &mut buf).map_err(|e| {
                (
                    ErrorCode::ReadFailed,
                    format!("reading chunks {first}+{count}: {e}"),
                )
            })?;
            if let Some(why) = s.source.changed() {
                return Err((ErrorCode::SourceChanged, why));
            }
            let mut at = 0usize;
            for c in first..first + count {
                let len = geo.chunk_len(c) as usize;
                let data = buf.get(at..at + len).ok_or_else(|| {
                    (
                        ErrorCode::ReadFailed,
                        format!("reading chunk {c}: short read"),
                    )
                })?;
                at += len;
                s.source
                    .manifest()
                    .learn_read(c, ChunkKind::of(data), token);
            }
            Ok(())
        };
        match shared.background.run(job).await {
            Some(r) => r?,
            None => return Err((ErrorCode::ReadFailed, "hashing task failed".into())),
        }
    }
    if let Some(why) = shared.source.changed() {
        return Err((ErrorCode::SourceChanged, why));
    }
    let m = shared.source.manifest().snapshot();
    if !m.is_complete() {
        return Err((
            ErrorCode::ReadFailed,
            format!("{} chunks still without a hash", m.unhashed()),
        ));
    }
    shared.source.completed();
    Ok(m)
}
