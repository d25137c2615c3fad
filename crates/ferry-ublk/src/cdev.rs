//! The ublk char device `/dev/ublkcN` as the data channel of
//! `UBLK_F_USER_COPY`: borrowing its descriptor from libublk, and reading or
//! writing a request's data at the tag's user-copy position.
//!
//! With user copy the tags have no I/O buffers: the server `pread`s a
//! WRITE's data from the char device and `pwrite`s a READ's data to it, at
//! `UblkIOCtx::ublk_user_copy_pos(qid, tag, offset_in_request)`; the driver
//! copies between the user memory and the request's pages. This is the only
//! module of the crate with `unsafe` code.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;

use libublk::io::UblkDev;

/// `/dev/ublkcN`'s descriptor, borrowed for as long as `dev` is, or `None`
/// if libublk did not record it.
pub(crate) fn cdev_fd(dev: &UblkDev) -> Option<BorrowedFd<'_>> {
    let fd = dev.tgt.fds[0];
    if dev.tgt.nr_fds < 1 || fd < 0 {
        return None;
    }
    // SAFETY: libublk opens /dev/ublkcN when it builds the `UblkDev`, keeps
    // the `File` inside it (`cdev_file`) and records its descriptor in
    // `tgt.fds[0]` (`nr_fds` >= 1, checked above, as is `fd` != -1); the file
    // is closed only when the `UblkDev` is dropped. The returned borrow has
    // `dev`'s lifetime, so the descriptor stays open while it is used.
    Some(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Writes all of `data` to `fd` at `pos` (a READ's data into the request).
pub(crate) fn write_all_at(fd: BorrowedFd<'_>, data: &[u8], pos: u64) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match nix::sys::uio::pwrite(fd, &data[done..], offset(pos, done)?) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("the ublk char device took {done} of {} bytes", data.len()),
                ))
            }
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fills `buf` from `fd` at `pos` (a WRITE's data out of the request).
pub(crate) fn read_exact_at(fd: BorrowedFd<'_>, buf: &mut [u8], pos: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset(pos, done)?;
        match nix::sys::uio::pread(fd, &mut buf[done..], at) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the ublk char device gave {done} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn offset(pos: u64, done: usize) -> io::Result<libc::off_t> {
    pos.checked_add(done as u64)
        .and_then(|p| libc::off_t::try_from(p).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "user-copy position overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_goes_to_and_comes_from_the_position() {
        let f = tempfile::tempfile().unwrap();
        write_all_at(f.as_fd(), &[5; 3000], 1 << 20).unwrap();
        let mut got = [0u8; 3000];
        f.read_exact_at(&mut got, 1 << 20).unwrap();
        assert!(got.iter().all(|b| *b == 5));
        let mut back = [0u8; 3000];
        read_exact_at(f.as_fd(), &mut back, 1 << 20).unwrap();
        assert_eq!(back, got);
    }

    #[test]
    fn short_sources_and_bad_descriptors_are_errors() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100).unwrap();
        let mut buf = [0u8; 200];
        let e = read_exact_at(f.as_fd(), &mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let dir = tempfile::tempdir().unwrap();
        let ro = std::fs::File::open(dir.path()).unwrap();
        let e = write_all_at(ro.as_fd(), &[1; 10], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(write_all_at(f.as_fd(), &[1], u64::MAX).is_err());
    }
}
