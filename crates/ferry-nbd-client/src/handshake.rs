//! Fixed newstyle negotiation from the client's side: structured replies,
//! meta contexts, then `NBD_OPT_GO` with the block size constraints.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::NbdClientError;
use crate::wire::*;

/// Longest option reply accepted (names and messages are at most 4096
/// bytes by the spec).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies accepted to one option.
const MAX_REPLIES_PER_OPTION: usize = 256;

/// The block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests must be aligned to this (offset and length).
    pub minimum: u32,
    /// Preferred request size.
    pub preferred: u32,
    /// Largest request payload.
    pub maximum: u32,
}

/// A negotiated meta context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Its id on this connection.
    pub id: u32,
    /// Its name (`base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub name: String,
}

/// What the negotiation learnt about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Transmission flags ([`FLAG_READ_ONLY`], [`FLAG_CAN_MULTI_CONN`], ...).
    pub flags: u16,
    /// Block size constraints, when the server sent them.
    pub block_size: Option<BlockSize>,
    /// Whether replies are structured.
    pub structured_replies: bool,
    /// The meta contexts negotiated, in the order asked.
    pub contexts: Vec<MetaContext>,
}

impl ExportInfo {
    /// The alignment requests must have (1 when the server gave none).
    pub fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |b| b.minimum.max(1))
    }
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

fn io_err(during: &'static str) -> impl FnOnce(std::io::Error) -> NbdClientError {
    move |source| NbdClientError::HandshakeIo { during, source }
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), NbdClientError> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    let len = u32::try_from(data.len())
        .map_err(|_| NbdClientError::Handshake("option payload too long".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
        .await
        .map_err(io_err("sending an option"))?;
    s.flush().await.map_err(io_err("sending an option"))
}

async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<OptReply, NbdClientError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .await
        .map_err(io_err("reading an option reply"))?;
    if be_u64(&h[0..8]) != OPT_REPLY_MAGIC {
        return Err(NbdClientError::Handshake(format!(
            "option reply magic {:#x}",
            be_u64(&h[0..8])
        )));
    }
    if be_u32(&h[8..12]) != option {
        return Err(NbdClientError::Handshake(format!(
            "reply for option {} while option {option} was asked",
            be_u32(&h[8..12])
        )));
    }
    let kind = be_u32(&h[12..16]);
    let len = be_u32(&h[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(NbdClientError::Handshake(format!(
            "option reply of {len} bytes (limit {MAX_OPTION_REPLY})"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(io_err("reading an option reply"))?;
    Ok(OptReply { kind, data })
}

fn refused(option: &'static str, export: &str, r: &OptReply) -> NbdClientError {
    let message = String::from_utf8_lossy(&r.data).into_owned();
    match r.kind {
        REP_ERR_TLS_REQD => NbdClientError::TlsRequired {
            export: export.into(),
            message,
        },
        REP_ERR_UNKNOWN => NbdClientError::NoSuchExport {
            export: export.into(),
            message,
        },
        kind => NbdClientError::OptionRefused {
            option,
            export: export.into(),
            reply: kind,
            message,
        },
    }
}

fn name_bytes(export: &str) -> Result<Vec<u8>, NbdClientError> {
    if export.len() > 4096 {
        return Err(NbdClientError::Handshake(format!(
            "export name of {} bytes (limit 4096)",
            export.len()
        )));
    }
    let mut v = (export.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(export.as_bytes());
    Ok(v)
}

/// Negotiates `export` on `s` (a fresh connection): fixed newstyle,
/// structured replies, the meta `contexts` (each must be offered) and GO.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    contexts: &[String],
) -> Result<ExportInfo, NbdClientError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)
        .await
        .map_err(io_err("reading the server's greeting"))?;
    if be_u64(&hello[0..8]) != NBDMAGIC || be_u64(&hello[8..16]) != IHAVEOPT {
        return Err(NbdClientError::Handshake(
            "greeting is not NBDMAGIC IHAVEOPT (an oldstyle or non-NBD server)".into(),
        ));
    }
    let server_flags = be_u16(&hello[16..18]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::Handshake(
            "server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())
        .await
        .map_err(io_err("sending the client flags"))?;

    let result = negotiate_options(s, export, contexts).await;
    if result.is_err() {
        // Best effort: tell the server we leave (it may already be gone).
        let _ = send_option(s, OPT_ABORT, &[]).await;
    }
    result
}

async fn negotiate_options<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    contexts: &[String],
) -> Result<ExportInfo, NbdClientError> {
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let r = read_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured_replies = match r.kind {
        REP_ACK => true,
        k if k & REP_FLAG_ERROR != 0 && contexts.is_empty() => false,
        k if k & REP_FLAG_ERROR != 0 => {
            return Err(refused("NBD_OPT_STRUCTURED_REPLY", export, &r));
        }
        k => {
            return Err(NbdClientError::Handshake(format!(
                "reply type {k} to NBD_OPT_STRUCTURED_REPLY"
            )))
        }
    };

    let mut negotiated = Vec::new();
    if !contexts.is_empty() {
        let mut data = name_bytes(export)?;
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            if c.len() > 4096 {
                return Err(NbdClientError::Handshake(format!(
                    "meta context name of {} bytes (limit 4096)",
                    c.len()
                )));
            }
            data.extend_from_slice(&(c.len() as u32).to_be_bytes());
            data.extend_from_slice(c.as_bytes());
        }
        send_option(s, OPT_SET_META_CONTEXT, &data).await?;
        let mut offered: Vec<MetaContext> = Vec::new();
        for n in 0.. {
            if n == MAX_REPLIES_PER_OPTION {
                return Err(NbdClientError::Handshake(format!(
                    "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_SET_META_CONTEXT"
                )));
            }
            let r = read_reply(s, OPT_SET_META_CONTEXT).await?;
            match r.kind {
                REP_ACK => break,
                REP_META_CONTEXT if r.data.len() >= 4 => {
                    let id = be_u32(&r.data[0..4]);
                    let name = String::from_utf8_lossy(&r.data[4..]).into_owned();
                    offered.push(MetaContext { id, name });
                }
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(refused("NBD_OPT_SET_META_CONTEXT", export, &r))
                }
                k => {
                    return Err(NbdClientError::Handshake(format!(
                        "reply type {k} ({} bytes) to NBD_OPT_SET_META_CONTEXT",
                        r.data.len()
                    )))
                }
            }
        }
        for c in contexts {
            match offered.iter().find(|m| &m.name == c) {
                Some(m) => negotiated.push(m.clone()),
                None => {
                    return Err(NbdClientError::MetaContextNotOffered {
                        export: export.into(),
                        context: c.clone(),
                        offered: offered.into_iter().map(|m| m.name).collect(),
                    })
                }
            }
        }
    }

    let mut data = name_bytes(export)?;
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data).await?;
    let mut size_flags = None;
    let mut block_size = None;
    for n in 0.. {
        if n == MAX_REPLIES_PER_OPTION {
            return Err(NbdClientError::Handshake(format!(
                "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_GO"
            )));
        }
        let r = read_reply(s, OPT_GO).await?;
        match r.kind {
            REP_ACK => break,
            REP_INFO if r.data.len() >= 2 => match be_u16(&r.data[0..2]) {
                INFO_EXPORT if r.data.len() == 12 => {
                    size_flags = Some((be_u64(&r.data[2..10]), be_u16(&r.data[10..12])));
                }
                INFO_BLOCK_SIZE if r.data.len() == 14 => {
                    let b = BlockSize {
                        minimum: be_u32(&r.data[2..6]),
                        preferred: be_u32(&r.data[6..10]),
                        maximum: be_u32(&r.data[10..14]),
                    };
                    if !b.minimum.is_power_of_two() || b.minimum > 64 * 1024 {
                        return Err(NbdClientError::Handshake(format!(
                            "minimum block size {} is not a power of two up to 64 KiB",
                            b.minimum
                        )));
                    }
                    block_size = Some(b);
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => {
                    return Err(NbdClientError::Handshake(format!(
                        "NBD_INFO record of {} bytes for its type",
                        r.data.len()
                    )))
                }
                _ => {} // other information: not needed
            },
            k if k & REP_FLAG_ERROR != 0 => return Err(refused("NBD_OPT_GO", export, &r)),
            k => {
                return Err(NbdClientError::Handshake(format!(
                    "reply type {k} ({} bytes) to NBD_OPT_GO",
                    r.data.len()
                )))
            }
        }
    }
    let Some((size, flags)) = size_flags else {
        return Err(NbdClientError::Handshake(
            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
        ));
    };
    Ok(ExportInfo {
        name: export.into(),
        size,
        flags,
        block_size,
        structured_replies,
        contexts: negotiated,
    })
}
