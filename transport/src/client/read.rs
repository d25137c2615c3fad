//! Read requests: a read split into requests of at most
//! [`MAX_READ_BYTES`], each sent on its own stream (hedged when the path
//! calls for it) and its answer checked chunk by chunk.

use ferry_core::Geometry;
use quinn::Connection;

use super::{protocol, read_fail, remote, unexpected, write_fail, Client, Fail, Fetched};
use crate::codec::{self, ReadFail, SMALL_FRAME};
use crate::error::TransportError;
use crate::wire::{self, Message, Priority, MAX_READ_BYTES};

impl Client {
    /// Fetches chunks `first..first + count`, in order: data (not yet
    /// checked against its hash: the caller checks) or a zero marker.
    /// Requests larger than [`MAX_READ_BYTES`] are split. On a lost
    /// connection it reconnects with exponential backoff (100 ms doubling
    /// to 5 s, forever) and re-issues the request: callers wait instead of
    /// failing. Returns `Err` only for protocol errors: the source changed
    /// ([`TransportError::SourceChanged`]), the source's `Error` frames
    /// ([`TransportError::Remote`], e.g. an out-of-range chunk), or
    /// malformed responses.
    pub async fn read_chunks(
        &self,
        first: u64,
        count: u32,
        priority: Priority,
    ) -> Result<Vec<Fetched>, TransportError> {
        let chunk_size = u64::from(self.inner.info.geometry.chunk_size);
        let per = (MAX_READ_BYTES / chunk_size).clamp(1, u64::from(u32::MAX)) as u32;
        let mut out = Vec::with_capacity(count as usize);
        let mut done = 0u32;
        while done < count {
            let n = per.min(count - done);
            let start = first
                .checked_add(u64::from(done))
                .ok_or(TransportError::Protocol {
                    op: "read",
                    reason: "chunk index overflows".into(),
                })?;
            let g = self.inner.info.geometry;
            let once = |priority| {
                self.inner.with_retry("read", move |conn| async move {
                    request(&conn, g, start, n, priority).await
                })
            };
            let copies = self.inner.copies(priority, u64::from(n) * chunk_size);
            let got = if copies > 1 {
                self.inner.hedged(start, copies, priority, &once).await
            } else {
                once(priority).await
            };
            out.extend(got?);
            done += n;
        }
        Ok(out)
    }
}

/// One Read on a new stream.
async fn request(
    conn: &Connection,
    g: Geometry,
    first: u64,
    count: u32,
    priority: Priority,
) -> Result<Vec<Fetched>, Fail> {
    const OP: &str = "read";
    let (mut send, mut recv) = conn.open_bi().await.map_err(Fail::Lost)?;
    let _ = send.set_priority(priority.stream_priority());
    let req = Message::Read {
        first_chunk: first,
        count,
        priority,
    };
    codec::write_msg(&mut send, &req)
        .await
        .map_err(|e| write_fail(OP, e))?;
    let _ = send.finish();
    let max = (g.chunk_size as usize + 128).min(wire::MAX_FRAME_LEN);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..u64::from(count) {
        let want = first + i;
        match codec::read_frame(&mut recv, max)
            .await
            .map_err(|e| read_fail(OP, e))?
        {
            Some(Message::Zero { index }) => {
                if index != want {
                    return Err(protocol(OP, format!("got chunk {index}, expected {want}")));
                }
                out.push(Fetched::Zero);
            }
            Some(m @ (Message::Chunk { .. } | Message::ZChunk { .. })) => {
                let raw_len = (want < g.chunks()).then(|| g.chunk_len(want));
                let codec::OpenedChunk { index, hash, data } =
                    codec::open_chunk(m, raw_len).map_err(|reason| protocol(OP, reason))?;
                if index != want {
                    return Err(protocol(OP, format!("got chunk {index}, expected {want}")));
                }
                if want >= g.chunks() || data.len() != g.chunk_len(want) as usize {
                    return Err(protocol(
                        OP,
                        format!(
                            "chunk {want} has {} bytes, expected {}",
                            data.len(),
                            g.chunk_len(want)
                        ),
                    ));
                }
                out.push(Fetched::Data { hash, bytes: data });
            }
            Some(Message::Error { code, message }) => return Err(remote(OP, code, message)),
            Some(m) => return Err(unexpected(OP, &m)),
            None => {
                return Err(protocol(
                    OP,
                    format!("response ended after {i} of {count} chunks"),
                ))
            }
        }
    }
    match codec::read_frame(&mut recv, SMALL_FRAME).await {
        Ok(None) => {}
        // All data is here; a connection lost just now does not matter.
        Err(ReadFail::Stream(quinn::ReadError::ConnectionLost(_))) => {}
        Ok(Some(Message::Error { code, message })) => return Err(remote(OP, code, message)),
        Ok(Some(m)) => return Err(unexpected(OP, &m)),
        Err(e) => return Err(read_fail(OP, e)),
    }
    Ok(out)
}
