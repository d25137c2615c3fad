//! The client's side of the NBD wire format: constants, request encoding,
//! and the reply parser as pure functions over bytes (no I/O), so the async
//! client and a fuzz target drive the same code.
//!
//! Every length a server sends is checked against what the request asked
//! before anything is allocated for it: a chunk's payload is bounded by
//! [`ReplyState::payload_len`] (a READ's data by the request's length, at
//! most [`MAX_READ_LEN`]; a BLOCK_STATUS chunk by [`MAX_EXTENTS_PER_REPLY`];
//! error messages by [`MAX_ERROR_MESSAGE`]), and a reply's chunk count by
//! [`MAX_CHUNKS_PER_REPLY`].

use std::collections::BTreeMap;

// Handshake.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options and option replies.
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server allows several connections to one export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Transmission.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(crate) const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

const REPLY_FLAG_DONE: u16 = 1 << 0;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_ERROR_BIT: u16 = 1 << 15;
const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT | 1;
const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT | 2;

/// Largest READ the client sends (and so the largest data chunk it
/// accepts): 32 MiB, the limit QEMU and nbdkit also use.
pub const MAX_READ_LEN: u32 = 32 * 1024 * 1024;
/// Most extents one BLOCK_STATUS reply may carry, over all its chunks
/// (QEMU sends at most 2^17 per context).
pub const MAX_EXTENTS_PER_REPLY: usize = 1 << 20;
/// Most chunks one reply may have.
pub const MAX_CHUNKS_PER_REPLY: usize = 1 << 17;
/// Longest error message accepted in an error chunk (the spec's limit for
/// strings).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// The commands this client can send. There is deliberately no WRITE,
/// WRITE_ZEROES, TRIM or FLUSH: the source is read-only to ferry, and a
/// request the client cannot encode is one it cannot send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Disc => 2,
            Command::BlockStatus => 7,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Read => "NBD READ",
            Command::Disc => "NBD DISC",
            Command::BlockStatus => "NBD BLOCK_STATUS",
        })
    }
}

/// Encodes a transmission request header (no payload: none of the
/// client's commands has one).
pub(crate) fn encode_request(
    cmd: Command,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // flags (bytes 4..6) stay 0
    out[6..8].copy_from_slice(&cmd.code().to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// A way the server's reply broke the protocol. After one, the connection
/// is not used again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A reply started with neither the simple nor the structured magic.
    #[error("reply magic {0:#010x} is neither simple nor structured")]
    BadMagic(u32),
    /// The bytes ended inside a reply (pure parser only).
    #[error("reply truncated: {needed} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed to go on.
        needed: usize,
        /// Bytes there.
        have: usize,
    },
    /// A reply named a handle with no request in flight.
    #[error("reply for handle {0}, which has no request in flight")]
    UnknownHandle(u64),
    /// A chunk type this request cannot have (or no known type at all).
    #[error("chunk type {kind} is not valid in a reply to {command}")]
    UnexpectedChunk {
        /// The chunk type.
        kind: u16,
        /// The request's command.
        command: Command,
    },
    /// A chunk whose length is impossible for its type and request.
    #[error("chunk type {kind} has length {length}, allowed {min}..={max}")]
    BadChunkLength {
        /// The chunk type.
        kind: u16,
        /// Its length.
        length: u32,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A data, hole or error range outside the request.
    #[error("chunk covers {offset}+{length}, outside the request {req_offset}+{req_len}")]
    OutsideRequest {
        /// Start of the chunk's range.
        offset: u64,
        /// Its length.
        length: u64,
        /// The request's offset.
        req_offset: u64,
        /// The request's length.
        req_len: u32,
    },
    /// Two chunks of one READ reply cover the same bytes.
    #[error("chunk at {offset}+{length} overlaps an earlier chunk of the same reply")]
    Overlap {
        /// Start of the chunk's range.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// A zero-length data or hole chunk, or a zero-length extent.
    #[error("zero-length {0}")]
    ZeroLength(&'static str),
    /// An error chunk whose message length does not match, or error 0.
    #[error("malformed error chunk: {0}")]
    BadErrorChunk(&'static str),
    /// `NBD_REPLY_TYPE_NONE` without the DONE flag, or a simple reply
    /// with no error to a command that needs a structured one.
    #[error("{0}")]
    BadTermination(&'static str),
    /// More chunks in one reply than [`MAX_CHUNKS_PER_REPLY`].
    #[error("more than {MAX_CHUNKS_PER_REPLY} chunks in one reply")]
    TooManyChunks,
    /// More extents in one reply than [`MAX_EXTENTS_PER_REPLY`].
    #[error("more than {MAX_EXTENTS_PER_REPLY} extents in one reply")]
    TooManyExtents,
    /// A BLOCK_STATUS chunk for a context id not negotiated.
    #[error("block status for context id {0}, which was not negotiated")]
    UnknownContext(u32),
    /// Two BLOCK_STATUS chunks for one context in one reply.
    #[error("two block status chunks for context id {0} in one reply")]
    DuplicateContext(u32),
    /// The request itself was longer than [`MAX_READ_LEN`] (a caller's
    /// error, caught before anything is sent).
    #[error("READ of {0} bytes is longer than the limit of {MAX_READ_LEN}")]
    ReadTooLong(u32),
    /// A READ reply ended (DONE, no error) without covering the request.
    #[error("READ reply ended with {covered} of {len} bytes covered")]
    IncompleteRead {
        /// Bytes covered by data and hole chunks.
        covered: u64,
        /// Bytes asked.
        len: u32,
    },
}

/// An error the server reported for one request (the connection stays
/// usable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The NBD error number (errno values: 1 EPERM, 5 EIO, 12 ENOMEM, 22
    /// EINVAL, 28 ENOSPC, 75 EOVERFLOW, 95 ENOTSUP, 108 ESHUTDOWN).
    pub errno: u32,
    /// The server's message (empty in a simple reply).
    pub message: String,
    /// Where the error is, when the server said (`NBD_REPLY_TYPE_ERROR_OFFSET`).
    pub offset: Option<u64>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.errno {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown error",
        };
        write!(f, "error {} ({name})", self.errno)?;
        if let Some(at) = self.offset {
            write!(f, " at offset {at}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// A decoded reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes; a READ's data follows it when `error` is 0).
    Simple {
        /// NBD error number, 0 for success.
        error: u32,
        /// The request's handle.
        handle: u64,
    },
    /// A structured reply chunk (20 bytes; `length` payload bytes follow).
    Chunk {
        /// Chunk flags (`NBD_REPLY_FLAG_DONE` = 1).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's handle.
        handle: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// The length of the header that starts with `magic` (its first four
    /// bytes).
    pub fn len_for_magic(magic: u32) -> Result<usize, WireError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_HEADER_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
            other => Err(WireError::BadMagic(other)),
        }
    }

    /// Decodes the header at the start of `buf`; returns it and its length.
    pub fn decode(buf: &[u8]) -> Result<(ReplyHeader, usize), WireError> {
        if buf.len() < 4 {
            return Err(WireError::Truncated {
                needed: 4,
                have: buf.len(),
            });
        }
        let n = Self::len_for_magic(be_u32(&buf[0..4]))?;
        if buf.len() < n {
            return Err(WireError::Truncated {
                needed: n,
                have: buf.len(),
            });
        }
        let h = if n == SIMPLE_HEADER_LEN {
            ReplyHeader::Simple {
                error: be_u32(&buf[4..8]),
                handle: be_u64(&buf[8..16]),
            }
        } else {
            ReplyHeader::Chunk {
                flags: be_u16(&buf[4..6]),
                kind: be_u16(&buf[6..8]),
                handle: be_u64(&buf[8..16]),
                length: be_u32(&buf[16..20]),
            }
        };
        Ok((h, n))
    }

    /// The handle the reply is for.
    pub fn handle(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Chunk { handle, .. } => handle,
        }
    }
}

/// What a request asked: what its reply is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestShape {
    /// A READ of `len` bytes (at most [`MAX_READ_LEN`]) at `offset`.
    Read {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// A BLOCK_STATUS of `len` bytes at `offset` on a connection that
    /// negotiated the meta contexts `contexts` (their ids).
    BlockStatus {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
        /// Negotiated context ids.
        contexts: Vec<u32>,
    },
}

impl RequestShape {
    fn command(&self) -> Command {
        match self {
            RequestShape::Read { .. } => Command::Read,
            RequestShape::BlockStatus { .. } => Command::BlockStatus,
        }
    }

    fn range(&self) -> (u64, u32) {
        match *self {
            RequestShape::Read { offset, len } | RequestShape::BlockStatus { offset, len, .. } => {
                (offset, len)
            }
        }
    }
}

/// One extent of a block status answer: `length` bytes at `offset` in the
/// state `flags` (meaning per context: [`crate::STATE_HOLE`],
/// [`crate::STATE_ZERO`], [`crate::STATE_DIRTY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start (bytes into the export).
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// State flags.
    pub flags: u32,
}

impl Extent {
    /// One past the end.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The extents of one context in a BLOCK_STATUS reply, clipped to the
/// request: contiguous from the request's offset (the server may describe
/// less than asked; never more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    /// The context id (as negotiated).
    pub context_id: u32,
    /// The extents, in order.
    pub extents: Vec<Extent>,
}

/// A complete, successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A READ's bytes (holes as zeros), exactly the length asked.
    Read(Vec<u8>),
    /// A BLOCK_STATUS's extents, per context that answered.
    BlockStatus(Vec<ContextExtents>),
}

/// Whether a reply needs more chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More chunks follow.
    More,
    /// The reply is complete: call [`ReplyState::finish`].
    Done,
}

#[derive(Debug)]
enum Body {
    Read {
        buf: Vec<u8>,
        /// Covered ranges, relative to the request: start -> end.
        covered: BTreeMap<u64, u64>,
        covered_bytes: u64,
    },
    Status {
        answers: Vec<ContextExtents>,
        extents: usize,
    },
}

/// The reply to one request as its chunks arrive: checks each against the
/// request and assembles the result.
#[derive(Debug)]
pub struct ReplyState {
    shape: RequestShape,
    chunks: usize,
    error: Option<ServerError>,
    body: Body,
}

impl ReplyState {
    /// Starts the reply to `shape`. A READ's buffer (zeros) is allocated
    /// here, by the request's own length; a READ longer than
    /// [`MAX_READ_LEN`] is refused.
    pub fn new(shape: RequestShape) -> Result<Self, WireError> {
        let body = match &shape {
            RequestShape::Read { len, .. } if *len > MAX_READ_LEN => {
                return Err(WireError::ReadTooLong(*len))
            }
            RequestShape::Read { len, .. } => Body::Read {
                buf: vec![0u8; *len as usize],
                covered: BTreeMap::new(),
                covered_bytes: 0,
            },
            RequestShape::BlockStatus { .. } => Body::Status {
                answers: Vec::new(),
                extents: 0,
            },
        };
        Ok(Self {
            shape,
            chunks: 0,
            error: None,
            body,
        })
    }

    /// How many payload bytes follow `header`, checked against the
    /// request's limits before anything is read or allocated.
    pub fn payload_len(&self, header: &ReplyHeader) -> Result<usize, WireError> {
        let command = self.shape.command();
        let (_, req_len) = self.shape.range();
        match *header {
            ReplyHeader::Simple { error, .. } => match (&self.shape, error) {
                (_, e) if e != 0 => Ok(0),
                (RequestShape::Read { .. }, _) => Ok(req_len as usize),
                (RequestShape::BlockStatus { .. }, _) => Err(WireError::BadTermination(
                    "simple reply without error to BLOCK_STATUS (needs structured chunks)",
                )),
            },
            ReplyHeader::Chunk { kind, length, .. } => {
                let (min, max) = match (kind, &self.shape) {
                    (CHUNK_NONE, _) => (0, 0),
                    (CHUNK_OFFSET_DATA, RequestShape::Read { len, .. }) => (9, 8 + *len as usize),
                    (CHUNK_OFFSET_HOLE, RequestShape::Read { .. }) => (12, 12),
                    (CHUNK_BLOCK_STATUS, RequestShape::BlockStatus { .. }) => {
                        (12, 4 + 8 * MAX_EXTENTS_PER_REPLY)
                    }
                    (CHUNK_ERROR, _) => (6, 6 + MAX_ERROR_MESSAGE),
                    (CHUNK_ERROR_OFFSET, _) => (14, 14 + MAX_ERROR_MESSAGE),
                    // Unknown error types: the spec has the client read
                    // them as an error (errno, message length, message).
                    (k, _) if k & CHUNK_ERROR_BIT != 0 => (6, 6 + MAX_ERROR_MESSAGE + 64),
                    (k, _) => return Err(WireError::UnexpectedChunk { kind: k, command }),
                };
                let l = length as usize;
                if l < min || l > max {
                    return Err(WireError::BadChunkLength {
                        kind,
                        length,
                        min,
                        max,
                    });
                }
                Ok(l)
            }
        }
    }

    /// Takes one chunk (its header and the [`payload_len`](Self::payload_len)
    /// bytes that followed it).
    pub fn apply(&mut self, header: &ReplyHeader, payload: &[u8]) -> Result<Step, WireError> {
        let want = self.payload_len(header)?;
        if payload.len() != want {
            return Err(WireError::Truncated {
                needed: want,
                have: payload.len(),
            });
        }
        self.chunks += 1;
        if self.chunks > MAX_CHUNKS_PER_REPLY {
            return Err(WireError::TooManyChunks);
        }
        let (req_offset, req_len) = self.shape.range();
        let outside = |offset: u64, length: u64| WireError::OutsideRequest {
            offset,
            length,
            req_offset,
            req_len,
        };
        match *header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    self.error.get_or_insert(ServerError {
                        errno: error,
                        message: String::new(),
                        offset: None,
                    });
                } else if let Body::Read {
                    buf, covered_bytes, ..
                } = &mut self.body
                {
                    buf.copy_from_slice(payload);
                    *covered_bytes = buf.len() as u64;
                }
                Ok(Step::Done)
            }
            ReplyHeader::Chunk { flags, kind, .. } => {
                let done = flags & REPLY_FLAG_DONE != 0;
                match kind {
                    CHUNK_NONE => {
                        if !done {
                            return Err(WireError::BadTermination(
                                "NBD_REPLY_TYPE_NONE without the DONE flag",
                            ));
                        }
                    }
                    CHUNK_OFFSET_DATA | CHUNK_OFFSET_HOLE => {
                        let at = be_u64(&payload[0..8]);
                        let n = if kind == CHUNK_OFFSET_DATA {
                            (payload.len() - 8) as u64
                        } else {
                            u64::from(be_u32(&payload[8..12]))
                        };
                        if n == 0 {
                            return Err(WireError::ZeroLength("hole chunk"));
                        }
                        let rel = at
                            .checked_sub(req_offset)
                            .filter(|r| r.checked_add(n).is_some_and(|e| e <= u64::from(req_len)))
                            .ok_or_else(|| outside(at, n))?;
                        let Body::Read {
                            buf,
                            covered,
                            covered_bytes,
                        } = &mut self.body
                        else {
                            return Err(WireError::UnexpectedChunk {
                                kind,
                                command: self.shape.command(),
                            });
                        };
                        let end = rel + n;
                        let before = covered.range(..end).next_back();
                        if before.is_some_and(|(_, e)| *e > rel) {
                            return Err(WireError::Overlap {
                                offset: at,
                                length: n,
                            });
                        }
                        covered.insert(rel, end);
                        *covered_bytes += n;
                        // rel + n <= req_len <= buf.len(): in bounds.
                        let dst = &mut buf[rel as usize..end as usize];
                        if kind == CHUNK_OFFSET_DATA {
                            dst.copy_from_slice(&payload[8..]);
                        } else {
                            dst.fill(0);
                        }
                    }
                    CHUNK_BLOCK_STATUS => {
                        let id = be_u32(&payload[0..4]);
                        let RequestShape::BlockStatus { contexts, .. } = &self.shape else {
                            return Err(WireError::UnexpectedChunk {
                                kind,
                                command: self.shape.command(),
                            });
                        };
                        if !contexts.contains(&id) {
                            return Err(WireError::UnknownContext(id));
                        }
                        let Body::Status { answers, extents } = &mut self.body else {
                            return Err(WireError::UnexpectedChunk {
                                kind,
                                command: self.shape.command(),
                            });
                        };
                        if answers.iter().any(|a| a.context_id == id) {
                            return Err(WireError::DuplicateContext(id));
                        }
                        let descs = &payload[4..];
                        if !descs.len().is_multiple_of(8) {
                            return Err(WireError::BadChunkLength {
                                kind,
                                length: payload.len() as u32,
                                min: 12,
                                max: 4 + 8 * MAX_EXTENTS_PER_REPLY,
                            });
                        }
                        *extents += descs.len() / 8;
                        if *extents > MAX_EXTENTS_PER_REPLY {
                            return Err(WireError::TooManyExtents);
                        }
                        let req_end = req_offset + u64::from(req_len);
                        let mut pos = req_offset;
                        let mut list = Vec::new();
                        for d in descs.chunks_exact(8) {
                            let length = u64::from(be_u32(&d[0..4]));
                            let flags = be_u32(&d[4..8]);
                            if length == 0 {
                                return Err(WireError::ZeroLength("extent"));
                            }
                            if pos >= req_end {
                                // Extents past the request (a server may
                                // describe beyond it): dropped.
                                break;
                            }
                            let length = length.min(req_end - pos);
                            list.push(Extent {
                                offset: pos,
                                length,
                                flags,
                            });
                            pos += length;
                        }
                        answers.push(ContextExtents {
                            context_id: id,
                            extents: list,
                        });
                    }
                    _ => {
                        // An error chunk (payload_len let only those pass).
                        let errno = be_u32(&payload[0..4]);
                        let mlen = usize::from(be_u16(&payload[4..6]));
                        let tail = if kind == CHUNK_ERROR_OFFSET { 8 } else { 0 };
                        let known = kind == CHUNK_ERROR || kind == CHUNK_ERROR_OFFSET;
                        if errno == 0 {
                            return Err(WireError::BadErrorChunk("error number 0"));
                        }
                        if 6 + mlen + tail > payload.len()
                            || (known && 6 + mlen + tail != payload.len())
                        {
                            return Err(WireError::BadErrorChunk(
                                "message length does not match the chunk length",
                            ));
                        }
                        let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
                        let offset = if kind == CHUNK_ERROR_OFFSET {
                            let at = be_u64(&payload[6 + mlen..]);
                            if at < req_offset || at >= req_offset + u64::from(req_len) {
                                return Err(outside(at, 1));
                            }
                            Some(at)
                        } else {
                            None
                        };
                        self.error.get_or_insert(ServerError {
                            errno,
                            message,
                            offset,
                        });
                    }
                }
                Ok(if done { Step::Done } else { Step::More })
            }
        }
    }

    /// The result once [`apply`](Self::apply) said [`Step::Done`]: the
    /// server's error if it sent one, else the data or extents.
    pub fn finish(self) -> Result<Result<Reply, ServerError>, WireError> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        Ok(Ok(match self.body {
            Body::Read {
                buf, covered_bytes, ..
            } => {
                let (_, len) = self.shape.range();
                if covered_bytes != u64::from(len) {
                    return Err(WireError::IncompleteRead {
                        covered: covered_bytes,
                        len,
                    });
                }
                Reply::Read(buf)
            }
            Body::Status { answers, .. } => Reply::BlockStatus(answers),
        }))
    }
}

/// Parses the complete reply to the request `shape` sent with `handle`
/// from the start of `bytes`: the same checks as the async client, over a
/// buffer (for tests and fuzzing). Returns the outcome and the number of
/// bytes the reply took.
pub fn parse_reply(
    shape: RequestShape,
    handle: u64,
    bytes: &[u8],
) -> Result<(Result<Reply, ServerError>, usize), WireError> {
    let mut state = ReplyState::new(shape)?;
    let mut at = 0usize;
    loop {
        let (header, n) = ReplyHeader::decode(&bytes[at..])?;
        if header.handle() != handle {
            return Err(WireError::UnknownHandle(header.handle()));
        }
        at += n;
        let len = state.payload_len(&header)?;
        let payload = bytes.get(at..at + len).ok_or(WireError::Truncated {
            needed: len,
            have: bytes.len() - at,
        })?;
        at += len;
        if state.apply(&header, payload)? == Step::Done {
            return Ok((state.finish()?, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn data(at: u64, bytes: &[u8]) -> Vec<u8> {
        let mut p = at.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        p
    }

    fn hole(at: u64, n: u32) -> Vec<u8> {
        let mut p = at.to_be_bytes().to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p
    }

    fn status(id: u32, ext: &[(u32, u32)]) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        for (l, f) in ext {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    const READ: RequestShape = RequestShape::Read {
        offset: 1000,
        len: 16,
    };

    #[test]
    fn read_assembles_out_of_order_data_and_holes() {
        let mut bytes = chunk(0, CHUNK_OFFSET_DATA, 5, &data(1008, &[7; 8]));
        bytes.extend(chunk(0, CHUNK_OFFSET_HOLE, 5, &hole(1004, 4)));
        bytes.extend(chunk(
            REPLY_FLAG_DONE,
            CHUNK_OFFSET_DATA,
            5,
            &data(1000, &[9; 4]),
        ));
        let (r, used) = parse_reply(READ, 5, &bytes).unwrap();
        assert_eq!(used, bytes.len());
        let mut want = vec![9u8; 4];
        want.extend([0; 4]);
        want.extend([7; 8]);
        assert_eq!(r, Ok(Reply::Read(want)));
    }

    #[test]
    fn read_refuses_overlap_gap_and_outside() {
        let mut b = chunk(0, CHUNK_OFFSET_DATA, 1, &data(1000, &[1; 8]));
        b.extend(chunk(
            REPLY_FLAG_DONE,
            CHUNK_OFFSET_HOLE,
            1,
            &hole(1004, 12),
        ));
        assert!(matches!(
            parse_reply(READ, 1, &b),
            Err(WireError::Overlap { offset: 1004, .. })
        ));
        let b = chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &data(1000, &[1; 8]));
        assert_eq!(
            parse_reply(READ, 1, &b),
            Err(WireError::IncompleteRead {
                covered: 8,
                len: 16
            })
        );
        let b = chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 1, &data(1010, &[1; 8]));
        assert!(matches!(
            parse_reply(READ, 1, &b),
            Err(WireError::OutsideRequest { offset: 1010, .. })
        ));
        let b = chunk(
            REPLY_FLAG_DONE,
            CHUNK_OFFSET_HOLE,
            1,
            &hole(u64::MAX - 2, 16),
        );
        assert!(matches!(
            parse_reply(READ, 1, &b),
            Err(WireError::OutsideRequest { .. })
        ));
        let b = chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            1,
            &status(1, &[(16, 0)]),
        );
        assert!(matches!(
            parse_reply(READ, 1, &b),
            Err(WireError::BadChunkLength { .. } | WireError::UnexpectedChunk { .. })
        ));
    }

    #[test]
    fn lengths_are_refused_before_the_payload() {
        // A header announcing 4 GiB of data, and nothing after it: refused
        // from the header alone.
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(REPLY_FLAG_DONE.to_be_bytes());
        b.extend(CHUNK_OFFSET_DATA.to_be_bytes());
        b.extend(1u64.to_be_bytes());
        b.extend(u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_reply(READ, 1, &b),
            Err(WireError::BadChunkLength {
                length: u32::MAX,
                ..
            })
        ));
        let shape = RequestShape::BlockStatus {
            offset: 0,
            len: 1 << 20,
            contexts: vec![1],
        };
        let mut b = b.clone();
        b[6..8].copy_from_slice(&CHUNK_BLOCK_STATUS.to_be_bytes());
        assert!(matches!(
            parse_reply(shape, 1, &b),
            Err(WireError::BadChunkLength { .. })
        ));
    }

    #[test]
    fn errors_are_reported_with_message_and_offset() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(4u16.to_be_bytes());
        p.extend(b"oops");
        p.extend(1004u64.to_be_bytes());
        let b = chunk(REPLY_FLAG_DONE, CHUNK_ERROR_OFFSET, 3, &p);
        let (r, _) = parse_reply(READ, 3, &b).unwrap();
        let e = r.unwrap_err();
        assert_eq!(
            e,
            ServerError {
                errno: 5,
                message: "oops".into(),
                offset: Some(1004)
            }
        );
        assert_eq!(e.to_string(), "error 5 (EIO) at offset 1004: oops");
        let mut bad = p.clone();
        bad[5] = 9;
        let b = chunk(REPLY_FLAG_DONE, CHUNK_ERROR_OFFSET, 3, &bad);
        assert!(matches!(
            parse_reply(READ, 3, &b),
            Err(WireError::BadErrorChunk(_))
        ));
        let mut simple = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        simple.extend(22u32.to_be_bytes());
        simple.extend(3u64.to_be_bytes());
        let (r, used) = parse_reply(READ, 3, &simple).unwrap();
        assert_eq!(used, 16);
        assert_eq!(r.unwrap_err().errno, 22);
    }

    #[test]
    fn block_status_clips_and_checks_contexts() {
        let shape = RequestShape::BlockStatus {
            offset: 4096,
            len: 100_000,
            contexts: vec![1, 2],
        };
        let mut b = chunk(
            0,
            CHUNK_BLOCK_STATUS,
            9,
            &status(2, &[(65536, 1), (65536, 0), (8, 1)]),
        );
        b.extend(chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            9,
            &status(1, &[(4096, 3)]),
        ));
        let (r, _) = parse_reply(shape.clone(), 9, &b).unwrap();
        assert_eq!(
            r,
            Ok(Reply::BlockStatus(vec![
                ContextExtents {
                    context_id: 2,
                    extents: vec![
                        Extent {
                            offset: 4096,
                            length: 65536,
                            flags: 1
                        },
                        Extent {
                            offset: 69632,
                            length: 100_000 - 65536,
                            flags: 0
                        },
                    ]
                },
                ContextExtents {
                    context_id: 1,
                    extents: vec![Extent {
                        offset: 4096,
                        length: 4096,
                        flags: 3
                    }]
                },
            ]))
        );
        let mut dup = chunk(0, CHUNK_BLOCK_STATUS, 9, &status(2, &[(1, 1)]));
        dup.extend(chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            9,
            &status(2, &[(1, 1)]),
        ));
        assert_eq!(
            parse_reply(shape.clone(), 9, &dup),
            Err(WireError::DuplicateContext(2))
        );
        let b = chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            9,
            &status(7, &[(1, 1)]),
        );
        assert_eq!(
            parse_reply(shape.clone(), 9, &b),
            Err(WireError::UnknownContext(7))
        );
        let b = chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            9,
            &status(1, &[(0, 1)]),
        );
        assert_eq!(
            parse_reply(shape.clone(), 9, &b),
            Err(WireError::ZeroLength("extent"))
        );
        let b = chunk(
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            8,
            &status(1, &[(1, 1)]),
        );
        assert_eq!(parse_reply(shape, 9, &b), Err(WireError::UnknownHandle(8)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for a fuzz target: every prefix and a few
        // mutations of valid replies.
        let mut b = chunk(0, CHUNK_OFFSET_DATA, 5, &data(1008, &[7; 8]));
        b.extend(chunk(REPLY_FLAG_DONE, CHUNK_OFFSET_HOLE, 5, &hole(1000, 8)));
        for cut in 0..b.len() {
            let _ = parse_reply(READ, 5, &b[..cut]);
            for bit in 0..8 {
                let mut m = b.clone();
                m[cut] ^= 1 << bit;
                let _ = parse_reply(READ, 5, &m);
                let _ = parse_reply(
                    RequestShape::BlockStatus {
                        offset: 0,
                        len: 16,
                        contexts: vec![0, 1],
                    },
                    5,
                    &m,
                );
            }
        }
    }

    #[test]
    fn requests_encode_only_read_disc_and_block_status() {
        let r = encode_request(Command::BlockStatus, 3, 1 << 40, 77);
        assert_eq!(be_u32(&r[0..4]), REQUEST_MAGIC);
        assert_eq!(be_u16(&r[4..6]), 0);
        assert_eq!(be_u16(&r[6..8]), 7);
        assert_eq!(be_u64(&r[8..16]), 3);
        assert_eq!(be_u64(&r[16..24]), 1 << 40);
        assert_eq!(be_u32(&r[24..28]), 77);
        assert_eq!(be_u16(&encode_request(Command::Read, 0, 0, 1)[6..8]), 0);
        assert_eq!(be_u16(&encode_request(Command::Disc, 0, 0, 0)[6..8]), 2);
    }
}
