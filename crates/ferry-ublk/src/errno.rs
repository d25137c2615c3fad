//! Where a request's `io::Error` becomes the negative errno the ublk driver
//! hands back to the block layer (the shared mapping, [`ferry_device::errno`],
//! negated), and where that failure is logged.

use std::io;

use crate::request::Descriptor;

/// Logs the failure of the request described by `desc` and returns the
/// negative errno to complete it with.
///
/// An error carrying an OS error number keeps it; others are mapped by kind;
/// anything unrecognised is -EIO. The result is always negative.
pub(crate) fn request_failed(queue: u16, tag: u16, desc: Descriptor, err: &io::Error) -> i32 {
    let errno = ferry_device::errno(err);
    tracing::warn!(
        queue,
        tag,
        opcode = desc.opcode(),
        op_flags = format_args!("{:#x}", desc.op_flags),
        start_sector = desc.start_sector,
        nr_sectors = desc.nr_sectors,
        errno,
        "ublk request failed: {err}"
    );
    -errno
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> Descriptor {
        Descriptor {
            op_flags: 0,
            nr_sectors: 8,
            start_sector: 0,
        }
    }

    #[test]
    fn os_errors_keep_their_number() {
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(request_failed(0, 1, desc(), &e), -libc::ENOSPC);
    }

    #[test]
    fn kinds_map_to_errnos() {
        let cases = [
            (io::ErrorKind::Unsupported, libc::EOPNOTSUPP),
            (io::ErrorKind::InvalidInput, libc::EINVAL),
            (io::ErrorKind::TimedOut, libc::ETIMEDOUT),
            (io::ErrorKind::Other, libc::EIO),
            (io::ErrorKind::UnexpectedEof, libc::EIO),
        ];
        for (kind, errno) in cases {
            let e = io::Error::new(kind, "x");
            assert_eq!(request_failed(0, 0, desc(), &e), -errno, "{kind:?}");
        }
    }
}
