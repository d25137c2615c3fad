//! Read scheduling: a Read checked, cut into pieces (one chunk each for
//! on-demand reads, runs of up to a background read's size otherwise),
//! each piece read and encoded on a blocking thread under its priority's
//! bounds while the one before it is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_core::{ChunkKind, Geometry, SharedManifest};

use super::dispatch::Responder;
use super::Shared;
use crate::codec;
use crate::wire::{ErrorCode, Message, Priority, MAX_READ_BYTES};

/// Checks a Read against the disk's geometry; the error to send back
/// otherwise.
fn check_read(g: Geometry, first: u64, count: u32) -> Result<u64, (ErrorCode, String)> {
    let n = g.chunks();
    let end = match first.checked_add(u64::from(count)) {
        Some(end) if end <= n => end,
        _ => {
            return Err((
                ErrorCode::OutOfRange,
                format!("chunks {first}+{count} go past the end of the disk ({n} chunks)"),
            ))
        }
    };
    if u64::from(count) * u64::from(g.chunk_size) > MAX_READ_BYTES.max(u64::from(g.chunk_size)) {
        return Err((
            ErrorCode::TooLarge,
            format!("a read may cover at most {MAX_READ_BYTES} bytes, {count} chunks asked"),
        ));
    }
    Ok(end)
}

/// The pieces a Read is answered in, as `(first, count)`: every chunk on
/// its own for on-demand reads (the first chunk's frame leaves as soon as
/// it is read); for background reads, runs of consecutive data chunks of
/// up to `chunks_per_read` chunks, each read from the disk in one go, and
/// zero chunks on their own (they are never read).
fn pieces(
    manifest: &SharedManifest,
    first: u64,
    end: u64,
    priority: Priority,
    chunks_per_read: u64,
) -> Vec<(u64, u64)> {
    let per_run = match priority {
        Priority::Background => chunks_per_read.max(1),
        Priority::OnDemand | Priority::Hedge => 1,
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut run_open = false;
    for c in first..end {
        match manifest.chunk(c) {
            ChunkKind::Zero => {
                out.push((c, 1));
                run_open = false;
            }
            ChunkKind::Data(_) | ChunkKind::Unhashed => match out.last_mut() {
                Some((_, n)) if run_open && *n < per_run => *n += 1,
                _ => {
                    out.push((c, 1));
                    run_open = true;
                }
            },
        }
    }
    out
}

/// The frames of one piece, in chunk order, as its task encodes them; an
/// `Err` ends the piece.
type PieceFrames = tokio::sync::mpsc::Receiver<Result<Vec<u8>, (ErrorCode, String)>>;

/// Starts reading the piece `(first, count)` (see [`pieces`]) and
/// returns its frames as they are encoded: the piece is read with one
/// read and then compressed chunk by chunk, each frame handed over as soon
/// as it is ready, so the first one is sent while the others are still
/// compressed. Read and compression run in one blocking task (on the
/// low-priority pool for background chunks, see `crate::background`): a
/// chunk waits for the blocking pool once, not once to read and again to
/// compress (each hop waits for a thread on a busy host). Measured on the
/// emulated WAN, the on-demand answer's time at the source went from a
/// p50/p99 of 1.3/16 ms to 1.1/14 ms, within this host's noise; kept as
/// the simpler code, which can only remove waits. The permit of
/// `priority`'s pool is held for the whole task, so it also bounds how
/// many chunks are compressed at once; a background task holds a
/// `background_disk` permit only while it reads.
fn start_piece(
    shared: &Arc<Shared>,
    (first, count): (u64, u64),
    priority: Priority,
) -> PieceFrames {
    let (tx, rx) = tokio::sync::mpsc::channel(count.max(1) as usize);
    // Zero chunks are answered without reading or sending any bytes.
    if count == 1 {
        if let ChunkKind::Zero = shared.source.manifest().chunk(first) {
            let _ = tx.try_send(Ok(Message::Zero { index: first }.encode()));
            return rx;
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let pool = match priority {
            Priority::OnDemand | Priority::Hedge => &shared.urgent_reads,
            Priority::Background => &shared.reads,
        };
        let permits = async {
            let permit = pool.clone().acquire_owned().await.ok()?;
            let disk = match priority {
                Priority::Background => {
                    Some(shared.background_disk.clone().acquire_owned().await.ok()?)
                }
                Priority::OnDemand | Priority::Hedge => None,
            };
            Some((permit, disk))
        };
        let Some((permit, disk)) = permits.await else {
            let _ = tx
                .send(Err((
                    ErrorCode::ReadFailed,
                    "server shutting down".to_string(),
                )))
                .await;
            return;
        };
        // The request's stream went away while this piece waited for its
        // permit: nothing to read for.
        if tx.is_closed() {
            return;
        }
        let s = shared.clone();
        let out = tx.clone();
        let job = move || {
            let _permit = permit;
            if out.is_closed() {
                return;
            }
            // Frames sent into `out`; the channel holds the whole piece, so
            // this never blocks, and a receiver gone (the request's stream
            // failed) only ends the piece early.
            let send = |f: Result<Vec<u8>, (ErrorCode, String)>| out.try_send(f).is_ok();
            let manifest = s.source.manifest();
            let geo = manifest.geometry();
            let what = || {
                if count == 1 {
                    format!("chunk {first}")
                } else {
                    format!("chunks {first}+{count}")
                }
            };
            let expected: usize = (first..first + count)
                .map(|c| geo.chunk_len(c) as usize)
                .sum();
            let mut buf = Vec::with_capacity(expected);
            // A live source's VM may write while we read: what the
            // manifest says holds for these bytes only if no write ran.
            let token = manifest.token();
            let read = s.source.read_chunks(first, count, &mut buf);
            drop(disk);
            if let Err(e) = read {
                send(Err((
                    ErrorCode::ReadFailed,
                    format!("reading {}: {e}", what()),
                )));
                return;
            }
            // Data read after the disk was changed behind our back is
            // never sent (the change is noticed right after the read).
            if let Some(why) = s.source.changed() {
                send(Err((ErrorCode::SourceChanged, why)));
                return;
            }
            if buf.len() != expected {
                send(Err((
                    ErrorCode::ReadFailed,
                    format!(
                        "reading {}: got {} bytes, expected {expected}",
                        what(),
                        buf.len()
                    ),
                )));
                return;
            }
            let mut at = 0usize;
            for index in first..first + count {
                let len = geo.chunk_len(index) as usize;
                let data = &mut buf[at..at + len];
                at += len;
                // An unhashed chunk is hashed now, as it is sent, and the
                // manifest learns it; one that holds only zeros is answered
                // as zero (and so is a chunk learned to be zero meanwhile).
                let known = match manifest.chunk(index) {
                    ChunkKind::Data(_) | ChunkKind::Zero if !manifest.steady_since(token) => {
                        ChunkKind::Unhashed
                    }
                    k => k,
                };
                let hash = match known {
                    ChunkKind::Data(hash) => hash,
                    ChunkKind::Unhashed => {
                        let kind = ChunkKind::of(data);
                        manifest.learn_read(index, kind, token);
                        match kind {
                            ChunkKind::Data(hash) => hash,
                            _ => {
                                if !send(Ok(Message::Zero { index }.encode())) {
                                    return;
                                }
                                continue;
                            }
                        }
                    }
                    ChunkKind::Zero => {
                        if !send(Ok(Message::Zero { index }.encode())) {
                            return;
                        }
                        continue;
                    }
                };
                let corrupt = s
                    .corrupt_once
                    .lock()
                    .map(|mut set| set.remove(&index))
                    .unwrap_or(false);
                if corrupt && !data.is_empty() {
                    tracing::warn!(
                        index,
                        "test hook: corrupting this transmission of the chunk"
                    );
                    let mid = data.len() / 2;
                    data[mid] ^= 0x5a;
                }
                if !send(Ok(codec::chunk_frame(index, hash, data, s.compress))) {
                    return;
                }
            }
        };
        let ran = match priority {
            Priority::OnDemand | Priority::Hedge => tokio::task::spawn_blocking(job).await.is_ok(),
            Priority::Background => shared.background.run(job).await.is_some(),
        };
        if !ran {
            let _ = tx
                .send(Err((
                    ErrorCode::ReadFailed,
                    format!("reading chunk {first}: read task failed"),
                )))
                .await;
        }
    });
    rx
}

/// Answers a Read; returns how long the first chunk took to read and
/// encode, in ms (for the on-demand log line).
pub(super) async fn read(
    resp: &mut Responder,
    shared: &Arc<Shared>,
    first: u64,
    count: u32,
    priority: Priority,
    remote: SocketAddr,
) -> f64 {
    let _ = resp.stream().set_priority(priority.stream_priority());
    if let Some(why) = shared.source.changed() {
        tracing::debug!(%remote, "refused read: {why}");
        resp.error(ErrorCode::SourceChanged, why).await;
        return 0.0;
    }
    let end = match check_read(shared.source.manifest().geometry(), first, count) {
        Ok(end) => end,
        Err((code, message)) => {
            tracing::debug!(%remote, "refused read: {message}");
            resp.error(code, message).await;
            return 0.0;
        }
    };
    if first == end {
        resp.finish();
        return 0.0;
    }
    // Read piece k+1 while piece k is being sent.
    let pieces = pieces(
        shared.source.manifest(),
        first,
        end,
        priority,
        shared.chunks_per_read,
    );
    let t0 = std::time::Instant::now();
    let mut current = start_piece(shared, pieces[0], priority);
    let mut read_ms = None;
    for k in 0..pieces.len() {
        let next = pieces.get(k + 1).map(|&p| start_piece(shared, p, priority));
        for i in 0..pieces[k].1 {
            let frame = match current.recv().await {
                Some(Ok(f)) => f,
                Some(Err((code, message))) => {
                    tracing::warn!(%remote, "{message}");
                    resp.error(code, message).await;
                    return read_ms.unwrap_or(0.0);
                }
                None => {
                    let message =
                        format!("reading chunk {}: read task ended early", pieces[k].0 + i);
                    tracing::warn!(%remote, "{message}");
                    resp.error(ErrorCode::ReadFailed, message).await;
                    return read_ms.unwrap_or(0.0);
                }
            };
            read_ms.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
            // Handed over whole: quinn keeps the buffer instead of copying
            // it into its own. One copy of every byte sent fewer; on the
            // emulated WAN no change in CPU per GiB stood out of the noise.
            if let Err(e) = resp.stream().write_chunk(bytes::Bytes::from(frame)).await {
                tracing::debug!(%remote, "response stream failed: {e}");
                return read_ms.unwrap_or(0.0);
            }
        }
        if let Some(n) = next {
            current = n;
        }
    }
    resp.finish();
    read_ms.unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::Manifest;

    #[test]
    fn read_checks() {
        let g = Geometry::new(4 * 65536, 65536);
        assert_eq!(check_read(g, 2, 2), Ok(4));
        assert_eq!(check_read(g, 0, 0), Ok(0));
        assert_eq!(check_read(g, 0, 2), Ok(2));
        assert_eq!(check_read(g, 3, 2).unwrap_err().0, ErrorCode::OutOfRange);
        assert_eq!(
            check_read(g, u64::MAX, 2).unwrap_err().0,
            ErrorCode::OutOfRange
        );
        let big = Geometry::new(1 << 30, 65536);
        assert!(check_read(big, 0, 256).is_ok());
        assert_eq!(check_read(big, 0, 257).unwrap_err().0, ErrorCode::TooLarge);
    }

    #[test]
    fn unhashed_chunks_are_read_in_runs_like_data() {
        let g = Geometry::new(5 * 65536, 65536);
        let m = SharedManifest::new(Manifest::new(
            g,
            vec![
                ChunkKind::Data([1; 32]),
                ChunkKind::Unhashed,
                ChunkKind::Zero,
                ChunkKind::Unhashed,
                ChunkKind::Unhashed,
            ],
        ));
        assert_eq!(
            pieces(&m, 0, 5, Priority::Background, 16),
            vec![(0, 2), (2, 1), (3, 2)]
        );
        assert_eq!(
            pieces(&m, 0, 2, Priority::OnDemand, 16),
            vec![(0, 1), (1, 1)]
        );
    }
}
