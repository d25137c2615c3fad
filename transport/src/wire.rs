//! The wire format: versioned, length-prefixed frames. Pure encode/decode,
//! no I/O, so it can be fuzzed.
//!
//! A frame is `len: u32 LE` (the length of what follows), `type: u8`, then a
//! type-specific payload, all integers little-endian. `len` is bounded by
//! [`MAX_FRAME_LEN`]; a reader checks the header (see [`frame_len`]) before
//! allocating.
//!
//! Exchanges:
//! - the source opens one unidirectional stream as soon as a destination
//!   connects and sends `Welcome { version, manifest_len, disk_size,
//!   chunk_size, source_id, live }` on it (0.5-RTT data: it leaves with the
//!   handshake; it is all an unauthenticated peer can learn);
//! - on its own bidirectional stream each: `GetManifest { complete }` →
//!   [`Message::ManifestBytes`] frames whose payloads, concatenated, are
//!   [`ferry_core::Manifest::encode`] of the manifest as the source knows it
//!   (at most `manifest_len` bytes; one frame for manifests up to
//!   [`MAX_MANIFEST_PART`], larger ones, e.g. the 512 MiB manifest of a
//!   1 TiB disk, are split). Since protocol 6 a manifest may list chunks
//!   the source has not hashed yet; with `complete` the source first
//!   hashes every one of them (it reads them: whole-disk work, asked for
//!   at verification);
//! - `Hello { version }` is what destinations of protocol 1 and 2 sent
//!   first; the source answers it with an `Error`
//!   ([`ErrorCode::VersionMismatch`]) naming both versions;
//! - once the source has checked the destination's certificate it sends
//!   `Path { lost_ppm, sent_packets }` on the Welcome stream (that first
//!   one says "you are accepted"), then again every
//!   [`PATH_REPORT_INTERVAL_MS`]: the share of its packets lost recently
//!   and how many packets it has sent in all, which the destination uses
//!   to decide whether to hedge on-demand reads (see `crate::path`);
//! - `Read { first_chunk, count, priority }` → one `Chunk` (or `ZChunk`,
//!   or `Zero`) frame per chunk in order, then the server finishes the
//!   stream; or an `Error` ([`ErrorCode::OutOfRange`],
//!   [`ErrorCode::SourceChanged`], …). A chunk frame carries the chunk's
//!   hash: the manifest's, or for an unhashed chunk the one the source
//!   computed as it read it (an unhashed chunk that reads as zeros is
//!   answered with `Zero`). Zero chunks never cross the wire. A request
//!   covers at most [`MAX_READ_BYTES`].
//! - pre-copy from a live source (protocol 7,
//!   docs/decisions/precopy-switchover.md): `Precopy { since }` on a
//!   bidirectional stream of its own subscribes to the source's change
//!   rounds: the source answers at once with the chunks written after
//!   generation `since`, then at the end of every round with changes, as
//!   `Changed { generation, more, ranges }` frames (`more` set on all but
//!   the last frame of one generation); the destination answers
//!   `Applied { generation }` once those chunks are durably absent.
//!   `Switchover { since }` on a stream of its own: the source freezes the
//!   disk it presents, bumps the generation and answers with the final
//!   `Changed` frames, then finishes the stream. A source that cannot tell
//!   what changed after `since` says `everything`.

use std::fmt;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 8;
/// How often the source sends a `Path` report, in ms.
pub const PATH_REPORT_INTERVAL_MS: u64 = 100;
/// Size of the frame header: `len: u32`.
pub const HEADER_LEN: usize = 4;
/// Largest payload of a chunk: 64 MiB (the largest chunk size a manifest
/// allows).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// Largest value of a frame's `len`: the payload plus the type byte and the
/// largest fixed fields (a `Chunk`'s index).
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD + 64;
/// Largest part of a manifest sent in one [`Message::ManifestBytes`] frame.
pub const MAX_MANIFEST_PART: usize = 16 * 1024 * 1024;
/// Largest number of chunk bytes one `Read` may ask for: 16 MiB.
pub const MAX_READ_BYTES: u64 = 16 * 1024 * 1024;
/// Largest message of an `Error` frame, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_MANIFEST: u8 = 3;
const T_READ: u8 = 4;
const T_CHUNK: u8 = 5;
const T_ERROR: u8 = 6;
const T_ZCHUNK: u8 = 7;
const T_GET_MANIFEST: u8 = 8;
const T_ZERO: u8 = 9;
const T_PATH: u8 = 10;
const T_PRECOPY: u8 = 11;
const T_CHANGED: u8 = 12;
const T_APPLIED: u8 = 13;
const T_SWITCHOVER: u8 = 14;

/// Largest number of chunk runs in one `Changed` frame (16 bytes each).
pub const MAX_CHANGED_RUNS: usize = 65536;
/// `Changed` flag: more frames of this generation follow.
const CHANGED_MORE: u8 = 1;
/// `Changed` flag: the source cannot tell what changed; every chunk may
/// have.
const CHANGED_EVERYTHING: u8 = 2;

/// Priority of a `Read`: guest reads overtake background copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A guest is waiting for this data.
    OnDemand,
    /// Background copy.
    Background,
    /// The second request of a hedged on-demand read (see
    /// `ferry_transport::path`): sent just below the first, so it does
    /// not slow the first answer down, and above everything else.
    Hedge,
}

impl Priority {
    /// Its name in log lines: `on-demand`, `background`, `hedge`.
    pub fn name(self) -> &'static str {
        match self {
            Priority::OnDemand => "on-demand",
            Priority::Background => "background",
            Priority::Hedge => "hedge",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Priority::OnDemand => 0,
            Priority::Background => 1,
            Priority::Hedge => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Priority::OnDemand),
            1 => Ok(Priority::Background),
            2 => Ok(Priority::Hedge),
            other => Err(WireError::BadPriority(other)),
        }
    }

    /// The quinn stream priority for this class (higher is sent first).
    pub fn stream_priority(self) -> i32 {
        match self {
            Priority::OnDemand => 100,
            Priority::Hedge => 99,
            Priority::Background => 0,
        }
    }
}

/// What an `Error` frame reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A `Read` covered a zero chunk: zero chunks never cross the wire.
    ZeroChunk,
    /// A `Read` went past the end of the disk.
    OutOfRange,
    /// A `Read` asked for more than [`MAX_READ_BYTES`].
    TooLarge,
    /// A frame could not be decoded.
    Malformed,
    /// A frame that is valid but not expected here.
    UnexpectedMessage,
    /// The source failed to read its disk.
    ReadFailed,
    /// The source's disk was changed (written, resized, opened for
    /// writing) by another process while it was served: its data can no
    /// longer be trusted, and every further read is refused.
    SourceChanged,
    /// A code this version does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::ZeroChunk => 2,
            ErrorCode::OutOfRange => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::Malformed => 5,
            ErrorCode::UnexpectedMessage => 6,
            ErrorCode::ReadFailed => 7,
            ErrorCode::SourceChanged => 8,
            ErrorCode::Unknown(v) => v,
        }
    }

    /// The code for a wire value; unknown values are kept.
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::ZeroChunk,
            3 => ErrorCode::OutOfRange,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::Malformed,
            6 => ErrorCode::UnexpectedMessage,
            7 => ErrorCode::ReadFailed,
            8 => ErrorCode::SourceChanged,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(v) => write!(f, "unknown error {v}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → server: the protocol version the client speaks.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u16,
    },
    /// Server → client: accepted. Says what the destination needs to serve
    /// the disk at once; the manifest is fetched separately
    /// ([`Message::GetManifest`]) while the disk is already in use.
    Welcome {
        /// [`PROTOCOL_VERSION`] of the server.
        version: u16,
        /// The largest length the encoded manifest can have (it grows as
        /// the source learns hashes).
        manifest_len: u64,
        /// Disk size in bytes.
        disk_size: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
        /// Identifies the source (a random id kept with the image while it
        /// is unchanged).
        source_id: [u8; 32],
        /// The source is live: a VM writes it through ferry (`ferry serve
        /// --present`) and it is not frozen yet, so only a destination
        /// that follows its changes (`Precopy`) may copy it (protocol 7).
        live: bool,
    },
    /// Client → server: send the manifest (as `ManifestBytes` frames).
    GetManifest {
        /// Hash every chunk not hashed yet first, so the manifest sent is
        /// complete (for verification).
        complete: bool,
    },
    /// Server → client: (a part of) the encoded manifest.
    ManifestBytes(Vec<u8>),
    /// Client → server: send chunks `first_chunk..first_chunk + count`.
    Read {
        /// First chunk.
        first_chunk: u64,
        /// Number of chunks.
        count: u32,
        /// Stream priority the response gets.
        priority: Priority,
    },
    /// Server → client: the bytes of one chunk.
    Chunk {
        /// Chunk index.
        index: u64,
        /// The BLAKE3 hash of the chunk: the manifest's, or for a chunk
        /// the manifest lists as unhashed the one computed as it was read
        /// (checked by the destination; lets it verify before the manifest
        /// has arrived).
        hash: [u8; 32],
        /// Its bytes (the last chunk of the disk may be short).
        data: Vec<u8>,
    },
    /// Server → client: the chunk holds only zeros (no bytes follow).
    Zero {
        /// Chunk index.
        index: u64,
    },
    /// Server → client: one chunk, compressed with zstd (sent instead of
    /// `Chunk` when that saves bytes on the wire).
    ZChunk {
        /// Chunk index.
        index: u64,
        /// The BLAKE3 hash of the (uncompressed) chunk, as for `Chunk`.
        hash: [u8; 32],
        /// Length of the chunk once decompressed.
        raw_len: u32,
        /// The zstd frame.
        data: Vec<u8>,
    },
    /// Server → client, on the Welcome stream: the client is accepted,
    /// and this share of the server's recently sent packets was lost.
    Path {
        /// Lost packets per million sent, over the last few seconds.
        lost_ppm: u32,
        /// Packets the server has sent on this connection (saturating):
        /// what the estimate can rest on.
        sent_packets: u32,
        /// Bytes of packets the server declared lost on this connection
        /// (and so sent again): real losses and, where the link reorders,
        /// spurious ones (protocol 8).
        lost_bytes: u64,
    },
    /// Client → server: subscribe to the change rounds of a live source,
    /// starting with every chunk written after generation `since`.
    Precopy {
        /// The last generation the destination applied (0: none).
        since: u64,
    },
    /// Server → client: chunks written at the source (runs of chunks).
    Changed {
        /// The generation these changes bring the destination to.
        generation: u64,
        /// More frames of this generation follow.
        more: bool,
        /// The source cannot tell what changed: every chunk may have
        /// (`ranges` is empty then).
        everything: bool,
        /// Runs of chunks, `(first, count)`, at most [`MAX_CHANGED_RUNS`].
        ranges: Vec<(u64, u64)>,
    },
    /// Client → server: the chunks of `generation` are durably absent.
    Applied {
        /// The generation applied.
        generation: u64,
    },
    /// Client → server: freeze the disk (the VM is paused) and send the
    /// final changes after generation `since`.
    Switchover {
        /// The last generation the destination applied.
        since: u64,
    },
    /// Either way: the request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// More bytes are needed: `needed` in total for this frame (or at least
    /// the header).
    #[error("frame truncated: have {have} bytes, need {needed}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The header announces a frame larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame must hold at least its type byte.
    #[error("empty frame")]
    Empty,
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The payload is shorter or longer than its type requires.
    #[error("frame type {kind}: payload of {len} bytes, expected {expected}")]
    BadLength {
        /// The frame type.
        kind: u8,
        /// The payload length.
        len: usize,
        /// What was expected.
        expected: &'static str,
    },
    /// Unknown priority value.
    #[error("unknown priority {0}")]
    BadPriority(u8),
    /// A yes/no field that is neither 0 nor 1.
    #[error("flag byte {0} is neither 0 nor 1")]
    BadFlag(u8),
    /// An error message that is not UTF-8.
    #[error("error message is not UTF-8")]
    BadUtf8,
}

impl Message {
    /// Encodes this message as one frame.
    ///
    /// # Panics
    /// If a payload exceeds the frame limit (a bug in the caller: the
    /// server never builds such frames).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 1 + self.payload_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends this message as one frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = 1 + self.payload_len();
        assert!(len <= MAX_FRAME_LEN, "frame of {len} bytes is too long");
        out.extend_from_slice(&(len as u32).to_le_bytes());
        match self {
            Message::Hello { version } => {
                out.push(T_HELLO);
                out.extend_from_slice(&version.to_le_bytes());
            }
            Message::Welcome {
                version,
                manifest_len,
                disk_size,
                chunk_size,
                source_id,
                live,
            } => {
                out.push(T_WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&manifest_len.to_le_bytes());
                out.extend_from_slice(&disk_size.to_le_bytes());
                out.extend_from_slice(&chunk_size.to_le_bytes());
                out.extend_from_slice(source_id);
                out.push(u8::from(*live));
            }
            Message::GetManifest { complete } => {
                out.push(T_GET_MANIFEST);
                out.push(u8::from(*complete));
            }
            Message::Zero { index } => {
                out.push(T_ZERO);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Message::ManifestBytes(b) => {
                out.push(T_MANIFEST);
                out.extend_from_slice(b);
            }
            Message::Read {
                first_chunk,
                count,
                priority,
            } => {
                out.push(T_READ);
                out.extend_from_slice(&first_chunk.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.push(priority.to_u8());
            }
            Message::Chunk { index, hash, data } => {
                out.extend_from_slice(&chunk_header(*index, hash, data.len())[HEADER_LEN..]);
                out.extend_from_slice(data);
            }
            Message::ZChunk {
                index,
                hash,
                raw_len,
                data,
            } => {
                out.push(T_ZCHUNK);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(hash);
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.extend_from_slice(data);
            }
            Message::Path {
                lost_ppm,
                sent_packets,
                lost_bytes,
            } => {
                out.push(T_PATH);
                out.extend_from_slice(&lost_ppm.to_le_bytes());
                out.extend_from_slice(&sent_packets.to_le_bytes());
                out.extend_from_slice(&lost_bytes.to_le_bytes());
            }
            Message::Precopy { since } => {
                out.push(T_PRECOPY);
                out.extend_from_slice(&since.to_le_bytes());
            }
            Message::Switchover { since } => {
                out.push(T_SWITCHOVER);
                out.extend_from_slice(&since.to_le_bytes());
            }
            Message::Applied { generation } => {
                out.push(T_APPLIED);
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Message::Changed {
                generation,
                more,
                everything,
                ranges,
            } => {
                out.push(T_CHANGED);
                out.extend_from_slice(&generation.to_le_bytes());
                let mut flags = 0;
                if *more {
                    flags |= CHANGED_MORE;
                }
                if *everything {
                    flags |= CHANGED_EVERYTHING;
                }
                out.push(flags);
                for (first, count) in ranges {
                    out.extend_from_slice(&first.to_le_bytes());
                    out.extend_from_slice(&count.to_le_bytes());
                }
            }
            Message::Error { code, message } => {
                out.push(T_ERROR);
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                out.extend_from_slice(truncate_utf8(message, MAX_ERROR_MESSAGE).as_bytes());
            }
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Message::Hello { .. } => 2,
            Message::Welcome { .. } => 55,
            Message::GetManifest { .. } => 1,
            Message::Zero { .. } => 8,
            Message::Path { .. } => 16,
            Message::Precopy { .. } | Message::Switchover { .. } | Message::Applied { .. } => 8,
            Message::Changed { ranges, .. } => 9 + 16 * ranges.len(),
            Message::ManifestBytes(b) => b.len(),
            Message::Read { .. } => 13,
            Message::Chunk { data, .. } => 40 + data.len(),
            Message::ZChunk { data, .. } => 44 + data.len(),
            Message::Error { message, .. } => 2 + truncate_utf8(message, MAX_ERROR_MESSAGE).len(),
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The header (length, type, index and hash) of a `Chunk` frame carrying
/// `data_len` bytes, so a sender can write the data without copying it into
/// a frame.
pub fn chunk_header(index: u64, hash: &[u8; 32], data_len: usize) -> [u8; HEADER_LEN + 41] {
    let mut h = [0u8; HEADER_LEN + 41];
    h[..4].copy_from_slice(&((1 + 40 + data_len) as u32).to_le_bytes());
    h[4] = T_CHUNK;
    h[5..13].copy_from_slice(&index.to_le_bytes());
    h[13..].copy_from_slice(hash);
    h
}

/// The frame length (`len`: the bytes after the header) announced by a
/// header, checked against `max` (at most [`MAX_FRAME_LEN`]).
pub fn frame_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    Ok(len)
}

/// Decodes one frame from the start of `buf`; returns the message and the
/// number of bytes it took. [`WireError::Truncated`] means more bytes are
/// needed.
pub fn decode(buf: &[u8]) -> Result<(Message, usize), WireError> {
    let header: [u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Truncated {
            have: buf.len(),
            needed: HEADER_LEN,
        })?;
    let len = frame_len(header, MAX_FRAME_LEN)?;
    let total = HEADER_LEN + len;
    let body = buf.get(HEADER_LEN..total).ok_or(WireError::Truncated {
        have: buf.len(),
        needed: total,
    })?;
    Ok((decode_body(body)?, total))
}

/// Like [`decode_body`], but takes the body by value so a `Chunk`'s data
/// reuses its allocation instead of being copied into a new one.
pub fn decode_body_owned(mut body: Vec<u8>) -> Result<Message, WireError> {
    if body.first() == Some(&T_CHUNK) && body.len() >= 41 && body.len() - 41 <= MAX_PAYLOAD {
        let index = u64::from_le_bytes(body[1..9].try_into().unwrap_or([0; 8]));
        let hash: [u8; 32] = body[9..41].try_into().unwrap_or([0; 32]);
        body.drain(..41);
        return Ok(Message::Chunk {
            index,
            hash,
            data: body,
        });
    }
    decode_body(&body)
}

/// Decodes the body of a frame (type byte and payload, without the header).
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let (&kind, p) = body.split_first().ok_or(WireError::Empty)?;
    let exact = |n: usize, expected: &'static str| {
        if p.len() == n {
            Ok(())
        } else {
            Err(WireError::BadLength {
                kind,
                len: p.len(),
                expected,
            })
        }
    };
    let u16_at = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
    match kind {
        T_HELLO => {
            exact(2, "2")?;
            Ok(Message::Hello { version: u16_at(0) })
        }
        T_WELCOME => {
            exact(55, "55")?;
            if p[54] > 1 {
                return Err(WireError::BadFlag(p[54]));
            }
            Ok(Message::Welcome {
                version: u16_at(0),
                manifest_len: u64_at(2),
                disk_size: u64_at(10),
                chunk_size: u32_at(18),
                source_id: p[22..54].try_into().unwrap_or([0; 32]),
                live: p[54] == 1,
            })
        }
        T_GET_MANIFEST => {
            exact(1, "1")?;
            match p[0] {
                0 | 1 => Ok(Message::GetManifest {
                    complete: p[0] == 1,
                }),
                other => Err(WireError::BadFlag(other)),
            }
        }
        T_ZERO => {
            exact(8, "8")?;
            Ok(Message::Zero { index: u64_at(0) })
        }
        T_PATH => {
            exact(16, "16")?;
            Ok(Message::Path {
                lost_ppm: u32_at(0),
                sent_packets: u32_at(4),
                lost_bytes: u64_at(8),
            })
        }
        T_PRECOPY => {
            exact(8, "8")?;
            Ok(Message::Precopy { since: u64_at(0) })
        }
        T_SWITCHOVER => {
            exact(8, "8")?;
            Ok(Message::Switchover { since: u64_at(0) })
        }
        T_APPLIED => {
            exact(8, "8")?;
            Ok(Message::Applied {
                generation: u64_at(0),
            })
        }
        T_CHANGED => {
            if p.len() < 9 || (p.len() - 9) % 16 != 0 || (p.len() - 9) / 16 > MAX_CHANGED_RUNS {
                return Err(WireError::BadLength {
                    kind,
                    len: p.len(),
                    expected: "9 + 16 per run, at most 65536 runs",
                });
            }
            let flags = p[8];
            if flags & !(CHANGED_MORE | CHANGED_EVERYTHING) != 0 {
                return Err(WireError::BadFlag(flags));
            }
            let ranges = p[9..]
                .chunks_exact(16)
                .map(|r| {
                    (
                        u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8])),
                        u64::from_le_bytes(r[8..].try_into().unwrap_or([0; 8])),
                    )
                })
                .collect();
            Ok(Message::Changed {
                generation: u64_at(0),
                more: flags & CHANGED_MORE != 0,
                everything: flags & CHANGED_EVERYTHING != 0,
                ranges,
            })
        }
        T_MANIFEST => {
            if p.len() > MAX_MANIFEST_PART {
                return Err(WireError::BadLength {
                    kind,
                    len: p.len(),
                    expected: "at most 16 MiB",
                });
            }
            Ok(Message::ManifestBytes(p.to_vec()))
        }
        T_READ => {
            exact(13, "13")?;
            Ok(Message::Read {
                first_chunk: u64_at(0),
                count: u32_at(8),
                priority: Priority::from_u8(p[12])?,
            })
        }
        T_CHUNK => {
            if p.len() < 40 || p.len() - 40 > MAX_PAYLOAD {
                return Err(WireError::BadLength {
                    kind,
                    len: p.len(),
                    expected: "40 + at most 64 MiB",
                });
            }
            Ok(Message::Chunk {
                index: u64_at(0),
                hash: p[8..40].try_into().unwrap_or([0; 32]),
                data: p[40..].to_vec(),
            })
        }
        T_ZCHUNK => {
            if p.len() < 44 || p.len() - 44 > MAX_PAYLOAD || u32_at(40) as usize > MAX_PAYLOAD {
                return Err(WireError::BadLength {
                    kind,
                    len: p.len(),
                    expected: "44 + at most 64 MiB, decompressing to at most 64 MiB",
                });
            }
            Ok(Message::ZChunk {
                index: u64_at(0),
                hash: p[8..40].try_into().unwrap_or([0; 32]),
                raw_len: u32_at(40),
                data: p[44..].to_vec(),
            })
        }
        T_ERROR => {
            if p.len() < 2 || p.len() - 2 > MAX_ERROR_MESSAGE {
                return Err(WireError::BadLength {
                    kind,
                    len: p.len(),
                    expected: "2 + at most 4096",
                });
            }
            let message = std::str::from_utf8(&p[2..])
                .map_err(|_| WireError::BadUtf8)?
                .to_string();
            Ok(Message::Error {
                code: ErrorCode::from_u16(u16_at(0)),
                message,
            })
        }
        other => Err(WireError::UnknownType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a tiny deterministic PRNG, so the fuzz test needs no
    /// extra dependency and failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn samples(rng: &mut Rng) -> Vec<Message> {
        let mut v = vec![
            Message::Hello { version: 1 },
            Message::Hello { version: u16::MAX },
            Message::Welcome {
                version: 1,
                manifest_len: u64::MAX,
                disk_size: 1 << 40,
                chunk_size: 65536,
                source_id: [7; 32],
                live: true,
            },
            Message::GetManifest { complete: false },
            Message::GetManifest { complete: true },
            Message::Zero { index: 77 },
            Message::Path {
                lost_ppm: 1234,
                sent_packets: u32::MAX,
                lost_bytes: u64::MAX - 1,
            },
            Message::ManifestBytes(vec![]),
            Message::ManifestBytes(rng.bytes(1000)),
            Message::Read {
                first_chunk: u64::MAX,
                count: u32::MAX,
                priority: Priority::Background,
            },
            Message::Read {
                first_chunk: 7,
                count: 3,
                priority: Priority::OnDemand,
            },
            Message::Read {
                first_chunk: 8,
                count: 1,
                priority: Priority::Hedge,
            },
            Message::Chunk {
                index: 42,
                hash: [3; 32],
                data: rng.bytes(65536),
            },
            Message::Chunk {
                index: 0,
                hash: [0; 32],
                data: vec![],
            },
            Message::ZChunk {
                index: 9,
                hash: [4; 32],
                raw_len: 65536,
                data: rng.bytes(100),
            },
            Message::Error {
                code: ErrorCode::Unknown(999),
                message: "héllo".into(),
            },
            Message::Precopy { since: 3 },
            Message::Switchover { since: u64::MAX },
            Message::Applied { generation: 9 },
            Message::Changed {
                generation: 4,
                more: true,
                everything: false,
                ranges: vec![(0, 1), (17, 300), (u64::MAX, 1)],
            },
            Message::Changed {
                generation: 5,
                more: false,
                everything: true,
                ranges: vec![],
            },
        ];
        for c in 1..=8 {
            v.push(Message::Error {
                code: ErrorCode::from_u16(c),
                message: format!("code {c}"),
            });
        }
        v
    }

    #[test]
    fn roundtrip_every_message() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let msgs = samples(&mut rng);
        let mut stream = Vec::new();
        for m in &msgs {
            let e = m.encode();
            let (d, used) = decode(&e).unwrap();
            assert_eq!(&d, m);
            assert_eq!(used, e.len());
            stream.extend_from_slice(&e);
        }
        // Back to back in one buffer.
        let mut pos = 0;
        for m in &msgs {
            let (d, used) = decode(&stream[pos..]).unwrap();
            assert_eq!(&d, m);
            pos += used;
        }
        assert_eq!(pos, stream.len());
        // Chunk header matches the full encoding.
        let e = Message::Chunk {
            index: 5,
            hash: [9; 32],
            data: vec![1, 2, 3],
        }
        .encode();
        assert_eq!(&e[..45], &chunk_header(5, &[9; 32], 3));
    }

    #[test]
    fn error_messages_are_truncated_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let m = Message::Error {
            code: ErrorCode::Malformed,
            message: long,
        };
        let (d, _) = decode(&m.encode()).unwrap();
        match d {
            Message::Error { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE),
            _ => panic!("not an error"),
        }
    }

    #[test]
    fn specific_rejections() {
        assert_eq!(
            decode(&[1, 0]),
            Err(WireError::Truncated { have: 2, needed: 4 })
        );
        assert_eq!(decode(&[0, 0, 0, 0]), Err(WireError::Empty));
        let huge = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(decode(&huge), Err(WireError::TooLong { .. })));
        assert_eq!(decode(&[1, 0, 0, 0, 99]), Err(WireError::UnknownType(99)));
        let mut read = Message::Read {
            first_chunk: 0,
            count: 1,
            priority: Priority::OnDemand,
        }
        .encode();
        *read.last_mut().unwrap() = 7;
        assert_eq!(decode(&read), Err(WireError::BadPriority(7)));
        let bad_utf8 = [4, 0, 0, 0, T_ERROR, 1, 0, 0xff];
        assert_eq!(decode(&bad_utf8), Err(WireError::BadUtf8));
    }

    /// Fuzz-style: random, truncated and mutated inputs never panic, and
    /// whatever decodes re-encodes to the same bytes.
    #[test]
    fn decode_never_panics() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let valid: Vec<Vec<u8>> = samples(&mut rng).iter().map(Message::encode).collect();
        let check = |bytes: &[u8]| {
            if let Ok((m, used)) = decode(bytes) {
                assert!(used <= bytes.len());
                assert_eq!(m.encode(), bytes[..used].to_vec(), "re-encode differs");
            }
            assert_eq!(decode_body_owned(bytes.to_vec()), decode_body(bytes));
        };
        for _ in 0..20_000 {
            // Pure noise, with a plausible header half of the time.
            let n = rng.below(64) as usize;
            let mut b = rng.bytes(n);
            if rng.below(2) == 0 && b.len() >= 5 {
                let len = (b.len() - 4) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
                b[4] = 1 + rng.below(14) as u8;
            }
            check(&b);
        }
        for v in &valid {
            // Every truncation.
            let step = (v.len() / 200).max(1);
            for cut in (0..v.len()).step_by(step) {
                assert!(decode(&v[..cut]).is_err(), "cut at {cut} decoded");
            }
            // Random mutations: flipped bytes, changed type/length.
            for _ in 0..500 {
                let mut m = v.clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(m.len().min(32) as u64) as usize;
                    m[i] ^= 1 << rng.below(8);
                }
                if rng.below(4) == 0 {
                    let extra = rng.below(8) as usize;
                    m.extend(rng.bytes(extra));
                }
                check(&m);
            }
        }
    }
}
