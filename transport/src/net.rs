//! UDP sockets with large kernel buffers, wrapped into quinn endpoints
//! (through [`crate::socket`], which moderates their receive wake-ups).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

use crate::error::TransportError;
use crate::socket::ModeratedSocket;

/// Binds a UDP socket at `addr` and asks for `buffer` bytes of send and
/// receive buffer (the kernel may grant less; that is logged, not fatal).
pub(crate) fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<UdpSocket, TransportError> {
    let sock = UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    if buffer > 0 {
        if let Err(e) = setsockopt(&sock, sockopt::RcvBuf, &buffer) {
            tracing::warn!(%addr, error = %e, "cannot set the UDP receive buffer");
        }
        if let Err(e) = setsockopt(&sock, sockopt::SndBuf, &buffer) {
            tracing::warn!(%addr, error = %e, "cannot set the UDP send buffer");
        }
        // Linux reports twice the usable size it granted.
        let rcv = getsockopt(&sock, sockopt::RcvBuf).unwrap_or(0) / 2;
        let snd = getsockopt(&sock, sockopt::SndBuf).unwrap_or(0) / 2;
        if rcv < buffer || snd < buffer {
            tracing::debug!(
                %addr, requested = buffer, receive = rcv, send = snd,
                "the kernel granted smaller UDP buffers (net.core.rmem_max / wmem_max)"
            );
        }
    }
    sock.set_nonblocking(true)
        .map_err(|source| TransportError::Bind { addr, source })?;
    Ok(sock)
}

/// A quinn endpoint on `sock` (server side when `server` is given) that
/// accepts datagrams of up to `max_udp_payload` bytes and wakes its
/// receiver at most once per `moderation` while datagrams stream in. Must
/// be called inside a tokio runtime.
pub(crate) fn endpoint(
    sock: UdpSocket,
    server: Option<quinn::ServerConfig>,
    max_udp_payload: u16,
    moderation: std::time::Duration,
) -> Result<quinn::Endpoint, TransportError> {
    let addr = sock
        .local_addr()
        .map_err(|source| TransportError::Endpoint { source })?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_udp_payload.max(1200))
        .map_err(|e| TransportError::Endpoint {
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
        })?;
    let fail = |source| {
        tracing::debug!(%addr, "cannot create the QUIC endpoint");
        TransportError::Endpoint { source }
    };
    let socket = ModeratedSocket::new(sock, moderation).map_err(fail)?;
    quinn::Endpoint::new_with_abstract_socket(
        config,
        server,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(fail)
}
