//! The transmission phase: requests in, simple replies out, concurrently.
//!
//! One reader loop decodes requests off the socket and spawns one task per
//! request; every reply goes through an mpsc channel to a single writer loop
//! so replies never interleave. Requests in flight are bounded in number
//! ([`MAX_IN_FLIGHT`]) and in payload bytes ([`MAX_IN_FLIGHT_BYTES`]); a
//! request's permits are released only once its reply has been written, so
//! a slow client cannot make the server buffer unbounded read data.

use std::io;
use std::sync::Arc;

use ferry_device::BlockDevice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

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

/// A validated command ready to run on the device.
#[derive(Debug)]
enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
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

        match validate(&req, data, size, read_only) {
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
            Ok(cmd) => {
                let device = device.clone();
                let tx = tx.clone();
                let handle = req.handle;
                tasks.spawn(async move {
                    let result = execute(&*device, cmd).await;
                    // A closed channel means the connection is going away.
                    let _ = send(&tx, handle, result, permits).await;
                });
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

/// Checks a request against the export; the error is an NBD error number.
fn validate(req: &Request, data: Vec<u8>, size: u64, read_only: bool) -> Result<Command, u32> {
    if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
        return Err(EINVAL);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    let end = req.offset.checked_add(len);
    let in_range = end.is_some_and(|end| end <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err(EPERM);
    }
    if writes && !in_range {
        // The spec asks for ENOSPC on writes past the end.
        return Err(if end.is_none() { EINVAL } else { ENOSPC });
    }
    let offset = req.offset;
    match req.kind {
        CMD_READ if in_range => Ok(Command::Read {
            offset,
            len: req.len,
        }),
        CMD_READ => Err(EINVAL),
        CMD_WRITE => Ok(Command::Write { offset, data, fua }),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => Ok(Command::Trim { offset, len }),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes { offset, len, fua }),
        _ => Err(EINVAL),
    }
}

/// Runs a validated command; read data on success, an NBD error otherwise.
async fn execute<D: BlockDevice>(device: &D, cmd: Command) -> Result<Option<Vec<u8>>, u32> {
    let (what, offset, len) = match &cmd {
        Command::Read { offset, len } => ("READ", *offset, u64::from(*len)),
        Command::Write { offset, data, .. } => ("WRITE", *offset, data.len() as u64),
        Command::Flush => ("FLUSH", 0, 0),
        Command::Trim { offset, len } => ("TRIM", *offset, *len),
        Command::WriteZeroes { offset, len, .. } => ("WRITE_ZEROES", *offset, *len),
    };
    tracing::trace!(what, offset, len, "request");
    let fail = |e: io::Error| crate::errors::nbd_errno(&e, what, offset, len);
    match cmd {
        Command::Read { len: 0, .. } => Ok(Some(Vec::new())),
        Command::Read { offset, len } => {
            let data = device.read(offset, len).await.map_err(fail)?;
            if data.len() != len as usize {
                let e = io::Error::other(format!(
                    "device returned {} bytes for a read of {len}",
                    data.len()
                ));
                return Err(fail(e));
            }
            Ok(Some(data))
        }
        Command::Write { data, .. } if data.is_empty() => Ok(None),
        Command::Write { offset, data, fua } => {
            device.write(offset, data, fua).await.map_err(fail)?;
            Ok(None)
        }
        Command::Flush => device.flush().await.map(|()| None).map_err(fail),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => Ok(None),
        Command::Trim { offset, len } => {
            device.trim(offset, len).await.map(|()| None).map_err(fail)
        }
        Command::WriteZeroes { offset, len, fua } => device
            .write_zeroes(offset, len, fua)
            .await
            .map(|()| None)
            .map_err(fail),
    }
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
        let v = |r: Request, ro| validate(&r, Vec::new(), 8192, ro).map(|_| ());
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
