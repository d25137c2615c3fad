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
    let export = Arc::new(ExportInfo {
        name: config.export_name,
        size: device.size(),
        block_size: device.block_size(),
        read_only: config.read_only,
    });
    info!(
        listen = %listener.describe(),
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
                    let span = tracing::info_span!("nbd", peer = %peer);
                    conns.spawn(connection(conn, device, export).instrument(span));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accepting an NBD connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    info!(open = conns.len(), "NBD server shutting down");
    conns.shutdown().await;
    if let NbdListener::Unix(_, path) = &listener {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), error = %e, "cannot remove the NBD socket");
        }
    }
    Ok(())
}

async fn connection<D: BlockDevice>(conn: Conn, device: Arc<D>, export: Arc<ExportInfo>) {
    debug!("connected");
    let result = match conn {
        Conn::Tcp(s) => run_connection(s, device, &export).await,
        Conn::Unix(s) => run_connection(s, device, &export).await,
    };
    match result {
        Ok(()) => debug!("disconnected"),
        Err(e) => warn!(error = %e, "NBD connection closed on error"),
    }
}

async fn run_connection<D, S>(
    mut stream: S,
    device: Arc<D>,
    export: &ExportInfo,
) -> Result<(), NbdError>
where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let negotiated =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut stream, export))
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
    debug!("transmission phase");
    let (reader, writer) = tokio::io::split(stream);
    transmission::run(reader, writer, device, export.size, export.read_only).await
}
