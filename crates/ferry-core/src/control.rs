//! The request lines of a pull's control socket (`ferry status`,
//! `ferry background`): their grammar only, no I/O, so the parser can be
//! fuzzed and the client and the server share it.
//!
//! A request is one line of whitespace-separated words: `status`, `pause`,
//! `resume`, `commit`, `abort`, or `rate N` (bytes per second, with or without a unit as
//! [`crate::units::parse_rate`] reads them: `50M`, `100Mbit`; 0 =
//! unlimited, at most [`MAX_RATE`]). Words after `rate`'s number are
//! ignored; anything else is refused.

use std::fmt;

use crate::units::{self, UnitsError};

/// The highest background rate limit accepted, in bytes per second:
/// 1 TiB/s, above any link ferry runs on (a larger number is a typo).
pub const MAX_RATE: u64 = 1 << 40;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// Report progress (`ferry status`).
    Status,
    /// Pause the background copy.
    Pause,
    /// Resume the background copy.
    Resume,
    /// Limit the background copy to this many bytes per second (0: no
    /// limit).
    Rate(u64),
    /// Record that the source is no longer needed (`ferry commit`; only
    /// once verified).
    Commit,
    /// Stop the migration, keep the guest's writes aside, exit
    /// (`ferry abort`).
    Abort,
    /// Switch a pre-copying pull over: the source freezes and sends its
    /// last changes, the destination starts serving.
    Switchover,
}

/// Why a line is not a control request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlParseError {
    /// `rate` without a rate (a number of bytes per second, with or
    /// without a unit).
    #[error(transparent)]
    BadRate(#[from] UnitsError),
    /// `rate` above [`MAX_RATE`].
    #[error(
        "rate {0} bytes/s is more than the most allowed, {MAX_RATE} (1 TiB/s); use 0 for unlimited"
    )]
    RateTooHigh(u64),
    /// Not a request this version knows.
    #[error("unknown request {0:?}")]
    Unknown(String),
}

/// Parses a background rate limit in bytes per second (0: unlimited), as
/// `rate N`, `ferry background rate=N` and `ferry pull --rate` take it:
/// `50000000`, `50M`, `50MiB`, `100Mbit` ([`crate::units`]).
pub fn parse_rate(s: &str) -> Result<u64, ControlParseError> {
    let v = units::parse_rate(s)?;
    if v > MAX_RATE {
        return Err(ControlParseError::RateTooHigh(v));
    }
    Ok(v)
}

impl ControlRequest {
    /// Parses one request line (surrounding whitespace and the line's end
    /// are ignored).
    pub fn parse(line: &str) -> Result<Self, ControlParseError> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("status"), None) => Ok(Self::Status),
            (Some("pause"), None) => Ok(Self::Pause),
            (Some("resume"), None) => Ok(Self::Resume),
            (Some("commit"), None) => Ok(Self::Commit),
            (Some("abort"), None) => Ok(Self::Abort),
            (Some("switchover"), None) => Ok(Self::Switchover),
            (Some("rate"), Some(v)) => parse_rate(v).map(Self::Rate),
            _ => Err(ControlParseError::Unknown(line.trim().to_string())),
        }
    }
}

impl fmt::Display for ControlRequest {
    /// The request line, without its newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status => f.write_str("status"),
            Self::Pause => f.write_str("pause"),
            Self::Resume => f.write_str("resume"),
            Self::Rate(v) => write!(f, "rate {v}"),
            Self::Commit => f.write_str("commit"),
            Self::Abort => f.write_str("abort"),
            Self::Switchover => f.write_str("switchover"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print_back() {
        for (line, req) in [
            ("status", ControlRequest::Status),
            ("  pause\n", ControlRequest::Pause),
            ("resume\r\n", ControlRequest::Resume),
            ("commit", ControlRequest::Commit),
            (" abort\n", ControlRequest::Abort),
            ("rate 0", ControlRequest::Rate(0)),
            ("rate\t50000000 extra", ControlRequest::Rate(50_000_000)),
            ("rate 1099511627776", ControlRequest::Rate(MAX_RATE)),
            ("rate 1TiB", ControlRequest::Rate(MAX_RATE)),
            ("rate 50M", ControlRequest::Rate(50_000_000)),
            ("rate 100Mbit/s", ControlRequest::Rate(12_500_000)),
        ] {
            assert_eq!(ControlRequest::parse(line), Ok(req), "{line:?}");
            assert_eq!(ControlRequest::parse(&req.to_string()), Ok(req));
        }
    }

    #[test]
    fn other_lines_are_refused() {
        for line in [
            "",
            "status now",
            "Status",
            "rate",
            "pause 1",
            "abort now",
            "commit 1",
        ] {
            assert!(
                matches!(
                    ControlRequest::parse(line),
                    Err(ControlParseError::Unknown(_))
                ),
                "{line:?}"
            );
        }
        for line in [
            "rate -1",
            "rate 1e6",
            "rate 18446744073709551616",
            "rate 50Mb",
        ] {
            let e = ControlRequest::parse(line).unwrap_err();
            assert!(matches!(e, ControlParseError::BadRate(_)), "{line:?}");
            // The message names what was typed.
            assert!(e.to_string().contains(&line[5..]), "{e}");
        }
        let e = ControlRequest::parse("rate 1099511627777").unwrap_err();
        assert_eq!(e, ControlParseError::RateTooHigh(MAX_RATE + 1));
        assert!(e.to_string().contains("1 TiB/s"), "{e}");
        let e = ControlRequest::parse("rate 1.1TiB").unwrap_err();
        assert!(matches!(e, ControlParseError::RateTooHigh(_)), "{e}");
    }
}
