//! Reading and writing [`wire`](crate::wire) frames on quinn streams.

use quinn::{RecvStream, SendStream, VarInt};

use crate::wire::{self, Message, WireError, HEADER_LEN};

/// Stream reset code: the server gave up on a response (shutting down).
pub(crate) const CODE_ABORTED: VarInt = VarInt::from_u32(1);
/// Stream stop/reset code: the peer sent a malformed frame.
pub(crate) const CODE_MALFORMED: VarInt = VarInt::from_u32(2);

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
