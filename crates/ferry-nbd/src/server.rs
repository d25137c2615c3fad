//! The accept loop and the life of one connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferry_device::BlockDevice;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::handshake::{self, ExportInfo, Outcome};
use crate::listener::{Conn, NbdListener};
use crate::tls::NbdTls;
use crate::{transmission, NbdError};

/// How long a client may take to negotiate before it is disconnected, so
/// idle connections cannot pile up (qemu negotiates in milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients served at once. A connection beyond it is closed at once, before
/// the greeting, so connections left open cannot exhaust the process's
/// file descriptors (which the disk, the source's connection and the
/// control socket need too). A hypervisor opens one, or a few with
/// multi-connection.
pub const MAX_CLIENTS: usize = 64;

/// What the server exports.
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// Name of the export. Clients may also ask for the default (empty)
    /// name; any other name is refused.
    pub export_name: String,
    /// Refuse writes (WRITE, TRIM, WRITE_ZEROES get `EPERM`) and advertise
    /// the export as read-only.
    pub read_only: bool,
    /// Require TLS (`NBD_OPT_STARTTLS`, client certificates) of every
    /// client. `None`: plain NBD.
    pub tls: Option<NbdTls>,
}

/// Accepts connections on `listener` until `shutdown` resolves, serving
/// each concurrently on `device`, at most [`MAX_CLIENTS`] at once.
///
/// A connection that breaks the protocol is logged and closed; the server
/// goes on serving the others. When `shutdown` resolves the server stops
/// accepting, drops every open connection (in-flight requests are
/// cancelled), and removes the unix socket file if it made one.
pub async fn serve<D: BlockDevice>(
    listener: NbdListener,
    device: Arc<D>,
    config: NbdServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NbdError> {
    let (clients, _) = tokio::sync::watch::channel(0);
    serve_counted(listener, device, config, shutdown, clients).await
}

/// [`serve`], publishing on `clients` how many clients are connected (a
/// connection counts from its accept until it ends).
pub async fn serve_counted<D: BlockDevice>(
    listener: NbdListener,
    device: Arc<D>,
    config: NbdServerConfig,
    shutdown: impl Future<Output = ()>,
    clients: tokio::sync::watch::Sender<usize>,
) -> Result<(), NbdError> {
    let export = Arc::new(ExportInfo {
        name: config.export_name,
        size: device.size(),
        block_size: device.block_size(),
        read_only: config.read_only,
    });
    let tls = config.tls.map(Arc::new);
    info!(
        listen = %listener.uri(tls.is_some()),
        tls = tls.as_ref().map_or("none (plain NBD)", |t| t.origin()),
        export = %export.name,
        size = export.size,
        read_only = export.read_only,
        "NBD server listening"
    );
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    // Whether connections are being turned away (logged once per episode).
    let mut refusing = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) if conns.len() >= MAX_CLIENTS => {
                    drop(conn);
                    if !refusing {
                        refusing = true;
                        warn!(peer = %peer, open = conns.len(), "too many NBD clients at once; closing new connections until one ends");
                    }
                }
                Ok((conn, peer)) => {
                    refusing = false;
                    let device = device.clone();
                    let export = export.clone();
                    let tls = tls.clone();
                    let span = tracing::info_span!("nbd", peer = %peer);
                    conns.spawn(connection(conn, device, export, tls).instrument(span));
                    clients.send_replace(conns.len());
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accepting an NBD connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {
                clients.send_replace(conns.len());
            }
        }
    }
    info!(open = conns.len(), "NBD server shutting down");
    conns.shutdown().await;
    clients.send_replace(0);
    if let NbdListener::Unix(_, path) = &listener {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), error = %e, "cannot remove the NBD socket");
        }
    }
    Ok(())
}

/// Serves one already-connected client on `stream`: negotiation, then
/// transmission until the client disconnects (DISC or end of stream) or
/// breaks the protocol (an [`NbdError`]). With `config.tls`, over TLS after
/// `NBD_OPT_STARTTLS`.
///
/// This is what [`serve`] runs for each accepted connection; it takes any
/// byte stream, so a caller can serve a socket it accepted itself, and the
/// fuzz targets (`fuzz/`) can drive the parsers over an in-memory pipe.
pub async fn serve_connection<D, S>(
    stream: S,
    device: Arc<D>,
    config: &NbdServerConfig,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let export = ExportInfo {
        name: config.export_name.clone(),
        size: device.size(),
        block_size: device.block_size(),
        read_only: config.read_only,
    };
    run_connection(stream, device, &export, config.tls.as_ref()).await
}

async fn connection<D: BlockDevice>(
    conn: Conn,
    device: Arc<D>,
    export: Arc<ExportInfo>,
    tls: Option<Arc<NbdTls>>,
) {
    debug!("connected");
    let tls = tls.as_deref();
    let result = match conn {
        Conn::Tcp(s) => run_connection(s, device, &export, tls).await,
        Conn::Unix(s) => run_connection(s, device, &export, tls).await,
    };
    match result {
        Ok(()) => debug!("disconnected"),
        Err(e) => warn!(error = %e, "NBD connection closed on error"),
    }
}

async fn run_connection<D, S>(
    stream: S,
    device: Arc<D>,
    export: &ExportInfo,
    tls: Option<&NbdTls>,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (negotiated, stream) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(stream, export, tls))
            .await
            .map_err(|_| {
                NbdError::Protocol(format!(
                    "negotiation not finished after {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            })??;
    match negotiated {
        Outcome::Aborted => return Ok(()),
        Outcome::Transmission => {}
    }
    debug!(tls = tls.is_some(), "transmission phase");
    let (reader, writer) = tokio::io::split(stream);
    transmission::run(reader, writer, device, export.size, export.read_only).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_device::MemDevice;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serve_connection_negotiates_and_serves_one_stream() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let device = Arc::new(MemDevice::new(8192));
        let config = NbdServerConfig {
            export_name: "disk".into(),
            read_only: false,
            tls: None,
        };
        let served = tokio::spawn({
            let device = device.clone();
            async move { serve_connection(server, device, &config).await }
        });
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // NO_ZEROES | FIXED_NEWSTYLE, then NBD_OPT_EXPORT_NAME "disk".
        let mut out = 3u32.to_be_bytes().to_vec();
        out.extend_from_slice(b"IHAVEOPT");
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"disk");
        client.write_all(&out).await.unwrap();
        let mut export = [0u8; 10];
        client.read_exact(&mut export).await.unwrap();
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 8192);
        // WRITE 4 bytes at 100, then DISC.
        let request = |kind: u16, offset: u64, len: u32| {
            let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
            r.extend_from_slice(&0u16.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&7u64.to_be_bytes());
            r.extend_from_slice(&offset.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            r
        };
        let mut out = request(1, 100, 4);
        out.extend_from_slice(b"abcd");
        client.write_all(&out).await.unwrap();
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "WRITE failed");
        client.write_all(&request(2, 0, 0)).await.unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(&device.snapshot()[100..104], b"abcd");
    }
}
