//! The one mapping from a request's `io::Error` to an errno value; the
//! frontends derive their codes from it (ublk: its negation; NBD: the
//! protocol's subset of error numbers).

use std::io;

/// The (positive) errno value a failed request is answered with.
///
/// An error carrying an OS error number keeps it; others are mapped by
/// kind; anything unrecognised is `EIO`.
pub fn errno(err: &io::Error) -> i32 {
    if let Some(code) = err.raw_os_error().filter(|code| *code > 0) {
        return code;
    }
    use io::ErrorKind as K;
    match err.kind() {
        K::Unsupported => libc::EOPNOTSUPP,
        K::InvalidInput | K::InvalidData => libc::EINVAL,
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EPERM,
        K::ReadOnlyFilesystem => libc::EROFS,
        K::TimedOut => libc::ETIMEDOUT,
        K::OutOfMemory => libc::ENOMEM,
        K::StorageFull => libc::ENOSPC,
        K::WouldBlock => libc::EAGAIN,
        K::Interrupted => libc::EINTR,
        K::ConnectionRefused | K::ConnectionReset | K::ConnectionAborted | K::NotConnected => {
            libc::ENOTCONN
        }
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_number() {
        for code in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EACCES,
            libc::EIO,
            libc::ENXIO,
        ] {
            assert_eq!(errno(&io::Error::from_raw_os_error(code)), code);
        }
    }

    #[test]
    fn kinds_map_to_errnos() {
        let cases = [
            (io::ErrorKind::Unsupported, libc::EOPNOTSUPP),
            (io::ErrorKind::InvalidInput, libc::EINVAL),
            (io::ErrorKind::InvalidData, libc::EINVAL),
            (io::ErrorKind::PermissionDenied, libc::EPERM),
            (io::ErrorKind::ReadOnlyFilesystem, libc::EROFS),
            (io::ErrorKind::StorageFull, libc::ENOSPC),
            (io::ErrorKind::OutOfMemory, libc::ENOMEM),
            (io::ErrorKind::TimedOut, libc::ETIMEDOUT),
            (io::ErrorKind::ConnectionReset, libc::ENOTCONN),
            (io::ErrorKind::Other, libc::EIO),
            (io::ErrorKind::UnexpectedEof, libc::EIO),
        ];
        for (kind, code) in cases {
            assert_eq!(errno(&io::Error::new(kind, "x")), code, "{kind:?}");
        }
        assert_eq!(errno(&io::Error::other("boom")), libc::EIO);
    }
}
