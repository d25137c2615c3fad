//! Pre-copy from a live source: change rounds pushed to a subscribed
//! destination, and the switchover that freezes the presented disk and
//! sends the final list (docs/decisions/precopy-switchover.md).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use quinn::RecvStream;

use super::dispatch::Responder;
use super::Shared;
use crate::codec::{self, ReadFail};
use crate::wire::{ErrorCode, Message, MAX_CHANGED_RUNS};

/// How often a round ends while a destination pre-copies: the changes
/// written since the last one are published and sent.
pub const ROUND: Duration = Duration::from_secs(1);

/// Stream priority of change lists: above every chunk (a destination
/// must learn what went stale before it copies more of it).
const CHANGES_PRIORITY: i32 = 150;

/// Largest frame a destination sends on its change stream (`Applied`).
const MAX_ACK_FRAME: usize = 64;

/// What changed after a generation: the generation published now and the
/// runs of chunks written after it (`None`: the source cannot tell).
type Since = (u64, Option<Vec<Range<u64>>>);

fn since(shared: &Shared, applied: u64, end_round: Option<bool>) -> Since {
    match shared.source.changes() {
        Some(live) => {
            if let Some(force) = end_round {
                live.end_round(force);
            }
            live.since(applied)
        }
        // Nothing writes a source that is not live: no changes, ever.
        None => (0, (applied == 0).then(Vec::new)),
    }
}

/// Sends the `Changed` frames of one generation.
async fn send_changed(
    resp: &mut Responder,
    (generation, runs): Since,
) -> Result<(), quinn::WriteError> {
    let Some(runs) = runs else {
        return resp
            .send(&Message::Changed {
                generation,
                more: false,
                everything: true,
                ranges: Vec::new(),
            })
            .await;
    };
    let ranges: Vec<(u64, u64)> = runs.iter().map(|r| (r.start, r.end - r.start)).collect();
    let mut parts = ranges.chunks(MAX_CHANGED_RUNS).peekable();
    if parts.peek().is_none() {
        return resp
            .send(&Message::Changed {
                generation,
                more: false,
                everything: false,
                ranges: Vec::new(),
            })
            .await;
    }
    while let Some(part) = parts.next() {
        resp.send(&Message::Changed {
            generation,
            more: parts.peek().is_some(),
            everything: false,
            ranges: part.to_vec(),
        })
        .await?;
    }
    Ok(())
}

/// Serves a `Precopy { since }` subscription until the destination ends
/// it: the changes after `since` at once, then those of every round that
/// has any.
pub(super) async fn subscribe(
    resp: &mut Responder,
    recv: RecvStream,
    shared: &Arc<Shared>,
    applied: u64,
    remote: SocketAddr,
) {
    let _ = resp.stream().set_priority(CHANGES_PRIORITY);
    tracing::info!(%remote, since = applied, "destination pre-copies: sending change rounds");
    let mut acks = read_acks(recv, remote);
    let mut sent: Option<u64> = None;
    let mut from = applied;
    loop {
        if let Some(why) = shared.source.changed() {
            resp.error(ErrorCode::SourceChanged, why).await;
            return;
        }
        let now = since(shared, from, Some(false));
        if sent.is_none() || now.0 > from || now.1.is_none() {
            let (generation, chunks) = (
                now.0,
                now.1
                    .as_ref()
                    .map_or(u64::MAX, |r| r.iter().map(|r| r.end - r.start).sum::<u64>()),
            );
            if let Err(e) = send_changed(resp, now).await {
                tracing::debug!(%remote, "change stream ended: {e}");
                return;
            }
            tracing::debug!(%remote, generation, chunks, "changes sent");
            sent = Some(generation);
            from = generation;
        }
        // The next round a whole ROUND later, whatever acknowledgements
        // come in meanwhile.
        let next = tokio::time::Instant::now() + ROUND;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                ack = acks.recv() => match ack {
                    Some(Ok(generation)) => {
                        tracing::debug!(%remote, generation, "destination applied the changes");
                    }
                    Some(Err((code, message))) => {
                        tracing::warn!(%remote, "{message}");
                        resp.error(code, message).await;
                        return;
                    }
                    None => {
                        resp.finish();
                        return;
                    }
                },
            }
        }
    }
}

/// Reads the destination's `Applied` frames in a task of their own (a
/// frame read must not be cut off by a round's timer): each generation,
/// or why the stream is unusable; the channel closes when it ends.
fn read_acks(
    mut recv: RecvStream,
    remote: SocketAddr,
) -> tokio::sync::mpsc::Receiver<Result<u64, (ErrorCode, String)>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let item = match codec::read_frame(&mut recv, MAX_ACK_FRAME).await {
                Ok(Some(Message::Applied { generation })) => Ok(generation),
                Ok(Some(other)) => Err((
                    ErrorCode::UnexpectedMessage,
                    format!(
                        "unexpected {} frame on the change stream: expected Applied",
                        codec::frame_name(&other)
                    ),
                )),
                Ok(None) => return,
                Err(ReadFail::Wire(e)) => {
                    Err((ErrorCode::Malformed, format!("malformed frame: {e}")))
                }
                Err(ReadFail::Stream(e)) => {
                    tracing::debug!(%remote, "change stream ended: {e}");
                    return;
                }
            };
            let bad = item.is_err();
            if tx.send(item).await.is_err() || bad {
                return;
            }
        }
    });
    rx
}

/// Serves a `Switchover { since }`: freezes the presented disk (writes in
/// progress end, later ones are held), publishes a last generation and
/// sends every change after `since`.
pub(super) async fn switchover(
    resp: &mut Responder,
    shared: &Arc<Shared>,
    applied: u64,
    remote: SocketAddr,
) {
    let _ = resp.stream().set_priority(CHANGES_PRIORITY);
    let t0 = std::time::Instant::now();
    if let Some(live) = shared.source.changes() {
        if let Err(why) = live.freeze().await {
            tracing::warn!(%remote, "switchover refused: {why}");
            resp.error(ErrorCode::ReadFailed, format!("switchover refused: {why}"))
                .await;
            return;
        }
    }
    if let Some(why) = shared.source.changed() {
        resp.error(ErrorCode::SourceChanged, why).await;
        return;
    }
    let last = since(shared, applied, Some(true));
    let chunks = last
        .1
        .as_ref()
        .map(|r| r.iter().map(|r| r.end - r.start).sum::<u64>());
    tracing::info!(
        %remote,
        since = applied,
        generation = last.0,
        changed_chunks = chunks,
        freeze_ms = t0.elapsed().as_secs_f64() * 1e3,
        "switchover: the live disk is frozen; sending the final changes"
    );
    if let Err(e) = send_changed(resp, last).await {
        tracing::warn!(%remote, "sending the final changes failed: {e}");
        return;
    }
    resp.finish();
}
