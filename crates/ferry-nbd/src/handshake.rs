//! Fixed newstyle negotiation: from the greeting to the transmission phase.
//!
//! The server greets with `NBDMAGIC`, `IHAVEOPT` and its handshake flags,
//! reads the client flags, then answers options until the client picks the
//! export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or misbehaves.
//! Option errors the client can recover from get an error reply; framing
//! errors (bad magic, absurd lengths, unknown client flags) end the
//! connection with an [`NbdError::Protocol`]. A server with TLS requires
//! `NBD_OPT_STARTTLS` before anything else and goes on over TLS.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::proto::*;
use crate::tls::{MaybeTls, NbdTls};
use crate::NbdError;

/// What the export looks like to the client.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    /// Name the export is configured under (the empty name is also accepted).
    pub(crate) name: String,
    /// Size in bytes.
    pub(crate) size: u64,
    /// Preferred block size of the device.
    pub(crate) block_size: u32,
    /// Whether writes are refused.
    pub(crate) read_only: bool,
}

impl ExportInfo {
    /// Transmission flags advertised for this export.
    pub(crate) fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        flags
    }

    /// (minimum, preferred, maximum) block sizes advertised.
    pub(crate) fn block_sizes(&self) -> (u32, u32, u32) {
        // A tail shorter than the minimum would be unreachable for a client
        // honouring it, so only advertise 512 when the size is a multiple
        // (MIN_BLOCK is a power of two).
        let min = if self.size & u64::from(MIN_BLOCK - 1) == 0 {
            MIN_BLOCK
        } else {
            1
        };
        let preferred = if self.block_size.is_power_of_two() {
            self.block_size.clamp(MIN_BLOCK, MAX_PAYLOAD)
        } else {
            4096
        };
        (min, preferred, MAX_PAYLOAD)
    }

    fn accepts(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn description(&self) -> String {
        format!("ferry export {:?}", self.name)
    }
}

/// How negotiation ended without error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client chose the export: start transmission.
    Transmission,
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// Reads one option request: its number and its data.
async fn read_option<S>(stream: &mut S) -> Result<(u32, Vec<u8>), NbdError>
where
    S: AsyncRead + Unpin,
{
    let magic = stream.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!(
            "bad option magic {magic:#018x}"
        )));
    }
    let option = stream.read_u32().await?;
    let len = stream.read_u32().await?;
    if len > MAX_OPTION_LEN {
        return Err(NbdError::Protocol(format!(
            "option {option} has absurd length {len}"
        )));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await?;
    debug!(option, len, "option");
    Ok((option, data))
}

/// Runs the negotiation on `stream`. With `tls`, the client must upgrade
/// with `NBD_OPT_STARTTLS` first (the spec's FORCEDTLS mode): the options
/// then go on over TLS, and the returned stream is the TLS one.
pub(crate) async fn negotiate<S>(
    mut stream: S,
    export: &ExportInfo,
    tls: Option<&NbdTls>,
) -> Result<(Outcome, MaybeTls<S>), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut stream = match tls {
        None => MaybeTls::Plain(stream),
        Some(tls) => {
            if !until_starttls(&mut stream).await? {
                return Ok((Outcome::Aborted, MaybeTls::Plain(stream)));
            }
            let tls_stream = tls
                .acceptor()
                .accept(stream)
                .await
                .map_err(|source| NbdError::TlsHandshake { source })?;
            debug!("TLS established");
            MaybeTls::Tls(Box::new(tls_stream))
        }
    };
    let outcome = options(&mut stream, export, no_zeroes, tls.is_some()).await?;
    Ok((outcome, stream))
}

/// Option haggling before TLS, when TLS is required: every option but
/// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
/// `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` (which has no error
/// reply) ends the connection. Returns true once `NBD_OPT_STARTTLS` is
/// acknowledged (the TLS handshake comes next), false on `NBD_OPT_ABORT`.
async fn until_starttls<S>(stream: &mut S) -> Result<bool, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Logged once per connection, so a client cannot flood the log.
    let mut warned = false;
    loop {
        let (option, data) = read_option(stream).await?;
        match option {
            OPT_STARTTLS if data.is_empty() => {
                stream
                    .write_all(&option_reply(option, REP_ACK, &[]))
                    .await?;
                stream.flush().await?;
                return Ok(true);
            }
            OPT_STARTTLS => {
                send_error(
                    stream,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                )
                .await?;
            }
            OPT_ABORT => {
                let _ = stream.write_all(&option_reply(option, REP_ACK, &[])).await;
                let _ = stream.flush().await;
                return Ok(false);
            }
            OPT_EXPORT_NAME => {
                return Err(NbdError::Protocol(
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, but this server requires \
                     TLS (a client without TLS credentials?)"
                        .into(),
                ));
            }
            _ => {
                if !warned {
                    warned = true;
                    warn!(
                        option,
                        "refused an option sent before NBD_OPT_STARTTLS: this server requires \
                         TLS (a client without TLS credentials?)"
                    );
                }
                send_error(
                    stream,
                    option,
                    REP_ERR_TLS_REQD,
                    "this server requires TLS: negotiate NBD_OPT_STARTTLS first",
                )
                .await?;
            }
        }
        stream.flush().await?;
    }
}

/// Option haggling until the client picks the export or aborts; over TLS
/// when `tls_active`.
async fn options<S>(
    stream: &mut S,
    export: &ExportInfo,
    no_zeroes: bool,
    tls_active: bool,
) -> Result<Outcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let (option, data) = read_option(stream).await?;
        match option {
            OPT_EXPORT_NAME => {
                if !export.accepts(&data) {
                    return Err(NbdError::Protocol(format!(
                        "unknown export {:?} requested with NBD_OPT_EXPORT_NAME",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Outcome::Transmission);
            }
            OPT_ABORT => {
                // The client may already have gone; a failed ACK is fine.
                let _ = stream.write_all(&option_reply(option, REP_ACK, &[])).await;
                let _ = stream.flush().await;
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let name = export.name.as_bytes();
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name);
                    let mut out = option_reply(option, REP_SERVER, &entry);
                    out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                    stream.write_all(&out).await?;
                } else {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )
                    .await?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(msg) => send_error(stream, option, REP_ERR_INVALID, msg).await?,
                Ok((name, _)) if !export.accepts(name) => {
                    let msg = format!("unknown export {:?}", String::from_utf8_lossy(name));
                    send_error(stream, option, REP_ERR_UNKNOWN, &msg).await?;
                }
                Ok((_, requested)) => {
                    stream
                        .write_all(&info_replies(option, export, &requested))
                        .await?;
                    if option == OPT_GO {
                        stream.flush().await?;
                        return Ok(Outcome::Transmission);
                    }
                }
            },
            OPT_STARTTLS if tls_active => {
                send_error(stream, option, REP_ERR_INVALID, "TLS is already in use").await?;
            }
            OPT_STARTTLS => {
                send_error(
                    stream,
                    option,
                    REP_ERR_POLICY,
                    "TLS is not configured on this server",
                )
                .await?;
            }
            _ => {
                // Includes NBD_OPT_STRUCTURED_REPLY: this server sends
                // simple replies only.
                send_error(stream, option, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
        stream.flush().await?;
    }
}

async fn send_error<S>(stream: &mut S, option: u32, reply: u32, msg: &str) -> Result<(), NbdError>
where
    S: AsyncWrite + Unpin,
{
    debug!(option, reply, msg, "option refused");
    stream
        .write_all(&option_reply(option, reply, msg.as_bytes()))
        .await?;
    Ok(())
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the
/// requested info types.
fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("option data too short");
    }
    let name_len = be_u32(&data[0..4]) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err("export name length exceeds option data");
    }
    let (name, rest) = rest.split_at(name_len);
    let count = usize::from(be_u16(&rest[0..2]));
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err("information request count does not match option length");
    }
    let requested = rest.chunks_exact(2).map(be_u16).collect();
    Ok((name, requested))
}

/// The `NBD_REP_INFO` replies and the final `NBD_REP_ACK` for a successful
/// `NBD_OPT_INFO`/`NBD_OPT_GO`.
fn info_replies(option: u32, export: &ExportInfo, requested: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&export.transmission_flags().to_be_bytes());
    out.extend_from_slice(&option_reply(option, REP_INFO, &info));

    if requested.contains(&INFO_NAME) {
        let mut info = INFO_NAME.to_be_bytes().to_vec();
        info.extend_from_slice(export.name.as_bytes());
        out.extend_from_slice(&option_reply(option, REP_INFO, &info));
    }
    if requested.contains(&INFO_DESCRIPTION) {
        let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
        info.extend_from_slice(export.description().as_bytes());
        out.extend_from_slice(&option_reply(option, REP_INFO, &info));
    }

    // Sent whether asked or not, as qemu-nbd does: the server copes with
    // any alignment, so a client that ignores it loses nothing.
    let (min, preferred, max) = export.block_sizes();
    let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    info.extend_from_slice(&min.to_be_bytes());
    info.extend_from_slice(&preferred.to_be_bytes());
    info.extend_from_slice(&max.to_be_bytes());
    out.extend_from_slice(&option_reply(option, REP_INFO, &info));

    out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64) -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            size,
            block_size: 4096,
            read_only: false,
        }
    }

    #[test]
    fn info_request_parsing() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, req) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"disk");
        assert_eq!(req, vec![INFO_NAME, INFO_BLOCK_SIZE]);

        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        let mut bad = u32::MAX.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&bad).is_err());
    }

    #[test]
    fn block_sizes_follow_the_export() {
        assert_eq!(export(1 << 20).block_sizes(), (512, 4096, MAX_PAYLOAD));
        assert_eq!(export(1000).block_sizes(), (1, 4096, MAX_PAYLOAD));
        let mut odd = export(1 << 20);
        odd.block_size = 3000;
        assert_eq!(odd.block_sizes().1, 4096);
        odd.block_size = 256;
        assert_eq!(odd.block_sizes().1, 512);
    }

    #[test]
    fn flags() {
        let mut e = export(4096);
        assert_eq!(e.transmission_flags(), 0b110_1101);
        e.read_only = true;
        assert_eq!(e.transmission_flags() & FLAG_READ_ONLY, FLAG_READ_ONLY);
    }
}
