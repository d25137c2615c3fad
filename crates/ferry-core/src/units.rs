//! Sizes and rates as operators type and read them: `50M`, `32MiB`,
//! `1.5G`, `100Mbit`. One parser for every option and control request that
//! takes a size (bytes) or a rate (bytes per second), and the formatting
//! `ferry status` prints them with.
//!
//! A value is a number (digits, optionally with a decimal fraction) and an
//! optional unit, with or without a space between:
//!
//! | unit | factor |
//! |---|---|
//! | none, `B` | 1 (a plain number is bytes) |
//! | `k`, `kB`, `M`, `MB`, `G`, `GB`, `T`, `TB` | 10^3, 10^6, 10^9, 10^12 (decimal) |
//! | `KiB`, `MiB`, `GiB`, `TiB` (or `Ki`, `Mi`, …) | 2^10, 2^20, 2^30, 2^40 (binary) |
//! | `bit`, `kbit`, `Mbit`, `Gbit`, `Tbit` | 1/8, 10^3/8, … (rates only) |
//!
//! The prefix letter may be of either case (`50m` is `50M`); `b` alone
//! (`50Mb`) is refused as ambiguous between bits and bytes. A rate may end
//! in `/s` (`50MB/s`, `100Mbit/s`). Fractions of a byte are rounded down.

use std::fmt;

/// Why a size or rate is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    /// Nothing, or no digits before the unit.
    #[error("{0:?} is not a number of bytes: expected e.g. 50M, 32MiB or 1048576")]
    NotANumber(String),
    /// A unit this parser does not know.
    #[error(
        "{input:?}: unknown unit {unit:?}; use B, k/M/G/T (powers of 1000), \
         KiB/MiB/GiB/TiB (powers of 1024), or for rates kbit/Mbit/Gbit"
    )]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit as typed.
        unit: String,
    },
    /// `b` alone: bits or bytes?
    #[error("{0:?}: is that bits or bytes? Write MB for megabytes or Mbit for megabits")]
    Ambiguous(String),
    /// Bits where a size (not a rate) is wanted.
    #[error("{0:?}: bits are for rates; give a size in bytes (e.g. 32MiB)")]
    BitsInSize(String),
    /// More than 2^64 - 1 bytes.
    #[error("{0:?} is too large (more than 2^64 - 1 bytes)")]
    Overflow(String),
}

/// What a parsed unit stands for: a factor in bytes, and whether it was
/// in bits (then the value is divided by 8).
#[derive(Clone, Copy)]
struct Unit {
    factor: u128,
    bits: bool,
}

fn unit(s: &str) -> Option<Unit> {
    const K: u128 = 1000;
    const KI: u128 = 1024;
    let (prefix, rest) = match s.chars().next() {
        None => {
            return Some(Unit {
                factor: 1,
                bits: false,
            })
        }
        Some(c) => (c.to_ascii_lowercase(), &s[c.len_utf8()..]),
    };
    if s == "B" {
        return Some(Unit {
            factor: 1,
            bits: false,
        });
    }
    if s == "bit" {
        return Some(Unit {
            factor: 1,
            bits: true,
        });
    }
    let power = match prefix {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        _ => return None,
    };
    match rest {
        "" | "B" => Some(Unit {
            factor: K.pow(power),
            bits: false,
        }),
        "i" | "iB" => Some(Unit {
            factor: KI.pow(power),
            bits: false,
        }),
        "bit" => Some(Unit {
            factor: K.pow(power),
            bits: true,
        }),
        _ => None,
    }
}

/// Parses a number with a unit into bytes (or bytes per second);
/// `allow_bits` says whether bit units are allowed.
fn parse(input: &str, allow_bits: bool) -> Result<u64, UnitsError> {
    let s = input.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit_text) = s.split_at(digits_end);
    let unit_text = unit_text.trim_start();
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || frac.contains('.') || (number.contains('.') && frac.is_empty()) {
        return Err(UnitsError::NotANumber(input.to_string()));
    }
    let u = match unit(unit_text) {
        Some(u) => u,
        None if unit_text.ends_with('b') && unit(&unit_text.replace('b', "B")).is_some() => {
            return Err(UnitsError::Ambiguous(input.to_string()))
        }
        None => {
            return Err(UnitsError::UnknownUnit {
                input: input.to_string(),
                unit: unit_text.to_string(),
            })
        }
    };
    if u.bits && !allow_bits {
        return Err(UnitsError::BitsInSize(input.to_string()));
    }
    let overflow = || UnitsError::Overflow(input.to_string());
    // Whole part: at most 20 digits fit in u64; u128 holds it times 2^40.
    if whole.trim_start_matches('0').len() > 20 {
        return Err(overflow());
    }
    let whole: u128 = whole.parse().map_err(|_| overflow())?;
    let mut bytes = whole.checked_mul(u.factor).ok_or_else(overflow)?;
    // Fraction: digits beyond the 13th are dropped (worth less than a
    // byte at a factor of up to 2^40 < 10^13).
    let frac = &frac[..frac.len().min(13)];
    if !frac.is_empty() {
        let f: u128 = frac.parse().map_err(|_| overflow())?;
        bytes += f * u.factor / 10u128.pow(frac.len() as u32);
    }
    if u.bits {
        bytes /= 8;
    }
    u64::try_from(bytes).map_err(|_| overflow())
}

/// Parses a size in bytes: `32MiB`, `1.5G`, `4096` (see the module
/// documentation for the units).
pub fn parse_size(input: &str) -> Result<u64, UnitsError> {
    parse(input, false)
}

/// Parses a rate in bytes per second: `50M`, `50MB/s`, `100Mbit`
/// (bits are divided by 8), `1048576`.
pub fn parse_rate(input: &str) -> Result<u64, UnitsError> {
    let s = input.trim();
    let s = s.strip_suffix("/s").unwrap_or(s);
    parse(s, true).map_err(|e| match e {
        // Name what was typed, with its "/s".
        UnitsError::NotANumber(_) => UnitsError::NotANumber(input.to_string()),
        UnitsError::UnknownUnit { unit, .. } => UnitsError::UnknownUnit {
            input: input.to_string(),
            unit,
        },
        UnitsError::Ambiguous(_) => UnitsError::Ambiguous(input.to_string()),
        UnitsError::BitsInSize(_) => UnitsError::BitsInSize(input.to_string()),
        UnitsError::Overflow(_) => UnitsError::Overflow(input.to_string()),
    })
}

/// A byte count for people: binary units, one decimal (`1.5 GiB`,
/// `512 B`). [`parse_size`] reads it back (to that precision).
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        write!(f, "{v:.1} {}", UNITS[u])
    }
}

/// A rate for people: [`Bytes`] per second (`50.0 MiB/s`).
pub struct Rate(pub u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", Bytes(self.0))
    }
}

/// A duration in seconds for people: `45 s`, `12 min 5 s`, `3 h 20 min`.
pub struct Seconds(pub u64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s < 60 {
            write!(f, "{s} s")
        } else if s < 3600 {
            write!(f, "{} min {} s", s / 60, s % 60)
        } else {
            write!(f, "{} h {} min", s / 3600, s % 3600 / 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KI: u64 = 1024;

    #[test]
    fn decimal_binary_and_plain_numbers() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("  4096\n", 4096),
            ("7B", 7),
            ("50k", 50_000),
            ("50K", 50_000),
            ("50kB", 50_000),
            ("50M", 50_000_000),
            ("50m", 50_000_000),
            ("50MB", 50_000_000),
            ("2G", 2_000_000_000),
            ("3T", 3_000_000_000_000),
            ("1KiB", KI),
            ("32MiB", 32 * KI * KI),
            ("32 MiB", 32 * KI * KI),
            ("32Mi", 32 * KI * KI),
            ("1GiB", KI * KI * KI),
            ("1TiB", KI * KI * KI * KI),
            ("1.5GiB", 3 * KI * KI * KI / 2),
            ("0.5k", 500),
            ("1.0001k", 1000),
            ("18446744073709551615", u64::MAX),
            ("000000000000000000000000001", 1),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
            assert_eq!(parse_rate(text), Ok(bytes), "{text:?} as a rate");
        }
    }

    #[test]
    fn rates_take_bits_and_per_second() {
        for (text, bytes) in [
            ("100Mbit", 12_500_000),
            ("100mbit", 12_500_000),
            ("100 Mbit/s", 12_500_000),
            ("1Gbit", 125_000_000),
            ("8kbit", 1000),
            ("8bit", 1),
            ("12bit", 1),
            ("50MB/s", 50_000_000),
            ("50MiB/s", 50 * KI * KI),
            ("1Tbit", 125_000_000_000),
        ] {
            assert_eq!(parse_rate(text), Ok(bytes), "{text:?}");
        }
        assert_eq!(
            parse_size("100Mbit"),
            Err(UnitsError::BitsInSize("100Mbit".into()))
        );
        // "/s" is for rates.
        assert!(matches!(
            parse_size("50MB/s"),
            Err(UnitsError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn what_is_printed_parses_back() {
        for n in [
            0,
            1,
            1023,
            1024,
            1536,
            50_000_000,
            32 << 20,
            3 << 30,
            1 << 40,
        ] {
            let printed = Bytes(n).to_string();
            let back = parse_size(&printed).expect("printed size parses");
            // One decimal: within 5% (exact for whole units).
            assert!(back.abs_diff(n) <= n / 20, "{n} -> {printed} -> {back}");
            let rate = Rate(n).to_string();
            let back = parse_rate(&rate).expect("printed rate parses");
            assert!(back.abs_diff(n) <= n / 20, "{n} -> {rate} -> {back}");
        }
        assert_eq!(Bytes(32 << 20).to_string(), "32.0 MiB");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Rate(50 << 20).to_string(), "50.0 MiB/s");
        assert_eq!(Seconds(45).to_string(), "45 s");
        assert_eq!(Seconds(725).to_string(), "12 min 5 s");
        assert_eq!(Seconds(12_000).to_string(), "3 h 20 min");
    }

    #[test]
    fn too_large_values_overflow_with_the_input_named() {
        for text in [
            "18446744073709551616",
            "99999999999999999999999",
            "16777216TiB",
            "200000000000000000000bit",
            "20000000T",
        ] {
            let e = parse_rate(text).unwrap_err();
            assert_eq!(e, UnitsError::Overflow(text.into()), "{text:?}");
            assert!(e.to_string().contains(text), "{e}");
        }
        // Just below: 2^64 - 1 bits is fine as a rate.
        assert_eq!(parse_rate("18446744073709551615bit"), Ok(u64::MAX / 8));
    }

    #[test]
    fn junk_is_refused_with_the_input_named() {
        for text in [
            "", " ", "M", "MiB", "-1", "+5", "1e6", "1.", ".5", "1.2.3", "0x10",
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(
                matches!(
                    e,
                    UnitsError::NotANumber(_) | UnitsError::UnknownUnit { .. }
                ),
                "{text:?}: {e:?}"
            );
            assert!(e.to_string().contains(&format!("{text:?}")), "{e}");
        }
        for text in ["50Q", "50 MiBs", "50kiB extra", "5 P", "50µ"] {
            let e = parse_rate(text).unwrap_err();
            assert!(
                matches!(e, UnitsError::UnknownUnit { .. }),
                "{text:?}: {e:?}"
            );
        }
        for text in ["50Mb", "50mb", "1kb", "10b/s"] {
            assert_eq!(
                parse_rate(text),
                Err(UnitsError::Ambiguous(text.into())),
                "{text:?}"
            );
        }
    }
}
