//! The few system calls the emulator needs that std does not offer: open a
//! TUN device (`/dev/net/tun` + `TUNSETIFF`) inside a named network
//! namespace (`setns`), wait for a descriptor with a nanosecond timeout
//! (`ppoll`), and signal a process by its id. Every unsafe block of the
//! emulator lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TUN`: layer-3 packets.
const IFF_TUN: libc::c_short = 0x0001;
/// `IFF_NO_PI`: no packet-information header before each packet.
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as far as `TUNSETIFF` reads it (name, then flags; the
/// kernel copies the whole 40-byte structure).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating) the TUN device `name` in the calling thread's network
/// namespace, non-blocking. The device lives as long as the descriptor.
pub(crate) fn open_tun(name: &str) -> Result<File> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        bail!("bad interface name {name:?}");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    set_nonblocking(file.as_raw_fd())?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the descriptor is open and owned by `file`; `req` is a valid,
    // initialised ifreq-sized buffer that outlives the call, as TUNSETIFF
    // requires (it reads and writes back the structure).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    Ok(file)
}

/// Sets O_NONBLOCK on a descriptor.
pub(crate) fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: F_GETFL on a descriptor the caller keeps open has no memory
    // effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error()).context("F_GETFL");
    }
    // SAFETY: as above; F_SETFL only changes the descriptor's status flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("F_SETFL");
    }
    Ok(())
}

fn setns_net(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace descriptor; setns only changes the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with the calling thread inside the named network namespace
/// (`/run/netns/NAME`, as made by `ip netns add`), then moves it back.
pub(crate) fn in_netns<T>(ns: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net").context("cannot open our netns")?;
    let target = File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("no network namespace {ns}"))?;
    setns_net(target.as_raw_fd()).with_context(|| format!("setns into {ns}"))?;
    let out = f();
    // Moving back must not fail silently: the thread would stay inside.
    setns_net(home.as_raw_fd()).expect("cannot return to the original network namespace");
    out
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `pfd` and `ts` are valid for the duration of the call; one
    // pollfd is passed and a null signal mask means "unchanged".
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
}

/// Sends `sig` to process `pid`. Ok(false) if there is no such process.
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<bool> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Ok(false);
    };
    if pid <= 0 {
        return Ok(false);
    }
    // SAFETY: kill has no memory effects; pid is a single positive id, so
    // no process group or broadcast is addressed.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// Asks for `bytes` of socket receive and send buffer (the kernel caps it
/// at net.core.rmem_max / wmem_max).
pub(crate) fn set_socket_buffers(fd: RawFd, bytes: usize) -> Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: `v` is a live c_int and its exact size is passed; the
        // socket descriptor is open for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("setsockopt SO_RCVBUF/SO_SNDBUF");
        }
    }
    Ok(())
}

/// Best effort: moves the calling thread to SCHED_FIFO at `prio`, so the
/// link keeps time while the benchmarked processes load both cores. The
/// pumps sleep in `ppoll` between packets, and the kernel's RT throttling
/// bounds them anyway.
pub(crate) fn set_realtime(prio: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
