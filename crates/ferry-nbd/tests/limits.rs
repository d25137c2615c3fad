//! What keeps other users and idle clients out: unix sockets are owner-only
//! (or one group's) whatever the umask, clients beyond [`MAX_CLIENTS`] are
//! turned away, and a client that does not negotiate is cut off after
//! [`HANDSHAKE_TIMEOUT`].

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_device::MemDevice;
use ferry_nbd::{NbdListener, SocketAccess, HANDSHAKE_TIMEOUT, MAX_CLIENTS};

fn mem_server() -> TestServer<MemDevice> {
    TestServer::start(Arc::new(MemDevice::new(1 << 20)), true, false)
}

fn socket_path(server: &TestServer<MemDevice>) -> std::path::PathBuf {
    match &server.addr {
        Addr::Unix(p) => p.clone(),
        Addr::Tcp(a) => panic!("a unix server listens on {a}"),
    }
}

#[test]
fn a_unix_socket_is_owner_only_whatever_the_umask() {
    // The umask of the test process (022 by default) would leave a plain
    // bind's socket at 0755; ferry's must be 0600.
    let server = mem_server();
    let meta = std::fs::metadata(socket_path(&server)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_unix_socket_for_a_group_is_0660_and_that_groups() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    let me = std::fs::metadata(&probe).unwrap();
    // Root may give it to any group; another user to its own.
    let gid = if me.uid() == 0 { 4242 } else { me.gid() };
    let path = dir.path().join("g.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _listener = rt
        .block_on(NbdListener::bind_with(
            &format!("unix:{}", path.display()),
            &SocketAccess { group: Some(gid) },
        ))
        .unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
}

#[test]
fn clients_beyond_the_cap_are_turned_away_until_one_leaves() {
    let server = mem_server();
    let path = socket_path(&server);
    // Each of these is accepted (it gets the greeting), then stays idle.
    let mut held: Vec<RawClient> = (0..MAX_CLIENTS)
        .map(|_| {
            let mut c = server.raw();
            c.greeting();
            c
        })
        .collect();
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        extra.read(&mut b).unwrap(),
        0,
        "client {} was served",
        MAX_CLIENTS + 1
    );
    // One leaves: a new client is served again (once the server saw it go).
    drop(held.pop());
    let t0 = Instant::now();
    loop {
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if c.read(&mut b).unwrap() == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no client served after one left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_does_not_negotiate_is_cut_off() {
    let server = mem_server();
    let mut c = UnixStream::connect(socket_path(&server)).unwrap();
    // Idle connections must not pile up for long: cut within 30 s (the
    // timeout is 10 s; the margin is for a loaded machine).
    assert!(HANDSHAKE_TIMEOUT <= Duration::from_secs(10));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t0 = Instant::now();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    let mut b = [0u8; 1];
    let n = c
        .read(&mut b)
        .expect("the server closes the idle connection within 30 s");
    assert_eq!(n, 0);
    assert!(t0.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1));
    // The server goes on serving.
    let mut c = server.raw();
    c.go(EXPORT);
}
