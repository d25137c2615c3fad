//! Accepting connections: the handshake, the Welcome pushed as 0.5-RTT
//! data, the destination's pinned certificate, the `Path` reports on the
//! Welcome stream, and one task per request stream.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Connection, Endpoint, SendStream, VarInt};
use tokio::task::JoinSet;

use super::dispatch::handle_stream;
use super::{Server, Shared};
use crate::codec;
use crate::error::TransportError;
use crate::identity::Fingerprint;
use crate::path::LossWindow;
use crate::wire::{self, Message, PROTOCOL_VERSION};

impl Server {
    /// Accepts connections until the endpoint is closed. Dropping (aborting)
    /// this future stops the server: every connection is closed and every
    /// response in progress is reset, so clients re-issue their requests
    /// elsewhere or after a restart.
    pub async fn run(self) -> Result<(), TransportError> {
        let mut conns = JoinSet::new();
        // Declared after `conns`, so dropped first: connections are closed
        // before their tasks are cancelled.
        let _close = CloseOnDrop(self.endpoint.clone());
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        conns.spawn(handle_incoming(incoming, self.shared.clone()));
                    }
                    None => break,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        Ok(())
    }
}

struct CloseOnDrop(Endpoint);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(VarInt::from_u32(0), b"source stopped");
    }
}

fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    let id = conn.peer_identity()?;
    let certs = id
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_cert(c))
}

async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "handshake failed: {e}");
            return;
        }
    };
    // 0.5-RTT: the Welcome leaves with our handshake flight, so the
    // destination knows the geometry one round trip sooner. It carries no
    // disk data; nothing else is sent, and no request is read, until the
    // handshake has completed and the destination's certificate is pinned.
    // Then the first `Path` report goes out on the Welcome stream: that
    // tells the destination it was accepted.
    let (conn, established) = match connecting.into_0rtt() {
        Ok(pair) => pair,
        // quinn always grants 0.5-RTT to a server; should it not, the
        // Welcome goes out once the handshake is done.
        Err(connecting) => match connecting.await {
            Ok(c) => {
                let stream = push_welcome(&c, &shared, remote).await;
                return serve_connection(c, shared, remote, stream).await;
            }
            Err(e) => {
                tracing::warn!(%remote, "handshake failed: {e}");
                return;
            }
        },
    };
    let stream = push_welcome(&conn, &shared, remote).await;
    // Resolves when the handshake ends. Its value tells whether the
    // client's 0-RTT data was accepted (ferry's clients send none), not
    // whether the handshake succeeded: that is told by the connection
    // still being open.
    let _client_0rtt = established.await;
    if let Some(why) = conn.close_reason() {
        tracing::warn!(%remote, "handshake failed: {why}");
        return;
    }
    serve_connection(conn, shared, remote, stream).await;
}

/// Sends the Welcome on a unidirectional stream of its own, left open.
async fn push_welcome(
    conn: &Connection,
    shared: &Shared,
    remote: SocketAddr,
) -> Option<quinn::SendStream> {
    let m = shared.source.manifest();
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        manifest_len: shared.manifest_max_len,
        disk_size: m.geometry().disk_size,
        chunk_size: m.geometry().chunk_size,
        source_id: m.source_id(),
        live: shared.source.changes().is_some_and(|l| !l.frozen()),
    };
    let sent = async {
        // A peer that allows us no unidirectional stream (not a ferry
        // destination) gets no Welcome rather than a stalled handshake.
        let mut s = tokio::time::timeout(std::time::Duration::from_secs(1), conn.open_uni())
            .await
            .map_err(|_| "the peer allows no unidirectional stream")??;
        codec::write_msg(&mut s, &welcome).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(s)
    };
    match sent.await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(%remote, "could not send the Welcome: {e}");
            None
        }
    }
}

/// Serves the requests of an established connection whose peer presented
/// a pinned certificate; first starts the `Path` reports on the Welcome
/// stream, the first of which tells the destination it was accepted.
async fn serve_connection(
    conn: Connection,
    shared: Arc<Shared>,
    remote: SocketAddr,
    welcome: Option<quinn::SendStream>,
) {
    if conn.close_reason().is_some() {
        return;
    }
    let Some(peer) = peer_fingerprint(&conn) else {
        // The verifier pins the destination's certificate during the
        // handshake; a connection without one is never served.
        conn.close(VarInt::from_u32(0), b"no client certificate");
        tracing::warn!(%remote, "refused a connection without a client certificate");
        return;
    };
    if let Some(s) = welcome {
        tokio::spawn(report_path(conn.clone(), s, remote, shared.clone()));
    }
    tracing::info!(%remote, %peer, "destination connected");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(handle_stream(send, recv, shared.clone(), remote));
                }
                Err(e) => {
                    tracing::info!(%remote, "connection closed: {e}");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// Reports sent over the window of [`LossWindow`]: 5 s of them.
const PATH_WINDOW_REPORTS: usize = 50;

/// Stream priority of the Welcome stream's reports: the first one tells
/// the destination it is accepted, so it must not wait behind data.
const PATH_PRIORITY: i32 = 200;

/// Sends `Path` reports on the Welcome stream until the connection ends:
/// the first at once (it tells the destination it was accepted), then
/// every [`wire::PATH_REPORT_INTERVAL_MS`], each with the share of our
/// packets lost over the last [`PATH_WINDOW_REPORTS`] reports.
async fn report_path(
    conn: Connection,
    mut stream: SendStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
) {
    let _ = stream.set_priority(PATH_PRIORITY);
    let mut window = LossWindow::new(PATH_WINDOW_REPORTS);
    let every = std::time::Duration::from_millis(wire::PATH_REPORT_INTERVAL_MS);
    loop {
        // Each report also looks whether the disk was changed behind our
        // back (the source latches and logs it; reads are refused then).
        let _ = shared.source.changed();
        let path = conn.stats().path;
        let lost_ppm = window.update(path.sent_packets, path.lost_packets);
        let sent_packets = u32::try_from(path.sent_packets).unwrap_or(u32::MAX);
        let report = Message::Path {
            lost_ppm,
            sent_packets,
            lost_bytes: path.lost_bytes,
        };
        if let Err(e) = codec::write_msg(&mut stream, &report).await {
            tracing::debug!(%remote, "path reports end: {e}");
            return;
        }
        tokio::time::sleep(every).await;
        if conn.close_reason().is_some() {
            return;
        }
    }
}
