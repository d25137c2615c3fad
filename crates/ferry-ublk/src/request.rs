//! Decoding of one ublk I/O descriptor into the shared request model
//! ([`ferry_device::Request`]), checked against the device.
//!
//! Pure: no kernel, no I/O, so it can be tested on any machine. The checks
//! themselves are the model's ([`Request::validate`]); only the wire format
//! (opcodes, flags, sectors) is ublk's.

use std::io;

use ferry_device::{Limits, Request};

/// ublk opcodes and flags (`include/uapi/linux/ublk_cmd.h`).
pub(crate) mod op {
    /// Read from the device into the request buffer.
    pub(crate) const READ: u32 = libublk::sys::UBLK_IO_OP_READ;
    /// Write the request buffer to the device.
    pub(crate) const WRITE: u32 = libublk::sys::UBLK_IO_OP_WRITE;
    /// Make completed writes durable.
    pub(crate) const FLUSH: u32 = libublk::sys::UBLK_IO_OP_FLUSH;
    /// Discard a range.
    pub(crate) const DISCARD: u32 = libublk::sys::UBLK_IO_OP_DISCARD;
    /// Write zeros over a range.
    pub(crate) const WRITE_ZEROES: u32 = libublk::sys::UBLK_IO_OP_WRITE_ZEROES;
    /// Force unit access, at its own bit position in `op_flags`.
    pub(crate) const F_FUA: u32 = libublk::sys::UBLK_IO_F_FUA;
}

/// Bytes per ublk sector: offsets and lengths in descriptors count 512-byte
/// sectors whatever the logical block size.
const SECTOR_SHIFT: u32 = 9;

/// The fields of a `ublksrv_io_desc` that a request depends on, copied out of
/// the shared descriptor page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    /// Opcode in bits 0–7, flags (`UBLK_IO_F_*`) at their own bit positions.
    pub(crate) op_flags: u32,
    /// Length in 512-byte sectors.
    pub(crate) nr_sectors: u32,
    /// Start in 512-byte sectors; all ones for FLUSH.
    pub(crate) start_sector: u64,
}

impl Descriptor {
    /// The opcode (`UBLK_IO_OP_*`).
    pub(crate) fn opcode(&self) -> u32 {
        self.op_flags & 0xff
    }
}

/// Decodes `desc` for a device of `device_size` bytes whose request buffer
/// holds `buf_len` bytes.
///
/// Unknown opcodes give `ErrorKind::Unsupported` (answered -EOPNOTSUPP);
/// the model's refusals ([`ferry_device::RequestError`]) give its kinds:
/// reads outside the device or larger than the buffer -EINVAL, writes past
/// the end -ENOSPC. FLUSH ignores the range: the driver sends it with
/// `start_sector` all ones.
pub(crate) fn decode(desc: Descriptor, device_size: u64, buf_len: usize) -> io::Result<Request> {
    let fua = desc.op_flags & op::F_FUA != 0;
    let opcode = desc.opcode();
    if opcode == op::FLUSH {
        return Ok(Request::Flush);
    }
    if !matches!(
        opcode,
        op::READ | op::WRITE | op::DISCARD | op::WRITE_ZEROES
    ) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("unsupported ublk opcode {opcode}"),
        ));
    }
    let offset = desc
        .start_sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "start sector {} lies outside the {device_size}-byte device",
                    desc.start_sector
                ),
            )
        })?;
    let len = u64::from(desc.nr_sectors) << SECTOR_SHIFT;
    let limits = Limits {
        size: device_size,
        read_only: false,
        max_payload: u32::try_from(buf_len).unwrap_or(u32::MAX),
    };
    // A READ or WRITE longer than 4 GiB - 1 is larger than any buffer.
    let payload = u32::try_from(len).unwrap_or(u32::MAX);
    let request = match opcode {
        op::READ => Request::Read {
            offset,
            len: payload,
        },
        op::WRITE => Request::Write {
            offset,
            len: payload,
            fua,
        },
        op::DISCARD => Request::Trim { offset, len },
        _ => Request::WriteZeroes { offset, len, fua },
    };
    request.validate(&limits)?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 20;
    const BUF: usize = 1 << 20;

    fn desc(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Descriptor {
        Descriptor {
            op_flags,
            nr_sectors,
            start_sector,
        }
    }

    #[test]
    fn flush_with_all_ones_start_sector_is_accepted() {
        let d = desc(op::FLUSH, u64::MAX, 0);
        assert_eq!(decode(d, SIZE, BUF).unwrap(), Request::Flush);
    }

    #[test]
    fn read_and_write_become_byte_ranges() {
        let r = decode(desc(op::READ, 8, 16), SIZE, BUF).unwrap();
        assert_eq!(
            r,
            Request::Read {
                offset: 4096,
                len: 8192
            }
        );
        let w = decode(desc(op::WRITE, 8, 8), SIZE, BUF).unwrap();
        assert_eq!(
            w,
            Request::Write {
                offset: 4096,
                len: 4096,
                fua: false
            }
        );
    }

    #[test]
    fn fua_is_read_from_its_own_bit() {
        let w = decode(desc(op::WRITE | op::F_FUA, 0, 8), SIZE, BUF).unwrap();
        assert_eq!(
            w,
            Request::Write {
                offset: 0,
                len: 4096,
                fua: true
            }
        );
        // FUA sits at bit 13: the opcode byte stays WRITE.
        assert_eq!(op::F_FUA, 1 << 13);
        let z = decode(desc(op::WRITE_ZEROES | op::F_FUA, 0, 8), SIZE, BUF).unwrap();
        assert_eq!(
            z,
            Request::WriteZeroes {
                offset: 0,
                len: 4096,
                fua: true
            }
        );
    }

    #[test]
    fn discard_may_exceed_the_buffer() {
        let sectors = (SIZE >> 9) as u32;
        let d = decode(desc(op::DISCARD, 0, sectors), SIZE, BUF).unwrap();
        assert_eq!(
            d,
            Request::Trim {
                offset: 0,
                len: SIZE
            }
        );
    }

    #[test]
    fn unknown_opcodes_are_unsupported() {
        for opcode in [libublk::sys::UBLK_IO_OP_WRITE_SAME, 13, 18, 0xff] {
            let e = decode(desc(opcode, 0, 8), SIZE, BUF).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "opcode {opcode}");
        }
    }

    #[test]
    fn out_of_range_requests_are_invalid() {
        let last = (SIZE >> 9) - 8;
        assert!(decode(desc(op::READ, last, 8), SIZE, BUF).is_ok());
        for d in [
            desc(op::READ, last, 16),
            desc(op::DISCARD, u64::MAX, 8),
            desc(op::WRITE_ZEROES, u64::MAX >> 9, 8),
        ] {
            let e = decode(d, SIZE, BUF).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{d:?}");
        }
        // Writes past the end: ENOSPC, as on NBD (one request model).
        let e = decode(desc(op::WRITE, SIZE >> 9, 8), SIZE, BUF).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn reads_larger_than_the_buffer_are_invalid() {
        let e = decode(desc(op::READ, 0, 4096), SIZE, 4096 * 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
