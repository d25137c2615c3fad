//! TLS for the NBD listener (`NBD_OPT_STARTTLS`): X.509 credentials in
//! qemu's layout, mutual authentication, and the stream that is either
//! plain or TLS after negotiation.
//!
//! [`NbdTls::load_x509_dir`] reads a directory laid out as for qemu's
//! `tls-creds-x509,endpoint=server` (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`). The server presents `server-cert.pem` and requires a
//! client certificate that chains to `ca-cert.pem`: both ends are
//! authenticated. TLS 1.3 only, ring provider only.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

/// The CA certificate file of an x509 directory: client certificates must
/// be signed by it.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server certificate (chain) file of an x509 directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key file of an x509 directory (PKCS#8, PKCS#1 or
/// SEC1 PEM). Refused when others may read it (see [`NbdTls::load_x509_dir`]).
pub const SERVER_KEY: &str = "server-key.pem";

/// Errors loading TLS credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file could not be read.
    #[error("cannot read TLS file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A credential file holds nothing usable.
    #[error("bad TLS file {}: {reason}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key file may be read or written by other users.
    #[error(
        "TLS key file {} has mode {mode:04o}: other users may use it; \
         make it owner-only (chmod 600; group read is allowed)",
        path.display()
    )]
    KeyTooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// rustls refused the configuration (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration from {} refused: {reason}", dir.display())]
    Config {
        /// The credential directory.
        dir: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// The TLS side of an NBD listener: with it, every client must negotiate
/// `NBD_OPT_STARTTLS` and present a certificate the server trusts.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: TlsAcceptor,
    origin: String,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("origin", &self.origin)
            .finish()
    }
}

/// The ring crypto provider.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs_of(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            path: path.to_owned(),
            reason: "no PEM CERTIFICATE in it".into(),
        });
    }
    Ok(certs)
}

fn key_of(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        return Err(TlsError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Bad {
        path: path.to_owned(),
        reason: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"),
    })
}

impl NbdTls {
    /// Loads `dir/ca-cert.pem`, `dir/server-cert.pem` and
    /// `dir/server-key.pem` (qemu's x509 layout) and builds a TLS 1.3 server
    /// configuration that requires client certificates signed by the CA.
    ///
    /// The key file must not be writable by its group nor accessible at all
    /// by other users ([`TlsError::KeyTooOpen`]); group read is allowed, as
    /// for a directory shared with the hypervisor's group. Every error
    /// names the file.
    pub fn load_x509_dir(dir: &Path) -> Result<NbdTls, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let ca = certs_of(&ca_path)?;
        let chain = certs_of(&dir.join(SERVER_CERT))?;
        let key = key_of(&dir.join(SERVER_KEY))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| TlsError::Bad {
                path: ca_path.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let config_err = |e: rustls::Error| TlsError::Config {
            dir: dir.to_owned(),
            reason: e.to_string(),
        };
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Bad {
            path: ca_path.clone(),
            reason: format!("cannot verify clients with it: {e}"),
        })?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config_err)?;
        Ok(Self::from_config(
            Arc::new(config),
            format!("x509 directory {}", dir.display()),
        ))
    }

    /// Uses a rustls server configuration made elsewhere; `origin` says
    /// where it came from (for logs).
    pub fn from_config(config: Arc<rustls::ServerConfig>, origin: String) -> NbdTls {
        NbdTls {
            acceptor: TlsAcceptor::from(config),
            origin,
        }
    }

    /// Where the credentials came from, e.g. `x509 directory /etc/ferry/nbd`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// A negotiated connection: the socket itself, or TLS over it after
/// `NBD_OPT_STARTTLS`. The transmission phase runs over either.
pub(crate) enum MaybeTls<S> {
    /// No TLS.
    Plain(S),
    /// TLS over the socket.
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::*;
    use crate::{serve_connection, NbdError, NbdServerConfig};
    use ferry_device::MemDevice;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::client::TlsStream;

    /// A CA and a leaf certificate signed by it, as PEM.
    pub(crate) struct Pki {
        pub(crate) ca: String,
        pub(crate) server_cert: String,
        pub(crate) server_key: String,
        pub(crate) client_cert: String,
        pub(crate) client_key: String,
    }

    fn leaf(
        issuer: &CertifiedIssuer<'_, KeyPair>,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A fresh CA with a server certificate (localhost, 127.0.0.1) and a
    /// client certificate.
    pub(crate) fn pki() -> Pki {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("ferry test CA {n}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let (server_cert, server_key) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(&ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// Writes the server's x509 directory of `pki` (key mode 0600).
    fn server_dir(pki: &Pki) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_CERT), &pki.ca).unwrap();
        std::fs::write(dir.path().join(SERVER_CERT), &pki.server_cert).unwrap();
        let key = dir.path().join(SERVER_KEY);
        std::fs::write(&key, &pki.server_key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        dir
    }

    fn client_config(ca: &str, cert: &str, key: &str) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap(),
        )
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data() -> Vec<u8> {
        let mut d = 0u32.to_be_bytes().to_vec(); // the default export
        d.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        d
    }

    /// Reads one option reply: (option, reply type, data).
    async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
        assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let option = s.read_u32().await.unwrap();
        let kind = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    /// Starts a server with `tls` on one end of a pipe; returns the other
    /// end past the greeting (client flags sent) and the server's task.
    async fn start(
        tls: Option<NbdTls>,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<(), NbdError>>,
        Arc<MemDevice>,
    ) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let device = Arc::new(MemDevice::new(8192));
        let config = NbdServerConfig {
            export_name: "disk".into(),
            read_only: false,
            tls,
        };
        let served = tokio::spawn({
            let device = device.clone();
            async move { serve_connection(server, device, &config).await }
        });
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        client.write_all(&3u32.to_be_bytes()).await.unwrap();
        (client, served, device)
    }

    async fn starttls(
        mut client: DuplexStream,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsStream<DuplexStream>> {
        client.write_all(&option(OPT_STARTTLS, &[])).await.unwrap();
        assert_eq!(
            reply(&mut client).await,
            (OPT_STARTTLS, REP_ACK, Vec::new())
        );
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, client)
            .await
    }

    #[test]
    fn loading_names_the_missing_or_bad_file() {
        let pki = pki();
        let dir = server_dir(&pki);
        assert!(NbdTls::load_x509_dir(dir.path()).is_ok());
        let key = dir.path().join(SERVER_KEY);

        // Group read is allowed; group write and anything for others not.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(NbdTls::load_x509_dir(dir.path()).is_ok());
        for mode in [0o644, 0o660, 0o604] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = NbdTls::load_x509_dir(dir.path()).unwrap_err().to_string();
            assert!(e.contains(&key.display().to_string()), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        // A key that is not the certificate's.
        let other = super::tests::pki();
        std::fs::write(&key, &other.server_key).unwrap();
        let e = NbdTls::load_x509_dir(dir.path()).unwrap_err();
        assert!(matches!(e, TlsError::Config { .. }), "{e}");

        std::fs::write(dir.path().join(SERVER_CERT), "not a certificate\n").unwrap();
        let e = NbdTls::load_x509_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(SERVER_CERT) && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );

        std::fs::write(dir.path().join(SERVER_CERT), &pki.server_cert).unwrap();
        std::fs::write(&key, &pki.server_key).unwrap();
        for name in [SERVER_KEY, SERVER_CERT, CA_CERT] {
            std::fs::remove_file(dir.path().join(name)).unwrap();
            let e = NbdTls::load_x509_dir(dir.path()).unwrap_err().to_string();
            let path = dir.path().join(name);
            assert!(e.contains(&path.display().to_string()), "{name}: {e}");
        }
    }

    #[tokio::test]
    async fn options_before_starttls_get_tls_reqd_and_starttls_twice_is_invalid() {
        let pki = pki();
        let dir = server_dir(&pki);
        let tls = NbdTls::load_x509_dir(dir.path()).unwrap();
        let (mut client, served, device) = start(Some(tls)).await;

        // Everything but STARTTLS (and ABORT) is refused before TLS.
        for (opt, data) in [
            (OPT_GO, go_data()),
            (OPT_INFO, go_data()),
            (OPT_LIST, Vec::new()),
            (8, Vec::new()), // NBD_OPT_STRUCTURED_REPLY
        ] {
            client.write_all(&option(opt, &data)).await.unwrap();
            let (o, kind, _) = reply(&mut client).await;
            assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD), "option {opt}");
        }
        // STARTTLS with data is invalid, and leaves the connection plain.
        client.write_all(&option(OPT_STARTTLS, b"x")).await.unwrap();
        assert_eq!(reply(&mut client).await.1, REP_ERR_INVALID);

        let config = client_config(&pki.ca, &pki.client_cert, &pki.client_key);
        let mut tls = starttls(client, config).await.unwrap();
        // Over TLS: STARTTLS again is invalid; the options go on.
        tls.write_all(&option(OPT_STARTTLS, &[])).await.unwrap();
        let (o, kind, _) = reply(&mut tls).await;
        assert_eq!((o, kind), (OPT_STARTTLS, REP_ERR_INVALID));
        tls.write_all(&option(OPT_GO, &go_data())).await.unwrap();
        loop {
            let (o, kind, _) = reply(&mut tls).await;
            assert_eq!(o, OPT_GO);
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_INFO);
        }
        // Transmission over TLS: WRITE 4 bytes at 100, READ them, DISC.
        let request = |kind: u16, offset: u64, len: u32| {
            let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&0u16.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&7u64.to_be_bytes());
            r.extend_from_slice(&offset.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            r
        };
        // NBD orders no requests in flight (a READ of present blocks is
        // answered at once): the READ goes out once the WRITE is answered.
        let mut out = request(CMD_WRITE, 100, 4);
        out.extend_from_slice(b"abcd");
        tls.write_all(&out).await.unwrap();
        let mut replies = [0u8; 16 + 16 + 8];
        tls.read_exact(&mut replies[..16]).await.unwrap();
        assert_eq!(&replies[4..8], &[0; 4], "WRITE failed");
        tls.write_all(&request(CMD_READ, 98, 8)).await.unwrap();
        tls.read_exact(&mut replies[16..]).await.unwrap();
        assert_eq!(&replies[20..24], &[0; 4], "READ failed");
        assert_eq!(&replies[32..], b"\0\0abcd\0\0");
        tls.write_all(&request(CMD_DISC, 0, 0)).await.unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(&device.snapshot()[100..104], b"abcd");
    }

    #[tokio::test]
    async fn export_name_before_starttls_closes_and_abort_is_acknowledged() {
        let pki = pki();
        let dir = server_dir(&pki);
        let tls = NbdTls::load_x509_dir(dir.path()).unwrap();

        let (mut client, served, _) = start(Some(tls.clone())).await;
        client
            .write_all(&option(OPT_EXPORT_NAME, b"disk"))
            .await
            .unwrap();
        let e = served.await.unwrap().unwrap_err().to_string();
        assert!(
            e.contains("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS"),
            "{e}"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the server answered: {rest:?}");

        let (mut client, served, _) = start(Some(tls)).await;
        client.write_all(&option(OPT_ABORT, &[])).await.unwrap();
        assert_eq!(reply(&mut client).await, (OPT_ABORT, REP_ACK, Vec::new()));
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let pki = pki();
        let dir = server_dir(&pki);
        let tls = NbdTls::load_x509_dir(dir.path()).unwrap();
        let stranger = super::tests::pki();
        let (client, served, _) = start(Some(tls)).await;
        // It trusts our server, but its own certificate is another CA's.
        let config = client_config(&pki.ca, &stranger.client_cert, &stranger.client_key);
        let connected = starttls(client, config).await;
        let e = served.await.unwrap().unwrap_err();
        assert!(matches!(e, NbdError::TlsHandshake { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
        // TLS 1.3: the client may learn it only on its first read.
        if let Ok(mut tls) = connected {
            let mut b = [0u8; 1];
            assert!(!matches!(tls.read(&mut b).await, Ok(1)));
        }
    }

    #[tokio::test]
    async fn without_tls_starttls_is_refused_by_policy() {
        let (mut client, served, _) = start(None).await;
        client.write_all(&option(OPT_STARTTLS, &[])).await.unwrap();
        assert_eq!(reply(&mut client).await.1, REP_ERR_POLICY);
        client.write_all(&option(OPT_ABORT, &[])).await.unwrap();
        assert_eq!(reply(&mut client).await.1, REP_ACK);
        served.await.unwrap().unwrap();
    }
}
