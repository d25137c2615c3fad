//! Listening sockets: TCP (`ADDR:PORT`) or unix (`unix:/path`).
//!
//! A unix socket is made owner-only (0600) whatever the umask, or 0660 for
//! one group ([`SocketAccess`]): its mode (and group) are set after `bind`
//! and before `listen`, so there is no moment at which another user could
//! connect (a socket that does not listen yet refuses every connection).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// Who, besides the owner, may connect to a unix socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// `None`: the owner only (mode 0600). `Some(gid)`: the owner and
    /// group `gid` (mode 0660, group `gid`), e.g. the hypervisor's group.
    pub group: Option<u32>,
}

impl SocketAccess {
    /// The socket file's mode.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// Binds a unix stream socket at `path` with the mode (and group) of
/// `access`, set before it listens, whatever the process's umask. The path
/// must not exist. On failure nothing is left at `path`.
pub fn bind_unix_socket(
    path: &Path,
    access: &SocketAccess,
) -> io::Result<std::os::unix::net::UnixListener> {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    let configured = (|| {
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot give the socket to group {gid}: {e}"),
                )
            })?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode()))?;
        socket::listen(&fd, Backlog::new(128)?)?;
        Ok::<_, io::Error>(())
    })();
    if let Err(e) = configured {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl NbdListener {
    /// Binds `spec`: `"unix:/path/to/socket"` or `"ADDR:PORT"` (an IP
    /// address such as `127.0.0.1:10809` or `[::1]:0`, or a host name that
    /// resolves, such as `localhost:10809`).
    ///
    /// Fails with [`NbdError::AddrInUse`] when the port is taken and with
    /// [`NbdError::SocketPathExists`] when the socket path exists (a stale
    /// socket is not removed: that is the caller's decision). A unix
    /// socket is owner-only (0600), whatever the umask.
    pub async fn bind(spec: &str) -> Result<NbdListener, NbdError> {
        Self::bind_with(spec, &SocketAccess::default()).await
    }

    /// Like [`NbdListener::bind`], with a unix socket's access given by
    /// `access` (ignored for TCP).
    pub async fn bind_with(spec: &str, access: &SocketAccess) -> Result<NbdListener, NbdError> {
        if let Some(path) = spec.strip_prefix("unix:") {
            return bind_unix(spec, path, access);
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
        self.uri(false)
    }

    /// Like [`NbdListener::describe`], with the TLS schemes (`nbds://`,
    /// `nbds+unix://`) when `tls`.
    pub fn uri(&self, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            NbdListener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("nbd{s}://{addr}"),
                Err(_) => format!("nbd{s}://(unknown address)"),
            },
            NbdListener::Unix(_, path) => {
                format!("nbd{s}+unix:///?socket={}", path.display())
            }
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

fn bind_unix(spec: &str, path: &str, access: &SocketAccess) -> Result<NbdListener, NbdError> {
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
    match bind_unix_socket(&path, access).and_then(UnixListener::from_std) {
        Ok(l) => Ok(NbdListener::Unix(l, path)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(NbdError::SocketPathExists { path }),
        Err(e) => Err(NbdError::Bind {
            addr: spec.to_owned(),
            source: e,
        }),
    }
}
