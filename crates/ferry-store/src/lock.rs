//! Exclusive locks on the backing file and the state file, so two `ferry
//! pull`s never serve the same disk (as QEMU locks its images).
//!
//! Two `fcntl` locks on bytes past anything ferry reads, both taken on the
//! file's own descriptor:
//!
//! - an open-file-description lock (`F_OFD_SETLK`) on byte 0: the
//!   exclusion. It lives as long as the descriptor, whatever else the
//!   process opens or closes (a classic POSIX lock is dropped when the
//!   process closes *any* descriptor of the file);
//! - a classic POSIX lock (`F_SETLK`) on byte 1: only so that a refused
//!   process can name the holder's PID (`F_GETLK` reports it; for an
//!   open-file-description lock it reports -1).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// Why a lock was not taken.
#[derive(Debug)]
pub(crate) enum LockFail {
    /// Another open file holds it; the PID of the process, when known.
    Held(Option<i32>),
    /// The lock call itself failed.
    Io(io::Error),
}

fn range(kind: libc::c_short, start: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// The PID of a process holding a classic lock on byte 1 of `file`, if any.
fn holder(file: &File) -> Option<i32> {
    let mut probe = range(libc::F_WRLCK as libc::c_short, 1);
    match fcntl(file.as_raw_fd(), FcntlArg::F_GETLK(&mut probe)) {
        Ok(_) if probe.l_type != libc::F_UNLCK as libc::c_short && probe.l_pid > 0 => {
            Some(probe.l_pid)
        }
        _ => None,
    }
}

/// Takes both locks on `file` (opened for writing), without waiting.
pub(crate) fn lock_exclusive(file: &File) -> Result<(), LockFail> {
    let fd = file.as_raw_fd();
    let excl = range(libc::F_WRLCK as libc::c_short, 0);
    match fcntl(fd, FcntlArg::F_OFD_SETLK(&excl)) {
        Ok(_) => {}
        Err(Errno::EAGAIN | Errno::EACCES) => return Err(LockFail::Held(holder(file))),
        Err(e) => return Err(LockFail::Io(io::Error::from(e))),
    }
    let pid = range(libc::F_WRLCK as libc::c_short, 1);
    match fcntl(fd, FcntlArg::F_SETLK(&pid)) {
        Ok(_) => Ok(()),
        // Held by someone else although we hold the exclusion: a process
        // that predates this scheme; refuse as well.
        Err(Errno::EAGAIN | Errno::EACCES) => Err(LockFail::Held(holder(file))),
        Err(e) => Err(LockFail::Io(io::Error::from(e))),
    }
}

/// A message part naming the holder: "PID 123" or "an unknown process".
pub(crate) fn describe_holder(pid: Option<i32>) -> String {
    match pid {
        Some(p) => format!("PID {p}"),
        None => "a process whose PID the lock does not tell".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_descriptor_is_refused_and_the_first_survives_closing_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let a = open();
        lock_exclusive(&a).unwrap();
        // Same process, another open file: refused by the OFD lock (a
        // classic lock alone would let the same process in).
        let b = open();
        assert!(matches!(lock_exclusive(&b), Err(LockFail::Held(_))));
        // Closing another descriptor of the file keeps the exclusion.
        drop(b);
        let c = open();
        assert!(matches!(lock_exclusive(&c), Err(LockFail::Held(_))));
        drop(a);
        lock_exclusive(&c).unwrap();
    }
}
