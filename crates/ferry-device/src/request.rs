//! The request model shared by every frontend: what a guest asks of the
//! device, its validation against the device, and its execution.

use std::io;

use crate::BlockDevice;

/// One request on a [`BlockDevice`], in bytes. A frontend decodes its wire
/// format into a `Request`, checks it with [`Request::validate`], and runs
/// it with [`read_now`] (reads of present blocks) or [`execute`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Write `len` bytes at `offset`; with `fua`, durable on completion.
    Write {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes (of the payload the frontend passes along).
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard `len` bytes at `offset` (ublk's DISCARD, NBD's TRIM).
    Trim {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write zeros over `len` bytes at `offset`; with `fua`, durable on
    /// completion.
    WriteZeroes {
        /// Start in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
}

/// What a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Size of the device in bytes.
    pub size: u64,
    /// Whether requests that change the device are refused.
    pub read_only: bool,
    /// The largest READ or WRITE payload the frontend carries.
    pub max_payload: u32,
}

/// Why a request was refused before it reached the device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A request that changes the device, on a read-only device.
    #[error("{op} of {len} bytes at offset {offset} refused: the device is read-only")]
    ReadOnly {
        /// The request's name.
        op: &'static str,
        /// Its start.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// `offset + len` does not fit in 64 bits.
    #[error("{op} of {len} bytes at offset {offset}: the range overflows")]
    Overflow {
        /// The request's name.
        op: &'static str,
        /// Its start.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The range ends past the end of the device.
    #[error("{op} of {len} bytes at offset {offset} ends past the {size}-byte device")]
    PastEnd {
        /// The request's name.
        op: &'static str,
        /// Its start.
        offset: u64,
        /// Its length.
        len: u64,
        /// The device's size.
        size: u64,
    },
    /// A READ or WRITE payload larger than the frontend carries.
    #[error("{op} of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The request's name.
        op: &'static str,
        /// Its length.
        len: u64,
        /// The largest payload allowed.
        max: u32,
    },
}

impl RequestError {
    /// The kind of the `io::Error` this becomes, which fixes its errno
    /// ([`crate::errno`]): writes past the end are `ENOSPC` (as the NBD
    /// protocol asks), a read-only device `EROFS`, everything else `EINVAL`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            RequestError::ReadOnly { .. } => io::ErrorKind::ReadOnlyFilesystem,
            RequestError::PastEnd { op, .. } if *op != Request::READ => io::ErrorKind::StorageFull,
            _ => io::ErrorKind::InvalidInput,
        }
    }
}

impl From<RequestError> for io::Error {
    fn from(e: RequestError) -> Self {
        io::Error::new(e.kind(), e)
    }
}

impl Request {
    const READ: &'static str = "READ";

    /// The request's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Read { .. } => Self::READ,
            Request::Write { .. } => "WRITE",
            Request::Flush => "FLUSH",
            Request::Trim { .. } => "TRIM",
            Request::WriteZeroes { .. } => "WRITE_ZEROES",
        }
    }

    /// The byte range the request covers (`(0, 0)` for FLUSH).
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Request::Read { offset, len } | Request::Write { offset, len, .. } => {
                (offset, u64::from(len))
            }
            Request::Flush => (0, 0),
            Request::Trim { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                (offset, len)
            }
        }
    }

    /// Whether the request changes the device's contents.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. }
        )
    }

    /// Checks the request against the device: read-only first, then the
    /// payload size, then the range (which must lie inside the device; a
    /// FLUSH has none). Only valid requests may be passed to [`read_now`]
    /// or [`execute`].
    pub fn validate(&self, limits: &Limits) -> Result<(), RequestError> {
        let op = self.name();
        let (offset, len) = self.range();
        if self.writes() && limits.read_only {
            return Err(RequestError::ReadOnly { op, offset, len });
        }
        if matches!(self, Request::Read { .. } | Request::Write { .. })
            && len > u64::from(limits.max_payload)
        {
            return Err(RequestError::TooLarge {
                op,
                len,
                max: limits.max_payload,
            });
        }
        if *self == Request::Flush {
            return Ok(());
        }
        match offset.checked_add(len) {
            None => Err(RequestError::Overflow { op, offset, len }),
            Some(end) if end > limits.size => Err(RequestError::PastEnd {
                op,
                offset,
                len,
                size: limits.size,
            }),
            Some(_) => Ok(()),
        }
    }
}

/// The fast path of a valid READ: [`BlockDevice::read_now`] into `buf`
/// (the request's `len` bytes) on the caller's thread: no task, thread hop
/// or allocation. `None` means the device must wait for something (for
/// `ferry pull`: a block is absent); the caller then uses [`execute`].
///
/// A panic in the device becomes an error of this request, as it does on
/// the async path, instead of taking the frontend's thread down.
pub fn read_now<D: BlockDevice>(device: &D, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
    if buf.is_empty() {
        return Some(Ok(()));
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        device.read_now(offset, buf)
    }))
    .unwrap_or_else(|_| {
        Some(Err(io::Error::other(
            "the device's synchronous read panicked",
        )))
    })
}

/// Runs a valid request on `device`. `data` is a WRITE's payload (its
/// `len` bytes) and empty for the others. Returns the bytes read for a
/// READ (exactly its `len`), nothing for the others. Empty ranges complete
/// without reaching the device.
pub async fn execute<D: BlockDevice>(
    device: &D,
    request: Request,
    data: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let (offset, len) = request.range();
    match request {
        Request::Read { len: 0, .. } => Ok(Vec::new()),
        Request::Read { offset, len } => {
            let data = device.read(offset, len).await?;
            if data.len() != len as usize {
                return Err(io::Error::other(format!(
                    "the device returned {} bytes for a {len}-byte read at offset {offset}",
                    data.len()
                )));
            }
            Ok(data)
        }
        Request::Write { len, .. } if data.len() != len as usize => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "WRITE of {len} bytes at offset {offset} came with {} bytes of data",
                data.len()
            ),
        )),
        Request::Write { len: 0, .. } => Ok(Vec::new()),
        Request::Write { fua, .. } => device.write(offset, data, fua).await.map(|()| Vec::new()),
        Request::Flush => device.flush().await.map(|()| Vec::new()),
        _ if len == 0 => Ok(Vec::new()),
        Request::Trim { .. } => device.trim(offset, len).await.map(|()| Vec::new()),
        Request::WriteZeroes { fua, .. } => device
            .write_zeroes(offset, len, fua)
            .await
            .map(|()| Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::MemDevice;

    const LIMITS: Limits = Limits {
        size: 8192,
        read_only: false,
        max_payload: 4096,
    };
    const RO: Limits = Limits {
        read_only: true,
        ..LIMITS
    };

    fn read(offset: u64, len: u32) -> Request {
        Request::Read { offset, len }
    }
    fn write(offset: u64, len: u32) -> Request {
        Request::Write {
            offset,
            len,
            fua: false,
        }
    }
    fn kind(r: Request, limits: &Limits) -> Option<io::ErrorKind> {
        r.validate(limits).err().map(|e| io::Error::from(e).kind())
    }

    #[test]
    fn requests_inside_the_device_are_valid() {
        for r in [
            read(4096, 4096),
            write(0, 4096),
            read(8192, 0),
            Request::Trim {
                offset: 0,
                len: 8192,
            },
            Request::WriteZeroes {
                offset: 4096,
                len: 4096,
                fua: true,
            },
            Request::Flush,
        ] {
            assert_eq!(r.validate(&LIMITS), Ok(()), "{r:?}");
        }
        assert_eq!(read(0, 4096).validate(&RO), Ok(()));
        assert_eq!(Request::Flush.validate(&RO), Ok(()));
    }

    #[test]
    fn reads_past_the_end_are_invalid_and_writes_past_it_out_of_space() {
        use io::ErrorKind::*;
        assert_eq!(kind(read(4097, 4096), &LIMITS), Some(InvalidInput));
        assert_eq!(kind(write(8192, 1), &LIMITS), Some(StorageFull));
        let trim = Request::Trim {
            offset: 0,
            len: 8193,
        };
        assert_eq!(kind(trim, &LIMITS), Some(StorageFull));
        assert!(matches!(
            trim.validate(&LIMITS),
            Err(RequestError::PastEnd { size: 8192, .. })
        ));
    }

    #[test]
    fn overflowing_ranges_are_invalid() {
        use io::ErrorKind::*;
        assert_eq!(kind(read(u64::MAX, 1), &LIMITS), Some(InvalidInput));
        assert_eq!(kind(write(u64::MAX, 2), &LIMITS), Some(InvalidInput));
        let wz = Request::WriteZeroes {
            offset: u64::MAX - 511,
            len: 4096,
            fua: false,
        };
        assert!(matches!(
            wz.validate(&LIMITS),
            Err(RequestError::Overflow { .. })
        ));
    }

    #[test]
    fn payloads_are_capped_but_trims_are_not() {
        let big = Limits {
            size: 1 << 30,
            ..LIMITS
        };
        assert!(matches!(
            read(0, 4097).validate(&big),
            Err(RequestError::TooLarge { max: 4096, .. })
        ));
        assert!(matches!(
            write(0, 8192).validate(&big),
            Err(RequestError::TooLarge { .. })
        ));
        let trim = Request::Trim {
            offset: 0,
            len: 1 << 30,
        };
        assert_eq!(trim.validate(&big), Ok(()));
    }

    #[test]
    fn read_only_devices_refuse_changes_first() {
        for r in [
            write(0, 1),
            write(1 << 40, 1),
            Request::Trim { offset: 0, len: 1 },
            Request::WriteZeroes {
                offset: 0,
                len: 1,
                fua: false,
            },
        ] {
            assert!(
                matches!(r.validate(&RO), Err(RequestError::ReadOnly { .. })),
                "{r:?}"
            );
            assert_eq!(kind(r, &RO), Some(io::ErrorKind::ReadOnlyFilesystem));
        }
    }

    #[test]
    fn refusals_map_to_the_errnos_frontends_answer() {
        let e = |r: Request, l: &Limits| crate::errno(&r.validate(l).unwrap_err().into());
        assert_eq!(e(read(8192, 1), &LIMITS), libc::EINVAL);
        assert_eq!(e(write(8192, 1), &LIMITS), libc::ENOSPC);
        assert_eq!(e(write(0, 1), &RO), libc::EROFS);
        assert_eq!(e(read(0, 8192), &LIMITS), libc::EINVAL);
    }

    /// A device counting its calls; `read` returns `short` bytes fewer
    /// than asked.
    #[derive(Default)]
    struct Counting {
        calls: AtomicUsize,
        short: usize,
    }

    impl BlockDevice for Counting {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_now(&self, _offset: u64, _buf: &mut [u8]) -> Option<io::Result<()>> {
            panic!("read_now panics");
        }
        async fn read(&self, _offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(vec![7; len as usize - self.short])
        }
        async fn write(&self, _offset: u64, _data: Vec<u8>, _fua: bool) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn flush(&self) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn empty_ranges_complete_without_the_device() {
        let dev = Counting::default();
        for r in [
            read(0, 0),
            write(0, 0),
            Request::Trim { offset: 0, len: 0 },
            Request::WriteZeroes {
                offset: 0,
                len: 0,
                fua: true,
            },
        ] {
            assert_eq!(block_on(execute(&dev, r, Vec::new())).unwrap(), b"");
        }
        assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
        block_on(execute(&dev, Request::Flush, Vec::new())).unwrap();
        assert_eq!(dev.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn short_device_reads_and_wrong_payloads_fail() {
        let dev = Counting {
            short: 1,
            ..Counting::default()
        };
        let e = block_on(execute(&dev, read(0, 4096), Vec::new())).unwrap_err();
        assert!(e.to_string().contains("4095 bytes"), "{e}");
        let e = block_on(execute(&dev, write(0, 4096), vec![0; 10])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(dev.calls.load(Ordering::SeqCst), 1, "only the read ran");
    }

    #[test]
    fn execute_reads_and_writes_the_device() {
        let dev = MemDevice::new(8192);
        block_on(execute(&dev, write(4096, 3), vec![1, 2, 3])).unwrap();
        let got = block_on(execute(&dev, read(4095, 5), Vec::new())).unwrap();
        assert_eq!(got, [0, 1, 2, 3, 0]);
        let wz = Request::WriteZeroes {
            offset: 4097,
            len: 1,
            fua: false,
        };
        block_on(execute(&dev, wz, Vec::new())).unwrap();
        assert_eq!(&dev.snapshot()[4096..4099], [1, 0, 3]);
    }

    #[test]
    fn read_now_serves_present_blocks_and_survives_a_panicking_device() {
        let dev = MemDevice::from_bytes((0..=255).collect());
        let mut buf = [0u8; 4];
        read_now(&dev, 10, &mut buf).unwrap().unwrap();
        assert_eq!(buf, [10, 11, 12, 13]);
        let e = read_now(&Counting::default(), 0, &mut buf)
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        assert!(read_now(&Counting::default(), 0, &mut []).unwrap().is_ok());
    }
}
