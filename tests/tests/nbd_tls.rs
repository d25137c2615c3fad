//! NBD over TLS (`ferry pull --nbd-tls-dir DIR`): with qemu's x509 files,
//! the real qemu client (`tls-creds-x509`) and libnbd's `nbdinfo` read the
//! right bytes and write through over TCP and over a unix socket; a client
//! without TLS, or with a certificate from another CA, is refused; a
//! credential directory missing a file stops the start, naming the file.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

const MIB: u64 = 1 << 20;

/// A test CA.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// A certificate for `names` (DNS names or IP addresses) with
    /// `usage`; returns (certificate PEM, key PEM).
    fn leaf(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `files` (name, contents) into a new directory `dir`; `*-key.pem`
/// owner-only.
fn write_dir(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir(dir).unwrap();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        if name.ends_with("-key.pem") {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// The x509 directories of a test: the server's (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`), a client's of the same CA, and a
/// stranger's: it trusts our server's CA, but its own certificate is
/// signed by another CA (of the same name).
struct Dirs {
    server: PathBuf,
    client: PathBuf,
    stranger: PathBuf,
    /// Trusts our server's CA but has no certificate of its own.
    anonymous: PathBuf,
}

fn make_dirs(w: &World) -> Dirs {
    let ca = Ca::new("ferry test CA");
    let (server_cert, server_key) = ca.leaf(
        "ferry pull",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = ca.leaf("hypervisor", &[], ExtendedKeyUsagePurpose::ClientAuth);
    // An impostor CA of the same name (a client picks the certificate to
    // present by its issuer's name, so this one is sent and checked).
    let other = Ca::new("ferry test CA");
    let (stranger_cert, stranger_key) =
        other.leaf("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = ca.issuer.pem();
    // qemu checks its own certificate against its CA file before it
    // connects: the stranger's holds both CAs, so that only our server can
    // refuse it.
    let both_cas = format!("{ca_pem}{}", other.issuer.pem());
    let dirs = Dirs {
        server: w.path("tls-server"),
        client: w.path("tls-client"),
        stranger: w.path("tls-stranger"),
        anonymous: w.path("tls-anonymous"),
    };
    write_dir(&dirs.anonymous, &[("ca-cert.pem", &ca_pem)]);
    write_dir(
        &dirs.server,
        &[
            ("ca-cert.pem", &ca_pem),
            ("server-cert.pem", &server_cert),
            ("server-key.pem", &server_key),
        ],
    );
    write_dir(
        &dirs.client,
        &[
            ("ca-cert.pem", &ca_pem),
            ("client-cert.pem", &client_cert),
            ("client-key.pem", &client_key),
        ],
    );
    write_dir(
        &dirs.stranger,
        &[
            ("ca-cert.pem", &both_cas),
            ("client-cert.pem", &stranger_cert),
            ("client-key.pem", &stranger_key),
        ],
    );
    dirs
}

/// Where qemu reaches the export: TCP port or unix socket.
enum At<'a> {
    Tcp(u16),
    Unix(&'a Path),
}

impl At<'_> {
    fn image_opts(&self, tls: bool) -> String {
        let server = match self {
            At::Tcp(port) => format!("server.type=inet,server.host=127.0.0.1,server.port={port}"),
            At::Unix(path) => format!("server.type=unix,server.path={}", path.display()),
        };
        // qemu checks the server's name in its certificate; over a unix
        // socket it has none unless told.
        let creds = match (tls, self) {
            (false, _) => "",
            (true, At::Tcp(_)) => ",tls-creds=tls0",
            (true, At::Unix(_)) => ",tls-creds=tls0,tls-hostname=localhost",
        };
        format!("driver=nbd,{server},export=ferry{creds}")
    }
}

/// Runs a qemu tool (`qemu-img SUB` or `qemu-io`) on the export at `at`,
/// with TLS credentials from `client_dir` if given; returns whether it
/// succeeded and its output.
fn qemu(
    tool: &str,
    sub: &[&str],
    at: &At,
    client_dir: Option<&Path>,
    rest: &[&str],
) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["120", tool]).args(sub);
    if let Some(dir) = client_dir {
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ));
    }
    c.arg("--image-opts")
        .arg(at.image_opts(client_dir.is_some()));
    c.args(rest).stdin(Stdio::null());
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `ferry pull` arguments serving NBD at `nbd` with TLS from `tls_dir`.
fn tls_pull_args(w: &World, port: u16, nbd: &str, tls_dir: &Path) -> Vec<String> {
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--nbd").unwrap();
    args[i + 1] = nbd.into();
    args.push("--nbd-tls-dir".into());
    args.push(tls_dir.display().to_string());
    args
}

/// The TCP port of the `nbds://127.0.0.1:PORT` the pull says it serves.
fn served_port(pull: &Proc) -> u16 {
    let log = pull.log_text();
    let at = log
        .find("serving nbds://127.0.0.1:")
        .unwrap_or_else(|| panic!("no nbds:// URI in the log: {log}"));
    let rest = &log[at + "serving nbds://127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

fn blake3_of(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

/// Waits until the pull's log contains `what` (it logs asynchronously).
fn wait_log(pull: &Proc, what: &str) {
    let t0 = Instant::now();
    while !pull.log_text().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the log never said {what:?}: {}",
            pull.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn qemu_and_nbdinfo_over_tls_read_the_source_and_write_through() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let dirs = make_dirs(&w);
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB), (3 * MIB, 512 * 1024)], 7);
    let (_serve, port) = w.serve(&src, &[]);
    // TCP without --nbd-tcp-insecure: TLS makes it acceptable.
    let args = tls_pull_args(&w, port, "127.0.0.1:0", &dirs.server);
    let pull = w.pull(&args);
    assert!(!pull.log_text().contains("INSECURE"), "{}", pull.log_text());
    let nbd_port = served_port(&pull);
    let at = At::Tcp(nbd_port);
    let s = w.status();
    assert_eq!(s["nbd_tls"], true, "{s}");
    assert_eq!(s["nbd_uri"], format!("nbds://127.0.0.1:{nbd_port}"), "{s}");
    let human = w.ferry(&["status", "--control", w.path("ctl.sock").to_str().unwrap()]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("TLS, client certificates required"),
        "{human}"
    );

    // A client without TLS is refused, and told why.
    let (ok, said) = qemu("qemu-img", &["info"], &at, None, &[]);
    assert!(!ok, "a plain client got in: {said}");
    assert!(said.contains("TLS"), "{said}");
    wait_log(&pull, "this server requires TLS");

    // qemu with the client's certificate reads the source's bytes.
    let (ok, said) = qemu("qemu-img", &["info"], &at, Some(&dirs.client), &[]);
    assert!(ok, "qemu-img info over TLS: {said}");
    assert!(said.contains("virtual size: 4 MiB"), "{said}");
    let copy = w.path("copy.img");
    let (ok, said) = qemu(
        "qemu-img",
        &["convert"],
        &at,
        Some(&dirs.client),
        &["-O", "raw", copy.to_str().unwrap()],
    );
    assert!(ok, "qemu-img convert over TLS: {said}");
    assert_eq!(blake3_of(&copy), blake3_of(&src), "the copy read over TLS");

    // A write goes through to the destination's disk and reads back on a
    // new connection.
    let (ok, said) = qemu(
        "qemu-io",
        &[],
        &at,
        Some(&dirs.client),
        &["-c", "write -P 0xa5 1M 64k", "-c", "flush"],
    );
    assert!(
        ok && !said.contains("failed"),
        "qemu-io write over TLS: {said}"
    );
    let (ok, said) = qemu(
        "qemu-io",
        &[],
        &at,
        Some(&dirs.client),
        &["-c", "read -P 0xa5 1M 64k", "-c", "read -P 0 1088k 64k"],
    );
    assert!(
        ok && !said.contains("failed"),
        "qemu-io read over TLS: {said}"
    );
    let mut buf = vec![0u8; 64 * 1024];
    std::fs::File::open(w.path("dst.img"))
        .unwrap()
        .read_exact_at(&mut buf, MIB)
        .unwrap();
    assert!(
        buf.iter().all(|b| *b == 0xa5),
        "the write is not on the disk"
    );

    // libnbd's nbdinfo with the same client directory.
    if require_tool("nbdinfo") {
        let uri = format!(
            "nbds://127.0.0.1:{nbd_port}/ferry?tls-certificates={}",
            dirs.client.display()
        );
        let out = Command::new("timeout")
            .args(["120", "nbdinfo", "--size", &uri])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nbdinfo over TLS: {said}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4194304");
        let out = Command::new("timeout")
            .args(["120", "nbdinfo", "--size"])
            .arg(format!("nbd://127.0.0.1:{nbd_port}/ferry"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "nbdinfo without TLS got in");
    }
}

#[test]
fn a_unix_socket_with_tls_refuses_plain_clients_and_other_cas_certificates() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let dirs = make_dirs(&w);
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 3);
    let (_serve, port) = w.serve(&src, &[]);
    let sock = w.path("nbd.sock");
    let args = tls_pull_args(&w, port, &format!("unix:{}", sock.display()), &dirs.server);
    let pull = w.pull(&args);
    assert!(
        pull.log_text().contains("serving nbds+unix:///?socket="),
        "{}",
        pull.log_text()
    );
    let at = At::Unix(&sock);

    // TLS is required on the unix socket too.
    let (ok, said) = w.qemu_io_with(&[], &["read 0 4k"]);
    assert!(!ok, "a plain client got in over the unix socket: {said}");
    assert!(said.contains("TLS"), "{said}");

    // A certificate signed by another CA is refused by the server.
    let (ok, said) = qemu(
        "qemu-io",
        &[],
        &at,
        Some(&dirs.stranger),
        &["-c", "read 0 4k"],
    );
    assert!(!ok, "a client of another CA got in: {said}");
    eprintln!("qemu-io with another CA's certificate: {said}");
    wait_log(&pull, "TLS handshake failed: invalid peer certificate");
    // So is a TLS client without a certificate: both ends authenticate.
    let (ok, said) = qemu(
        "qemu-io",
        &[],
        &at,
        Some(&dirs.anonymous),
        &["-c", "read 0 4k"],
    );
    assert!(!ok, "a client without a certificate got in: {said}");
    wait_log(&pull, "TLS handshake failed: peer sent no certificates");

    // Our client gets in.
    let (ok, said) = qemu(
        "qemu-io",
        &[],
        &at,
        Some(&dirs.client),
        &["-c", "read -P 0 2M 4k"],
    );
    assert!(
        ok && !said.contains("failed"),
        "qemu-io over TLS on the unix socket: {said}"
    );
    assert_eq!(w.status()["nbd_tls"], true);
}

/// Runs ferry to completion, killed after 120 s (a start that should be
/// refused but is not would otherwise serve for ever).
fn ferry_bounded(args: &[String]) -> std::process::Output {
    Command::new("timeout")
        .arg("120")
        .arg(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_tls_dir_missing_the_key_or_with_an_open_key_stops_the_start() {
    let w = World::new();
    let dirs = make_dirs(&w);
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 5);
    let (_serve, port) = w.serve(&src, &[]);
    let key = dirs.server.join("server-key.pem");
    let moved = w.path("server-key.pem.away");
    std::fs::rename(&key, &moved).unwrap();
    let args = tls_pull_args(&w, port, "127.0.0.1:0", &dirs.server);
    let out = ferry_bounded(&args);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a key: {e}");
    assert!(e.contains(&key.display().to_string()), "{e}");
    assert!(!w.path("dst.img").exists(), "a refused start made the disk");
    assert!(!w.path("ctl.sock").exists());

    // A key other users may read is refused, naming it and its mode.
    std::fs::rename(&moved, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ferry_bounded(&args);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a world-readable key: {e}"
    );
    assert!(
        e.contains(&key.display().to_string()) && e.contains("0644"),
        "{e}"
    );
    assert!(!w.path("dst.img").exists());

    // --nbd-tls-dir and --nbd-tcp-insecure contradict each other.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut both = args.clone();
    both.push("--nbd-tcp-insecure".into());
    let out = ferry_bounded(&both);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--nbd-tcp-insecure"), "{e}");
}
