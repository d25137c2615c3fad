//! Pre-copy from a live source, the destination's side: a subscription to
//! the source's change rounds ([`ChangeFeed`]) and the switchover request
//! (docs/decisions/precopy-switchover.md).

use std::ops::Range;

use quinn::{RecvStream, SendStream};

use super::{protocol, read_fail, remote, unexpected, write_fail, Client, Fail};
use crate::codec::{self, ReadFail};
use crate::error::TransportError;
use crate::wire::{Message, HEADER_LEN, MAX_CHANGED_RUNS};

/// Largest `Changed` frame.
const MAX_CHANGED_FRAME: usize = 1 + 9 + 16 * MAX_CHANGED_RUNS + HEADER_LEN;

/// One generation of a live source's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The generation these bring the destination to.
    pub generation: u64,
    /// The source cannot tell what changed: every chunk may have.
    pub everything: bool,
    /// Runs of chunks written.
    pub chunks: Vec<Range<u64>>,
}

/// A subscription to a live source's change rounds ([`Client::precopy`]):
/// one [`Changes`] at once, then one per round with changes. Ends with an
/// error when the connection is lost; subscribe again from the last
/// generation applied.
#[derive(Debug)]
pub struct ChangeFeed {
    send: SendStream,
    recv: RecvStream,
}

/// Reads the `Changed` frames of one generation.
async fn read_changes(recv: &mut RecvStream, op: &'static str) -> Result<Changes, Fail> {
    let mut out = Changes {
        generation: 0,
        everything: false,
        chunks: Vec::new(),
    };
    let mut first = true;
    loop {
        match codec::read_frame(recv, MAX_CHANGED_FRAME)
            .await
            .map_err(|e| read_fail(op, e))?
        {
            Some(Message::Changed {
                generation,
                more,
                everything,
                ranges,
            }) => {
                if !first && generation != out.generation {
                    return Err(protocol(
                        op,
                        format!(
                            "generation {generation} in the middle of generation {}",
                            out.generation
                        ),
                    ));
                }
                first = false;
                out.generation = generation;
                out.everything |= everything;
                for (start, count) in ranges {
                    let end = start.checked_add(count).ok_or_else(|| {
                        protocol(op, format!("chunk run {start}+{count} overflows"))
                    })?;
                    out.chunks.push(start..end);
                }
                if !more {
                    return Ok(out);
                }
            }
            Some(Message::Error { code, message }) => return Err(remote(op, code, message)),
            Some(m) => return Err(unexpected(op, &m)),
            None => return Err(protocol(op, "the source ended the change stream".into())),
        }
    }
}

fn fatal(op: &'static str, f: Fail) -> TransportError {
    match f {
        Fail::Fatal(e) => e,
        Fail::Lost(e) => TransportError::Stream {
            op,
            reason: format!("connection lost: {e}"),
        },
        Fail::Retry(reason) => TransportError::Stream { op, reason },
    }
}

impl ChangeFeed {
    /// The next generation of changes (waits for the next round with any).
    pub async fn next(&mut self) -> Result<Changes, TransportError> {
        read_changes(&mut self.recv, "changes")
            .await
            .map_err(|f| fatal("changes", f))
    }

    /// Tells the source that `generation` is applied (durably).
    pub async fn applied(&mut self, generation: u64) -> Result<(), TransportError> {
        codec::write_msg(&mut self.send, &Message::Applied { generation })
            .await
            .map_err(|e| fatal("changes", write_fail("changes", e)))
    }
}

impl Client {
    /// Subscribes to the source's change rounds, starting from the chunks
    /// written after generation `since` (the last one applied here; 0 for
    /// none). Connects (or waits for a reconnect) first.
    pub async fn precopy(&self, since: u64) -> Result<ChangeFeed, TransportError> {
        const OP: &str = "precopy";
        self.inner
            .with_retry(OP, |conn| async move {
                let (mut send, recv) = conn.open_bi().await.map_err(Fail::Lost)?;
                codec::write_msg(&mut send, &Message::Precopy { since })
                    .await
                    .map_err(|e| write_fail(OP, e))?;
                Ok(ChangeFeed { send, recv })
            })
            .await
    }

    /// Asks the source to switch over: it freezes the disk its VM writes
    /// and answers with every chunk written after generation `since` (the
    /// last one applied here) as a last generation. Re-issued across
    /// reconnects (the source answers it again).
    pub async fn switchover(&self, since: u64) -> Result<Changes, TransportError> {
        const OP: &str = "switchover";
        self.inner
            .with_retry(OP, |conn| async move {
                let (mut send, mut recv) = conn.open_bi().await.map_err(Fail::Lost)?;
                codec::write_msg(&mut send, &Message::Switchover { since })
                    .await
                    .map_err(|e| write_fail(OP, e))?;
                let _ = send.finish();
                let changes = read_changes(&mut recv, OP).await?;
                // The stream ends after the last frame.
                match codec::read_frame(&mut recv, 16).await {
                    Ok(None) | Err(ReadFail::Stream(_)) => {}
                    Ok(Some(m)) => return Err(unexpected(OP, &m)),
                    Err(e) => return Err(read_fail(OP, e)),
                }
                Ok(changes)
            })
            .await
    }
}
