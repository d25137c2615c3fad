//! Errors: the crate's [`NbdError`] and the one mapping from device
//! `io::Error`s to NBD error numbers.

use std::io;
use std::path::PathBuf;

use crate::proto::{EINVAL, EIO, ENOMEM, ENOSPC, EPERM};

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The listen address could not be understood.
    #[error("invalid NBD listen address {spec:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process already listens on the TCP address.
    #[error("cannot listen on {addr}: address already in use")]
    AddrInUse {
        /// The address as given.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The unix socket path already exists (a stale socket or another file).
    #[error("cannot listen on unix socket {}: the path already exists", path.display())]
    SocketPathExists {
        /// The socket path.
        path: PathBuf,
    },
    /// Binding the listener failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A socket error on a connection.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (e.g. the client's
    /// certificate is not signed by the trusted CA); the connection is
    /// closed.
    #[error("TLS handshake failed: {source}")]
    TlsHandshake {
        /// rustls's error, as an I/O error.
        #[source]
        source: io::Error,
    },
    /// The client broke the protocol; the connection is closed.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
}

/// The NBD error number for a request that failed with `errno` (from the
/// one mapping, [`ferry_device::errno`]): the protocol knows only a few.
pub(crate) fn nbd_error(errno: i32) -> u32 {
    use nix::libc;
    match errno {
        libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT => ENOSPC,
        _ => EIO,
    }
}

/// Maps a device error to the NBD error number sent to the client, and logs
/// it. `what`, `offset` and `len` describe the failed request.
pub(crate) fn nbd_errno(err: &io::Error, what: &str, offset: u64, len: u64) -> u32 {
    let code = nbd_error(ferry_device::errno(err));
    tracing::warn!(
        command = what,
        offset,
        len,
        error = %err,
        nbd_errno = code,
        "device request failed"
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let m = |e: io::Error| nbd_errno(&e, "READ", 0, 0);
        assert_eq!(m(io::Error::other("boom")), EIO);
        assert_eq!(m(io::ErrorKind::InvalidInput.into()), EINVAL);
        assert_eq!(m(io::ErrorKind::StorageFull.into()), ENOSPC);
        assert_eq!(m(io::ErrorKind::PermissionDenied.into()), EPERM);
        assert_eq!(m(io::ErrorKind::ReadOnlyFilesystem.into()), EPERM);
        assert_eq!(m(io::ErrorKind::OutOfMemory.into()), ENOMEM);
        assert_eq!(m(io::Error::from_raw_os_error(28)), ENOSPC);
        assert_eq!(m(io::Error::from_raw_os_error(5)), EIO);
        assert_eq!(m(io::ErrorKind::TimedOut.into()), EIO);
        assert_eq!(m(io::Error::from_raw_os_error(30)), EPERM);
        assert_eq!(m(io::Error::from_raw_os_error(122)), ENOSPC);
        assert_eq!(m(io::ErrorKind::Unsupported.into()), EIO);
    }
}
