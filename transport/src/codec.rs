//! Framing and compression, for both ends: [`wire`] frames read from and
//! written to quinn streams, chunk frames built (zstd when it pays) and
//! opened (decompressed), each thread with its own zstd context.

use std::cell::RefCell;

use quinn::{RecvStream, SendStream, VarInt};

use crate::wire::{self, Message, WireError, HEADER_LEN};

/// Stream reset code: the server gave up on a response (shutting down).
pub(crate) const CODE_ABORTED: VarInt = VarInt::from_u32(1);
/// Stream stop/reset code: the peer sent a malformed frame.
pub(crate) const CODE_MALFORMED: VarInt = VarInt::from_u32(2);

/// Largest frame expected where no chunk can come (Welcome, Path, Error).
pub(crate) const SMALL_FRAME: usize = wire::MAX_ERROR_MESSAGE + 64;

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum ReadFail {
    /// The stream or connection failed.
    Stream(quinn::ReadError),
    /// The bytes are not a valid frame (including a stream that ended
    /// inside a frame).
    Wire(WireError),
}

/// Reads one frame of at most `max` bytes after the header. `Ok(None)`: the
/// peer finished the stream at a frame boundary.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<Message>, ReadFail> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(ReadFail::Wire(WireError::Truncated {
                have: n,
                needed: HEADER_LEN,
            }))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(ReadFail::Stream(e)),
    }
    let len = wire::frame_len(header, max).map_err(ReadFail::Wire)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(ReadFail::Wire(WireError::Truncated {
                have: HEADER_LEN + n,
                needed: HEADER_LEN + len,
            }))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(ReadFail::Stream(e)),
    }
    wire::decode_body_owned(body)
        .map(Some)
        .map_err(ReadFail::Wire)
}

/// Writes one message as a frame.
pub(crate) async fn write_msg(
    send: &mut SendStream,
    msg: &Message,
) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.encode()).await
}

/// The name of a message's frame type, for error messages.
pub(crate) fn frame_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::ManifestBytes(_) => "ManifestBytes",
        Message::Read { .. } => "Read",
        Message::Chunk { .. } => "Chunk",
        Message::ZChunk { .. } => "ZChunk",
        Message::Zero { .. } => "Zero",
        Message::GetManifest { .. } => "GetManifest",
        Message::Path { .. } => "Path",
        Message::Precopy { .. } => "Precopy",
        Message::Changed { .. } => "Changed",
        Message::Applied { .. } => "Applied",
        Message::Switchover { .. } => "Switchover",
        Message::Error { .. } => "Error",
    }
}

/// The whole frame carrying chunk `index`: a `ZChunk` when zstd saves at
/// least 3% of the bytes, else a plain `Chunk`.
pub(crate) fn chunk_frame(index: u64, hash: [u8; 32], data: &[u8], compress: bool) -> Vec<u8> {
    if compress && !data.is_empty() {
        if let Some(z) = zstd_level_1(data) {
            if z.len() + 4 < data.len() - data.len() / 33 {
                return Message::ZChunk {
                    index,
                    hash,
                    raw_len: data.len() as u32,
                    data: z,
                }
                .encode();
            }
        }
    }
    let mut frame = Vec::with_capacity(data.len() + 45);
    frame.extend_from_slice(&wire::chunk_header(index, &hash, data.len()));
    frame.extend_from_slice(data);
    frame
}

/// A chunk frame opened: its index, the manifest's hash and the chunk's
/// bytes (decompressed; not yet checked against the hash).
pub(crate) struct OpenedChunk {
    /// The chunk's index.
    pub index: u64,
    /// The manifest's hash of the chunk.
    pub hash: [u8; 32],
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// Opens a `Chunk` or `ZChunk` frame. A `ZChunk` must claim `raw_len`
/// bytes (the chunk's length; `None`: no length is right) before it is
/// decompressed into at most that many. `Err` says why, naming the chunk.
pub(crate) fn open_chunk(m: Message, raw_len: Option<u32>) -> Result<OpenedChunk, String> {
    match m {
        Message::Chunk { index, hash, data } => Ok(OpenedChunk { index, hash, data }),
        Message::ZChunk {
            index,
            hash,
            raw_len: claimed,
            data,
        } => {
            if raw_len != Some(claimed) {
                return Err(format!("compressed chunk {index} claims {claimed} bytes"));
            }
            let data = unzstd(&data, claimed as usize)
                .map_err(|e| format!("chunk {index} does not decompress: {e}"))?;
            Ok(OpenedChunk { index, hash, data })
        }
        other => Err(format!("unexpected {} frame", frame_name(&other))),
    }
}

thread_local! {
    /// This thread's zstd compression context, made on its first chunk and
    /// kept: the source reads and compresses chunks on a few long-lived
    /// threads, and a context made for every 64 KiB chunk costs an
    /// allocation and its set-up each time.
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// This thread's zstd decompression context, made on its first
    /// compressed chunk and kept (the destination's few runtime worker
    /// threads decompress every chunk).
    static UNZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` compressed with zstd at level 1, on this thread's context;
/// `None` when zstd fails (the chunk is then sent as it is).
fn zstd_level_1(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = zstd::bulk::Compressor::new(1).ok();
        }
        z.as_mut()?.compress(data).ok()
    })
}

/// `data` decompressed with this thread's zstd context into at most
/// `capacity` bytes.
fn unzstd(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    UNZSTD.with(|z| {
        let mut z = z.borrow_mut();
        let d = match z.as_mut() {
            Some(d) => d,
            None => z.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(data, capacity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(frame: &[u8], raw_len: Option<u32>) -> Result<OpenedChunk, String> {
        let (m, used) = wire::decode(frame).expect("a valid frame");
        assert_eq!(used, frame.len());
        open_chunk(m, raw_len)
    }

    #[test]
    fn chunk_frames_round_trip_compressed_or_not() {
        let hash = [7; 32];
        let text: Vec<u8> = b"ferry moves disks ".repeat(4000);
        // Bytes zstd cannot shrink: BLAKE3's output stream.
        let mut noise = vec![0u8; 65536];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut noise);
        for (data, compress, zstd) in [
            (&text, true, true),
            (&text, false, false),
            (&noise, true, false),
        ] {
            let frame = chunk_frame(3, hash, data, compress);
            let (m, _) = wire::decode(&frame).expect("a valid frame");
            assert_eq!(matches!(m, Message::ZChunk { .. }), zstd);
            let c = open(&frame, Some(data.len() as u32)).expect("opens");
            assert_eq!((c.index, c.hash), (3, hash));
            assert_eq!(&c.data, data);
        }
    }

    #[test]
    fn a_compressed_chunk_must_claim_its_length() {
        let text: Vec<u8> = b"ferry ".repeat(10_000);
        let frame = chunk_frame(9, [0; 32], &text, true);
        let short = open(&frame, Some(100)).err().expect("refused");
        assert!(
            short.contains("compressed chunk 9 claims 60000 bytes"),
            "{short}"
        );
        assert!(open(&frame, None).is_err());
        let bad = Message::ZChunk {
            index: 4,
            hash: [0; 32],
            raw_len: 10,
            data: vec![1, 2, 3],
        };
        let e = open_chunk(bad, Some(10)).err().expect("refused");
        assert!(e.contains("chunk 4 does not decompress"), "{e}");
        let e = open_chunk(Message::Zero { index: 1 }, Some(10))
            .err()
            .expect("refused");
        assert!(e.contains("unexpected Zero frame"), "{e}");
    }
}
