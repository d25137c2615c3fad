//! Listening sockets: TCP (`ADDR:PORT`) or unix (`unix:/path`).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::NbdError;

/// A bound socket the NBD server accepts clients on.
#[derive(Debug)]
pub enum NbdListener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix-domain socket listener and its path (removed by
    /// [`serve`](crate::serve) when it returns).
    Unix(UnixListener, PathBuf),
}

/// An accepted client connection.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl NbdListener {
    /// Binds `spec`: `"unix:/path/to/socket"` or `"ADDR:PORT"` (an IP
    /// address such as `127.0.0.1:10809` or `[::1]:0`, or a host name that
    /// resolves, such as `localhost:10809`).
    ///
    /// Fails with [`NbdError::AddrInUse`] when the port is taken and with
    /// [`NbdError::SocketPathExists`] when the socket path exists (a stale
    /// socket is not removed: that is the caller's decision).
    pub async fn bind(spec: &str) -> Result<NbdListener, NbdError> {
        if let Some(path) = spec.strip_prefix("unix:") {
            return bind_unix(spec, path);
        }
        let addrs: Vec<SocketAddr> = match spec.parse::<SocketAddr>() {
            Ok(addr) => vec![addr],
            Err(_) => tokio::net::lookup_host(spec)
                .await
                .map_err(|e| NbdError::InvalidAddress {
                    spec: spec.to_owned(),
                    reason: format!("expected unix:/path or ADDR:PORT ({e})"),
                })?
                .collect(),
        };
        let mut last = None;
        for addr in addrs {
            match TcpListener::bind(addr).await {
                Ok(l) => return Ok(NbdListener::Tcp(l)),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if e.kind() == io::ErrorKind::AddrInUse => NbdError::AddrInUse {
                addr: spec.to_owned(),
                source: e,
            },
            Some(e) => NbdError::Bind {
                addr: spec.to_owned(),
                source: e,
            },
            None => NbdError::InvalidAddress {
                spec: spec.to_owned(),
                reason: "resolves to no address".into(),
            },
        })
    }

    /// The URI clients use to reach this listener, e.g.
    /// `nbd://127.0.0.1:10809` or `nbd+unix:///?socket=/run/ferry.sock`.
    /// Append the export name to the path to name a non-default export.
    pub fn describe(&self) -> String {
        match self {
            NbdListener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("nbd://{addr}"),
                Err(_) => "nbd://(unknown address)".into(),
            },
            NbdListener::Unix(_, path) => format!("nbd+unix:///?socket={}", path.display()),
        }
    }

    /// Accepts one connection; returns it with a description of the peer.
    pub(crate) async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            NbdListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Replies are small and latency matters more than packing.
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), peer.to_string()))
            }
            NbdListener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Conn::Unix(s), format!("unix:{}", path.display())))
            }
        }
    }
}

fn bind_unix(spec: &str, path: &str) -> Result<NbdListener, NbdError> {
    if path.is_empty() {
        return Err(NbdError::InvalidAddress {
            spec: spec.to_owned(),
            reason: "empty unix socket path".into(),
        });
    }
    let path = PathBuf::from(path);
    if path.symlink_metadata().is_ok() {
        return Err(NbdError::SocketPathExists { path });
    }
    match UnixListener::bind(&path) {
        Ok(l) => Ok(NbdListener::Unix(l, path)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(NbdError::SocketPathExists { path }),
        Err(e) => Err(NbdError::Bind {
            addr: spec.to_owned(),
            source: e,
        }),
    }
}
