//! Drivers shared by ferry's fuzz targets: an NBD session over an
//! in-memory pipe and a state file built, damaged and reopened through
//! the public `ferry_store` API (so the target survives format changes).
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::Geometry;
use ferry_device::MemDevice;
use ferry_nbd::{serve_connection, NbdServerConfig};
use ferry_store::state::{Pairing, Verified};
use ferry_store::{Backing, StateError, StateFile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the device behind the NBD server: small, so in-range reads and
/// writes are cheap, with an odd tail (not a multiple of 512).
pub const NBD_DEVICE_SIZE: u64 = 64 * 1024 + 100;

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs `f` on a current-thread tokio runtime made once per thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        });
        rt.block_on(f)
    })
}

/// Feeds `client_bytes` to an NBD server (`serve_connection` on a
/// [`MemDevice`]) as one client's byte stream, then ends the stream,
/// reading and discarding every reply meanwhile. Returns whether the
/// server ended without error. It must end: the input is finite.
pub fn nbd_session(client_bytes: &[u8], read_only: bool) -> bool {
    block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let device = Arc::new(MemDevice::new(NBD_DEVICE_SIZE));
        let config = NbdServerConfig {
            export_name: "ferry".into(),
            read_only,
            tls: None,
        };
        let (mut rx, mut tx) = tokio::io::split(client);
        let send = async move {
            // The server may hang up early (a protocol error): fine.
            let _ = tx.write_all(client_bytes).await;
            let _ = tx.shutdown().await;
            tx
        };
        let drain = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rx.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let serve = async move { serve_connection(server, device, &config).await };
        let (result, _tx, ()) = tokio::join!(serve, send, drain);
        result.is_ok()
    })
}

/// The client's side of a negotiation that picks the export with
/// `NBD_OPT_EXPORT_NAME` (the empty name) and no zero padding: what comes
/// after it is the transmission phase.
pub fn nbd_export_name_prelude() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    v.extend_from_slice(&0u32.to_be_bytes()); // empty name
    v
}

/// Reads fields off the front of the fuzzer's input; past its end every
/// field reads as zero.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` of the next bytes.
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// Where the state-file target makes its owner-only scratch directory:
/// `/dev/shm` when there is one (no disk syncs), else the temp dir.
fn scratch_base() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// The state-file target: a state file made by [`StateFile::create_on_boot`]
/// (bound to a backing file made beside it)
/// (or raw bytes), damaged as the input says, reopened with
/// [`StateFile::open_on_boot`]. An open that succeeds must give bitmaps and
/// recovered runs within the geometry, and the file must take a new
/// persist and reopen. [`StateFile::peek`] reads the header first, as a
/// resumed pull does.
///
/// Input: a flags byte (bit 0 raw file, 1 written bits, 2 truncation by
/// the high nibble, 3 another geometry, 4 another boot, 5 another source,
/// 6 recorded as verified), the geometry (disk size, chunk size), then either
/// the file's raw bytes (flag bit 0) or patches `(offset: u32, len: u8,
/// bytes)` to the created file, until the input ends.
pub fn state_file(data: &[u8]) {
    let mut inp = Input(data);
    let flags = inp.u8();
    // Up to 16 MiB of disk: bitmaps of up to a page or so each.
    let disk_size = u64::from(inp.u32() & 0x00ff_ffff);
    let chunk_size = 4096 * (1 + u32::from(inp.u8() & 0x1f));
    let geo = Geometry::new(disk_size, chunk_size);
    let id = [0x5a; 32];
    let dir = match tempfile::Builder::new()
        .prefix("ferry-fuzz-state")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(scratch_base())
    {
        Ok(d) => d,
        Err(e) => panic!("cannot make a scratch directory: {e}"),
    };
    let path = dir.path().join("state");
    // The backing file the state file is bound to (its pair id).
    let backing =
        Backing::create_unsynced(&dir.path().join("disk"), disk_size).expect("create the backing");
    let mut damaged = true;
    if flags & 1 != 0 {
        std::fs::write(&path, inp.0).expect("write the raw state file");
    } else {
        let pairing = Pairing::bind(&backing).expect("bind the backing");
        let mut s = StateFile::create_on_boot(&path, geo, id, pairing, "boot-a").expect("create");
        if flags & 2 != 0 {
            let blocks = geo.blocks();
            let start = u64::from(inp.u16()) % blocks.max(1);
            let end = (start + u64::from(inp.u8())).min(blocks);
            s.mark_written(start..end).expect("mark_written");
        }
        if flags & 64 != 0 {
            let v = Verified {
                disk_blake3: [0x33; 32],
                chunks_checked: geo.chunks(),
            };
            s.record_verified(v).expect("record_verified");
        }
        drop(s);
        let mut file = std::fs::read(&path).expect("read the state file");
        damaged = !inp.0.is_empty() || flags & 4 != 0;
        while !inp.0.is_empty() {
            let len = file.len().max(1);
            let at = inp.u32() as usize % len;
            let n = usize::from(inp.u8());
            let patch = inp.bytes(n);
            let end = (at + patch.len()).min(file.len());
            file[at..end].copy_from_slice(&patch[..end - at]);
        }
        if flags & 4 != 0 {
            let keep = file.len() * usize::from(flags >> 4) / 16;
            file.truncate(keep);
        }
        std::fs::write(&path, &file).expect("write the damaged state file");
    }
    let boot = if flags & 16 != 0 { "boot-b" } else { "boot-a" };
    // What a resumed pull reads first: the header alone. A header that
    // reads gives a geometry and source the file then opens with.
    if let Ok(h) = StateFile::peek(&path) {
        match StateFile::open_on_boot(&path, h.geometry, h.source_id, &backing, boot) {
            Ok(s) => assert_eq!(s.verified(), h.verified),
            // Damaged bitmaps are refused: only where the input damaged
            // the file.
            Err(StateError::Damaged { .. } | StateError::Invalid { .. }) if damaged => {}
            Err(e) => panic!("a file whose header peeks does not open with that header: {e}"),
        }
    }
    // Open with the same or another geometry and source, on the same or
    // another boot.
    let open_geo = if flags & 8 != 0 {
        Geometry::new(disk_size ^ 4096, chunk_size)
    } else {
        geo
    };
    let open_id = if flags & 32 != 0 { [0xa5; 32] } else { id };
    let Ok(mut s) = StateFile::open_on_boot(&path, open_geo, open_id, &backing, boot) else {
        return;
    };
    let blocks = open_geo.blocks();
    assert_eq!(s.present_bits(blocks).len() as u64, blocks);
    assert_eq!(
        s.guest_bits(open_geo.chunks()).len() as u64,
        open_geo.chunks()
    );
    for r in s.recovered_writes() {
        assert!(
            r.start < r.end && r.end <= blocks,
            "recovered {r:?} of {blocks} blocks"
        );
    }
    if blocks > 0 {
        let last = blocks - 1;
        s.persist(&ferry_core::SyncBatch {
            blocks: vec![last..blocks],
            guest_chunks: vec![open_geo.chunks() - 1],
        })
        .expect("persist");
        drop(s);
        let s = StateFile::open_on_boot(&path, open_geo, open_id, &backing, boot).expect("reopen");
        assert!(s.present_bits(blocks)[last as usize]);
    }
}
