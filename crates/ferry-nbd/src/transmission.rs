//! The transmission phase: requests in, simple replies out, concurrently.
//!
//! One reader loop decodes requests off the socket into the shared request
//! model ([`ferry_device::Request`]), validates them against the export,
//! answers a READ of present blocks at once on the connection task
//! ([`ferry_device::read_now`]) and spawns one task per other request
//! ([`ferry_device::execute`]); every reply goes through an mpsc channel to a single writer loop
//! so replies never interleave. Requests in flight are bounded in number
//! ([`MAX_IN_FLIGHT`]) and in payload bytes ([`MAX_IN_FLIGHT_BYTES`]); a
//! request's permits are released only once its reply has been written, so
//! a slow client cannot make the server buffer unbounded read data.

use std::io;
use std::sync::Arc;

use ferry_device::{self as device, BlockDevice, Limits};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::errors::{nbd_errno, nbd_error};
use crate::proto::*;
use crate::NbdError;

/// Maximum number of requests of one connection being processed at once.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Maximum READ/WRITE payload bytes of one connection held at once.
pub(crate) const MAX_IN_FLIGHT_BYTES: u32 = 128 * 1024 * 1024;

/// The permits a request holds until its reply is on the wire.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A simple reply waiting for the writer.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _permits: Permits,
}

/// Serves requests until the client disconnects (DISC or EOF) or breaks the
/// protocol. In-flight requests finish before this returns, except when the
/// reply stream itself fails.
pub(crate) async fn run<D, R, W>(
    reader: R,
    writer: W,
    device: Arc<D>,
    size: u64,
    read_only: bool,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let writer = write_loop(writer, rx);
    let reader = read_loop(reader, tx, device, size, read_only);
    tokio::pin!(writer, reader);
    tokio::select! {
        res = &mut reader => {
            // The reader dropped its sender and waited for every request
            // task, so the writer ends once the queued replies are written.
            let written = writer.await;
            res.and(written)
        }
        res = &mut writer => match res {
            // All senders are gone: the reader is just finishing up.
            Ok(()) => reader.await,
            // A failed write: drop the reader (aborting its tasks).
            Err(e) => Err(e),
        }
    }
}

async fn write_loop<W>(writer: W, mut rx: mpsc::Receiver<Reply>) -> Result<(), NbdError>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever is already queued into one flush.
        while let Some(reply) = next {
            w.write_all(&simple_reply_header(reply.error, reply.handle))
                .await?;
            if let Some(data) = &reply.data {
                w.write_all(data).await?;
            }
            drop(reply);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await.or_else(ignore_not_connected)?;
    Ok(())
}

fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::NotConnected | io::ErrorKind::BrokenPipe => Ok(()),
        _ => Err(e),
    }
}

async fn read_loop<D, R>(
    reader: R,
    tx: mpsc::Sender<Reply>,
    device: Arc<D>,
    size: u64,
    read_only: bool,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
{
    let limits = Limits {
        size,
        read_only,
        max_payload: MAX_PAYLOAD,
    };
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize));
    let mut tasks = JoinSet::new();

    let result = loop {
        // Reap finished request tasks; a panic means a reply went missing.
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = joined {
                break_on_panic(e)?;
            }
        }
        let count_permit = count.clone().acquire_owned().await.expect("never closed");

        let mut header = [0u8; REQUEST_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                debug!("client closed the connection without NBD_CMD_DISC");
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let req = Request::decode(&header);
        if req.magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!(
                "bad request magic {:#010x}",
                req.magic
            )));
        }
        if req.kind == CMD_DISC {
            debug!("NBD_CMD_DISC");
            break Ok(());
        }

        let payload = matches!(req.kind, CMD_READ | CMD_WRITE);
        if payload && req.len > MAX_PAYLOAD {
            if req.kind == CMD_WRITE {
                // The payload cannot be skipped cheaply and safely: hang up.
                break Err(NbdError::Protocol(format!(
                    "WRITE of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                    req.len
                )));
            }
            warn!(len = req.len, "READ exceeds the maximum block size");
            let permits = Permits {
                _count: count_permit,
                _bytes: None,
            };
            send(&tx, req.handle, Err(EINVAL), permits).await?;
            continue;
        }
        let bytes_permit = if payload && req.len > 0 {
            Some(
                bytes
                    .clone()
                    .acquire_many_owned(req.len)
                    .await
                    .expect("never closed"),
            )
        } else {
            None
        };
        let permits = Permits {
            _count: count_permit,
            _bytes: bytes_permit,
        };

        let mut data = Vec::new();
        if req.kind == CMD_WRITE {
            data = vec![0u8; req.len as usize];
            reader.read_exact(&mut data).await?;
        }

        match decode(&req, &limits) {
            Err(error) => {
                debug!(
                    command = command_name(req.kind),
                    offset = req.offset,
                    len = req.len,
                    error,
                    "request refused"
                );
                send(&tx, req.handle, Err(error), permits).await?;
            }
            Ok(device::Request::Read { offset, len }) => {
                // The fast path: present blocks are read here, with no
                // task or thread hop.
                let mut buf = vec![0u8; len as usize];
                if let Some(done) = device::read_now(&*device, offset, &mut buf) {
                    let result = done
                        .map(|()| Some(buf))
                        .map_err(|e| nbd_errno(&e, "READ", offset, u64::from(len)));
                    send(&tx, req.handle, result, permits).await?;
                    continue;
                }
                spawn_request(
                    &mut tasks,
                    &device,
                    &tx,
                    req.handle,
                    device::Request::Read { offset, len },
                    Vec::new(),
                    permits,
                );
            }
            Ok(request) => {
                spawn_request(&mut tasks, &device, &tx, req.handle, request, data, permits);
            }
        }
    };

    // Finish what is in flight (DISC semantics; also on EOF and protocol
    // errors, so no device operation is cut off half-way).
    drop(tx);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            break_on_panic(e)?;
        }
    }
    result
}

fn break_on_panic(e: tokio::task::JoinError) -> Result<(), NbdError> {
    Err(NbdError::Protocol(format!(
        "request task failed, a reply is lost: {e}"
    )))
}

async fn send(
    tx: &mpsc::Sender<Reply>,
    handle: u64,
    result: Result<Option<Vec<u8>>, u32>,
    permits: Permits,
) -> Result<(), NbdError> {
    let (error, data) = match result {
        Ok(data) => (0, data),
        Err(error) => (error, None),
    };
    tx.send(Reply {
        handle,
        error,
        data,
        _permits: permits,
    })
    .await
    .map_err(|_| NbdError::Protocol("reply writer is gone".into()))
}

/// Runs `request` (with the WRITE payload `data`) on a task of its own,
/// which queues the reply.
fn spawn_request<D: BlockDevice>(
    tasks: &mut JoinSet<()>,
    device: &Arc<D>,
    tx: &mpsc::Sender<Reply>,
    handle: u64,
    request: device::Request,
    data: Vec<u8>,
    permits: Permits,
) {
    let device = device.clone();
    let tx = tx.clone();
    // In the connection's span (and so the pull's): the request's log
    // lines name the disk and the client.
    tasks.spawn(tracing::Instrument::in_current_span(async move {
        let (offset, len) = request.range();
        tracing::trace!(what = request.name(), offset, len, "request");
        let result = match device::execute(&*device, request, data).await {
            Ok(data) => Ok(matches!(request, device::Request::Read { .. }).then_some(data)),
            Err(e) => Err(nbd_errno(&e, request.name(), offset, len)),
        };
        // A closed channel means the connection is going away.
        let _ = send(&tx, handle, result, permits).await;
    }));
}

/// Decodes a request header into the shared request model and checks it
/// against the export; the error is an NBD error number. Unknown commands
/// and flags are `EINVAL`.
fn decode(req: &Request, limits: &Limits) -> Result<device::Request, u32> {
    if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
        return Err(EINVAL);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    let request = match req.kind {
        CMD_READ => device::Request::Read { offset, len },
        CMD_WRITE => device::Request::Write { offset, len, fua },
        CMD_FLUSH => device::Request::Flush,
        CMD_TRIM => device::Request::Trim {
            offset,
            len: u64::from(len),
        },
        CMD_WRITE_ZEROES => device::Request::WriteZeroes {
            offset,
            len: u64::from(len),
            fua,
        },
        _ => return Err(EINVAL),
    };
    request
        .validate(limits)
        .map_err(|e| nbd_error(device::errno(&e.into())))?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation() {
        let v = |r: Request, read_only| {
            let limits = Limits {
                size: 8192,
                read_only,
                max_payload: MAX_PAYLOAD,
            };
            decode(&r, &limits).map(|_| ())
        };
        assert_eq!(v(req(CMD_READ, 0, 4096, 4096), false), Ok(()));
        assert_eq!(v(req(CMD_READ, 0, 4097, 4096), false), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, 0, u64::MAX, 1), false), Err(EINVAL));
        assert_eq!(v(req(CMD_WRITE, 0, 8192, 1), false), Err(ENOSPC));
        assert_eq!(v(req(CMD_WRITE, 0, u64::MAX, 2), false), Err(EINVAL));
        assert_eq!(v(req(CMD_TRIM, 0, 0, 8193), false), Err(ENOSPC));
        assert_eq!(v(req(CMD_WRITE, 0, 0, 1), true), Err(EPERM));
        assert_eq!(v(req(CMD_WRITE_ZEROES, 0, 0, 1), true), Err(EPERM));
        assert_eq!(v(req(CMD_READ, 0, 0, 1), true), Ok(()));
        assert_eq!(v(req(CMD_FLUSH, 0, 0, 0), true), Ok(()));
        assert_eq!(v(req(42, 0, 0, 0), false), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, 1 << 4, 0, 1), false), Err(EINVAL));
        assert_eq!(
            v(
                req(CMD_WRITE_ZEROES, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, 0, 1),
                false
            ),
            Ok(())
        );
    }
}
