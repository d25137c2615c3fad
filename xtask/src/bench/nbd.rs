//! A tiny blocking NBD client for the latency prober: fixed newstyle
//! handshake with `NBD_OPT_EXPORT_NAME`, then simple-reply `NBD_CMD_READ`s
//! and `NBD_CMD_WRITE`s on one connection, each timed by the caller (the
//! latency prober reads; the live bench's writer writes). Nothing else (no
//! structured replies), so any server speaks it: ferry's export, nbdkit
//! and qemu-storage-daemon alike.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// One NBD connection.
pub(crate) struct NbdClient {
    s: UnixStream,
    /// Export size in bytes.
    pub(crate) size: u64,
    handle: u64,
}

fn read_u16(s: &mut UnixStream) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut UnixStream) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut UnixStream) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connects to the unix socket `path` and opens `export`.
    pub(crate) fn connect(path: &Path, export: &str, timeout: Duration) -> Result<NbdClient> {
        let mut s = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            bail!("not a fixed-newstyle NBD server");
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("server is not fixed newstyle");
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let cflags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        let mut msg = Vec::new();
        msg.extend_from_slice(&cflags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        s.write_all(&msg)?;
        let size = read_u64(&mut s).context("export refused")?;
        let _tflags = read_u16(&mut s)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        Ok(NbdClient { s, size, handle: 0 })
    }

    /// Sends one request header (and `data`, for a write).
    fn request(&mut self, cmd: u16, offset: u64, len: usize, data: &[u8]) -> Result<()> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(len as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req)?;
        Ok(())
    }

    /// Reads a simple reply's header; fails on an NBD error.
    fn reply(&mut self, what: &str, offset: u64) -> Result<()> {
        if read_u32(&mut self.s)? != SIMPLE_REPLY_MAGIC {
            bail!("unexpected reply magic");
        }
        let err = read_u32(&mut self.s)?;
        let handle = read_u64(&mut self.s)?;
        if handle != self.handle {
            bail!("reply for handle {handle}, expected {}", self.handle);
        }
        if err != 0 {
            bail!("{what} at {offset} failed with NBD error {err}");
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, offset, buf.len(), &[])?;
        self.reply("read", offset)?;
        self.s.read_exact(buf)?;
        Ok(())
    }

    /// Writes `data` at `offset` (no FUA), waiting for the server's answer.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len(), data)?;
        self.reply("write", offset)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_DISC.to_be_bytes());
        req.extend_from_slice(&u64::MAX.to_be_bytes());
        req.extend_from_slice(&[0u8; 12]);
        let _ = self.s.write_all(&req);
    }
}
