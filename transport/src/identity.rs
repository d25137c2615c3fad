//! Identities: a self-signed certificate and its private key, stored as DER
//! files in a directory, and the SHA-256 fingerprint both ends pin.
//!
//! There is no CA: each end is configured with the fingerprint of the other
//! (`ferry serve --trust-peer <fp>`, `ferry pull --source-fingerprint <fp>`).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// File name of the DER certificate inside an identity directory.
pub const CERT_FILE: &str = "cert.der";
/// File name of the DER (PKCS#8) private key inside an identity directory.
pub const KEY_FILE: &str = "key.der";

/// Errors creating or loading an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The directory already holds an identity (or part of one).
    #[error(
        "refusing to overwrite the existing identity at {0} (remove it first to make a new one)"
    )]
    Exists(PathBuf),
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing a file or creating the directory failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file is empty or is not what it should be.
    #[error("{path} is not a valid identity file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating the certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate (DER) and its private key (PKCS#8 DER).
#[derive(Clone)]
pub struct Identity {
    /// The self-signed certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity held in memory only (tests, ephemeral use).
    pub fn generate() -> Result<Identity, IdentityError> {
        let ck = rcgen::generate_simple_self_signed(vec!["ferry".to_string()])?;
        Ok(Identity {
            cert_der: ck.cert.der().to_vec(),
            key_der: ck.signing_key.serialize_der(),
        })
    }

    /// Generates an identity and writes `dir/cert.der` and `dir/key.der`
    /// (the key with mode 0600, created exclusively). Creates `dir` if
    /// needed. Refuses to overwrite an existing identity.
    pub fn generate_into(dir: &Path) -> Result<Identity, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::Exists(p.clone()));
            }
        }
        fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let id = Identity::generate()?;
        // Key first: if it cannot be written, no half identity is left
        // behind that looks complete.
        write_new(&key_path, &id.key_der, 0o600)?;
        if let Err(e) = write_new(&cert_path, &id.cert_der, 0o644) {
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(id)
    }

    /// Loads `dir/cert.der` and `dir/key.der`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            let bytes = fs::read(&path).map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })?;
            if bytes.is_empty() {
                return Err(IdentityError::Invalid {
                    path,
                    reason: "file is empty".into(),
                });
            }
            Ok((path, bytes))
        };
        let (cert_path, cert_der) = read(CERT_FILE)?;
        let (key_path, key_der) = read(KEY_FILE)?;
        // Cheap structural checks so a wrong file is reported here, naming
        // the path, rather than as an obscure TLS error later.
        if cert_der[0] != 0x30 {
            return Err(IdentityError::Invalid {
                path: cert_path,
                reason: "not a DER certificate".into(),
            });
        }
        if rcgen::KeyPair::try_from(key_der.as_slice()).is_err() {
            return Err(IdentityError::Invalid {
                path: key_path,
                reason: "not a PKCS#8 DER private key".into(),
            });
        }
        Ok(Identity { cert_der, key_der })
    }

    /// SHA-256 of the DER certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_cert(&self.cert_der)
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                IdentityError::Exists(path.to_path_buf())
            } else {
                err(e)
            }
        })?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

/// SHA-256 fingerprint of a DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_cert(cert_der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fingerprint {input:?}: {reason} (expected 64 hex digits, optionally separated by ':')"
)]
pub struct FingerprintParseError {
    /// The string given (trimmed).
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let fail = |reason: String| FingerprintParseError {
            input: input.to_string(),
            reason,
        };
        let digits: Vec<u8> = input.bytes().filter(|&b| b != b':').collect();
        if input.contains("::") || input.starts_with(':') || input.ends_with(':') {
            return Err(fail("misplaced ':'".into()));
        }
        if digits.len() != 64 {
            return Err(fail(format!("{} hex digits", digits.len())));
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hi = hex_val(pair[0])
                .ok_or_else(|| fail(format!("{:?} is not a hex digit", pair[0] as char)))?;
            let lo = hex_val(pair[1])
                .ok_or_else(|| fail(format!("{:?} is not a hex digit", pair[1] as char)))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Fingerprint(out))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_display_and_parse() {
        let fp = Fingerprint([0xab; 32]);
        let s = fp.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, "ab".repeat(32));
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(s.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("abc".parse::<Fingerprint>().is_err());
        let bad = format!("{}zz", "ab".repeat(31));
        let e = bad.parse::<Fingerprint>().unwrap_err();
        assert!(e.to_string().contains("not a hex digit"), "{e}");
        assert!(format!(":{s}").parse::<Fingerprint>().is_err());
        assert!("".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn generate_load_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("id");
        let id = Identity::generate_into(&d).unwrap();
        let loaded = Identity::load(&d).unwrap();
        assert_eq!(loaded.fingerprint(), id.fingerprint());
        assert_eq!(loaded.key_der, id.key_der);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = Identity::generate_into(&d).unwrap_err();
        assert!(matches!(e, IdentityError::Exists(_)));
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        // Unchanged after the refusal.
        assert_eq!(Identity::load(&d).unwrap().fingerprint(), id.fingerprint());
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&*dir.path().join(CERT_FILE).to_string_lossy()),
            "{e}"
        );
        fs::write(dir.path().join(CERT_FILE), b"\x30junk").unwrap();
        fs::write(dir.path().join(KEY_FILE), b"junk").unwrap();
        let e = Identity::load(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&*dir.path().join(KEY_FILE).to_string_lossy()),
            "{e}"
        );
    }
}
