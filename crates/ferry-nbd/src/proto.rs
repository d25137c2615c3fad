//! NBD wire constants and the encoding/decoding of the fixed-size frames.
//!
//! Everything on the wire is big-endian. The values follow the NBD protocol
//! document (`doc/proto.md` of the reference implementation). Only the parts
//! of the protocol this server speaks are here: fixed newstyle negotiation,
//! the `INFO` extension (`NBD_OPT_INFO`, `NBD_OPT_GO`), `NBD_OPT_STARTTLS`
//! and simple replies.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and before every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts every simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;

// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub(crate) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

// Info types for NBD_OPT_INFO / NBD_OPT_GO.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Error numbers carried in simple replies.
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const ENOMEM: u32 = 12;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;

/// Largest READ/WRITE payload the server accepts (advertised as the
/// maximum block size).
pub(crate) const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Minimum block size advertised when the export size allows it.
pub(crate) const MIN_BLOCK: u32 = 512;
/// Largest option payload read during negotiation; longer ones end the
/// connection (names are at most 4096 bytes by the spec).
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Size of a transmission request header.
pub(crate) const REQUEST_LEN: usize = 28;

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) magic: u32,
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) handle: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Request {
    /// Decodes the 28-byte request header.
    pub(crate) fn decode(buf: &[u8; REQUEST_LEN]) -> Self {
        Self {
            magic: be_u32(&buf[0..4]),
            flags: be_u16(&buf[4..6]),
            kind: be_u16(&buf[6..8]),
            handle: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            len: be_u32(&buf[24..28]),
        }
    }
}

/// Encodes a simple reply header (16 bytes).
pub(crate) fn simple_reply_header(error: u32, handle: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Encodes an option reply: header followed by `data`.
pub(crate) fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Callers only pass small payloads (names, info records, messages).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Human-readable name of a command, for logs.
pub(crate) fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "UNKNOWN",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_round_trip() {
        let mut buf = [0u8; REQUEST_LEN];
        buf[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        buf[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        buf[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        buf[16..24].copy_from_slice(&4096u64.to_be_bytes());
        buf[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::decode(&buf);
        assert_eq!(
            r,
            Request {
                magic: REQUEST_MAGIC,
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                handle: 0x1122_3344_5566_7788,
                offset: 4096,
                len: 512,
            }
        );
    }

    #[test]
    fn reply_encodings() {
        let h = simple_reply_header(EINVAL, 7);
        assert_eq!(be_u32(&h[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&h[4..8]), 22);
        assert_eq!(be_u64(&h[8..16]), 7);
        let o = option_reply(OPT_GO, REP_ERR_UNSUP, b"no");
        assert_eq!(be_u64(&o[0..8]), OPT_REPLY_MAGIC);
        assert_eq!(be_u32(&o[8..12]), OPT_GO);
        assert_eq!(be_u32(&o[12..16]), 0x8000_0001);
        assert_eq!(be_u32(&o[16..20]), 2);
        assert_eq!(&o[20..], b"no");
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
    }
}
