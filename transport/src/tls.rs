//! rustls configurations with pinned certificates, both ways (mutual TLS):
//! the server requires a client certificate whose fingerprint is in its
//! trusted set; the client accepts exactly the pinned server fingerprint. No
//! CA, no hostname check; the TLS 1.3 handshake signatures are verified
//! properly with ring's algorithms. TLS 1.3 only, ALPN [`ALPN`], ring
//! provider only (never aws-lc: `builder_with_provider`).

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::error::TransportError;
use crate::identity::{Fingerprint, Identity};
use crate::tuning::Tuning;

/// The ALPN protocol of ferry's wire format, version 1.
pub const ALPN: &[u8] = b"ferry/1";

/// The server name the client asks for. Not checked: the certificate is
/// pinned by fingerprint instead.
pub const SERVER_NAME: &str = "ferry";

/// Longest disk name (one DNS label).
pub const MAX_DISK_NAME: usize = 63;

/// Whether `name` may name a disk of a source serving several: 1 to
/// [`MAX_DISK_NAME`] lower-case ASCII letters, digits and `-`, not at either end
/// (it travels as a label of the TLS server name).
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DISK_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The TLS server name a client sends for `disk`: [`SERVER_NAME`] for a
/// source's only disk, `NAME.ferry` for disk NAME of a source serving
/// several (docs/decisions/many-disks-one-budget.md).
pub fn server_name_of(disk: Option<&str>) -> Result<String, TransportError> {
    match disk {
        None => Ok(SERVER_NAME.to_string()),
        Some(n) if valid_disk_name(n) => Ok(format!("{n}.{SERVER_NAME}")),
        Some(n) => Err(TransportError::Options {
            reason: format!(
                "disk name {n:?}: 1 to {MAX_DISK_NAME} lower-case letters, digits and '-' (not at either end)"
            ),
        }),
    }
}

/// The disk a TLS server name asks for: `None` for [`SERVER_NAME`] (or
/// no name: the only disk), `Some(NAME)` for `NAME.ferry`; an error
/// for any other name.
pub fn disk_of_server_name(sni: Option<&str>) -> Result<Option<&str>, String> {
    match sni {
        None => Ok(None),
        Some(s) if s.eq_ignore_ascii_case(SERVER_NAME) => Ok(None),
        Some(s) => match s.strip_suffix(&format!(".{SERVER_NAME}")) {
            Some(n) if valid_disk_name(n) => Ok(Some(n)),
            _ => Err(format!("server name {s:?} names no disk")),
        },
    }
}

/// The ring crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate whose fingerprint is not trusted.
#[derive(Debug, Clone)]
pub struct NotTrusted {
    /// "peer" (client certificate at the server) or "server".
    pub role: &'static str,
    /// The fingerprint presented.
    pub presented: Fingerprint,
    /// The fingerprints trusted.
    pub trusted: Vec<Fingerprint>,
}

impl fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} certificate fingerprint {} is not trusted (trusted: ",
            self.role, self.presented
        )?;
        if self.trusted.is_empty() {
            write!(f, "none")?;
        }
        for (i, t) in self.trusted.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{t}")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for NotTrusted {}

fn not_trusted(e: NotTrusted) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not supported".into())
}

/// Accepts client certificates whose fingerprint is in a pinned set.
#[derive(Debug)]
struct PinnedClientVerifier {
    trusted: Vec<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = Fingerprint::of_cert(end_entity);
        if self.trusted.contains(&presented) {
            return Ok(ClientCertVerified::assertion());
        }
        let e = NotTrusted {
            role: "peer",
            presented,
            trusted: self.trusted.clone(),
        };
        tracing::warn!("refused a client: {e}");
        Err(not_trusted(e))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Accepts exactly one server certificate, by fingerprint. Remembers the
/// last refused fingerprint so the client can report it.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    expected: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
    refused: Mutex<Option<Fingerprint>>,
}

impl PinnedServerVerifier {
    /// The fingerprint refused most recently, if any (and forget it).
    pub(crate) fn take_refused(&self) -> Option<Fingerprint> {
        self.refused.lock().ok()?.take()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_cert(end_entity);
        if presented == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(presented);
        }
        let e = NotTrusted {
            role: "server",
            presented,
            trusted: vec![self.expected],
        };
        tracing::warn!("refused the source: {e}");
        Err(not_trusted(e))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn key_of(identity: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()))
}

fn tls_err(what: &'static str) -> impl FnOnce(rustls::Error) -> TransportError {
    move |source| TransportError::Tls { what, source }
}

/// A server configuration presenting `identity` and requiring a client
/// certificate whose fingerprint is in `trusted`.
pub fn server_config(
    identity: &Identity,
    trusted: &[Fingerprint],
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedClientVerifier {
        trusted: trusted.to_vec(),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("server protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(identity.cert_der.clone())],
            key_of(identity),
        )
        .map_err(tls_err("server certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

pub(crate) fn client_config_with_verifier(
    identity: &Identity,
    server: Fingerprint,
) -> Result<(rustls::ClientConfig, Arc<PinnedServerVerifier>), TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        expected: server,
        algs: provider.signature_verification_algorithms,
        refused: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("client protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(
            vec![CertificateDer::from(identity.cert_der.clone())],
            key_of(identity),
        )
        .map_err(tls_err("client certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok((cfg, verifier))
}

/// A client configuration presenting `identity` and accepting exactly the
/// server certificate with fingerprint `server`.
pub fn client_config(
    identity: &Identity,
    server: Fingerprint,
) -> Result<rustls::ClientConfig, TransportError> {
    Ok(client_config_with_verifier(identity, server)?.0)
}

/// The quinn server configuration: [`server_config`] plus `tuning`.
pub fn quinn_server_config(
    identity: &Identity,
    trusted: &[Fingerprint],
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_config(identity, trusted)?)
            .map_err(|e| TransportError::QuicCrypto(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(tuning.transport_config());
    Ok(cfg)
}

/// The quinn client configuration: [`client_config`] plus `tuning`.
pub fn quinn_client_config(
    identity: &Identity,
    server: Fingerprint,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TransportError> {
    Ok(quinn_client_config_with_verifier(identity, server, tuning)?.0)
}

pub(crate) fn quinn_client_config_with_verifier(
    identity: &Identity,
    server: Fingerprint,
    tuning: &Tuning,
) -> Result<(quinn::ClientConfig, Arc<PinnedServerVerifier>), TransportError> {
    let (tls, verifier) = client_config_with_verifier(identity, server)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::QuicCrypto(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(tuning.client_transport_config());
    Ok((cfg, verifier))
}

/// Whether a connection was closed by the peer with a TLS alert that means
/// "your certificate is not acceptable".
pub(crate) fn is_cert_refusal(e: &quinn::ConnectionError) -> bool {
    if let quinn::ConnectionError::ConnectionClosed(close) = e {
        let code = u64::from(close.error_code);
        // crypto errors are 0x100 + TLS alert: bad_certificate (42),
        // unsupported_certificate (43), certificate_unknown (46),
        // unknown_ca (48), access_denied (49), certificate_required (116).
        return matches!(code, 0x12a | 0x12b | 0x12e | 0x130 | 0x131 | 0x174);
    }
    false
}

#[cfg(test)]
mod disk_name_tests {
    use super::*;

    /// A disk's name goes into the server name and comes out again; the
    /// plain name is a source's only disk; anything else is no disk.
    #[test]
    fn the_server_name_names_the_disk() {
        assert_eq!(server_name_of(None).unwrap(), "ferry");
        assert_eq!(server_name_of(Some("data-1")).unwrap(), "data-1.ferry");
        assert_eq!(
            disk_of_server_name(Some("data-1.ferry")),
            Ok(Some("data-1"))
        );
        assert_eq!(disk_of_server_name(Some("ferry")), Ok(None));
        assert_eq!(disk_of_server_name(None), Ok(None));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"x".repeat(64)] {
            assert!(server_name_of(Some(bad)).is_err(), "{bad:?} accepted");
        }
        assert!(disk_of_server_name(Some("a.b.ferry")).is_err());
        assert!(disk_of_server_name(Some("example.com")).is_err());
    }
}
