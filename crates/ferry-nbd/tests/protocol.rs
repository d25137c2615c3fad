//! The protocol at byte level, with a hand-written client: negotiation,
//! error replies, malformed input, concurrency, DISC, listener errors.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::*;
use ferry_device::MemDevice;
use ferry_nbd::{NbdError, NbdListener};

const SIZE: u64 = 1 << 20;

fn mem_server(unix: bool) -> TestServer<MemDevice> {
    TestServer::start(
        Arc::new(MemDevice::from_bytes(pattern(SIZE as usize, 1))),
        unix,
        false,
    )
}

/// A fresh client can still negotiate and read.
fn still_serving<D: ferry_device::BlockDevice>(server: &TestServer<D>) {
    let mut c = server.raw();
    assert_eq!(c.go(EXPORT).0, server.device.size());
    c.read_ok(99, 0, 512);
}

#[test]
fn option_negotiation() {
    let server = mem_server(false);
    let mut c = server.raw();
    c.start();

    c.option(OPT_LIST, &[]);
    let (opt, kind, data) = c.option_reply();
    assert_eq!((opt, kind), (OPT_LIST, REP_SERVER));
    assert_eq!(data, [&4u32.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(c.option_reply(), (OPT_LIST, REP_ACK, vec![]));

    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);

    for opt in [99, OPT_STRUCTURED_REPLY] {
        c.option(opt, &[]);
        let (o, kind, _) = c.option_reply();
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    // A server without TLS configured refuses STARTTLS by policy (the
    // spec's NOTLS mode).
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(
        c.option_reply(),
        (
            OPT_STARTTLS,
            REP_ERR_POLICY,
            b"TLS is not configured on this server".to_vec()
        )
    );

    assert_eq!(c.info(OPT_INFO, "nosuch", &[]), (vec![], REP_ERR_UNKNOWN));
    c.option(OPT_INFO, &[0, 0, 0]);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    // Name length pointing past the data.
    c.option(OPT_GO, &[0, 0, 0x10, 0, 0, 0]);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);

    let (infos, kind) = c.info(
        OPT_INFO,
        EXPORT,
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    );
    assert_eq!(kind, REP_ACK);
    let find = |t: u16| {
        infos
            .iter()
            .find(|i| i[0..2] == t.to_be_bytes())
            .unwrap_or_else(|| panic!("info {t} missing"))
            .clone()
    };
    let export = find(INFO_EXPORT);
    assert_eq!(export.len(), 12);
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    );
    assert_eq!(flags & (FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN), 0);
    assert_eq!(&find(INFO_NAME)[2..], b"disk");
    assert!(find(INFO_DESCRIPTION).len() > 2);
    let bs = find(INFO_BLOCK_SIZE);
    let be = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((be(2), be(6), be(10)), (512, 4096, 32 << 20));

    // Without requests: no name or description, but export and block size.
    let (infos, kind) = c.info(OPT_INFO, "", &[]);
    assert_eq!(kind, REP_ACK);
    let types: Vec<u16> = infos
        .iter()
        .map(|i| u16::from_be_bytes([i[0], i[1]]))
        .collect();
    assert_eq!(types, vec![INFO_EXPORT, INFO_BLOCK_SIZE]);

    // GO on the default export, then transmission works.
    let (_, kind) = c.info(OPT_GO, "", &[]);
    assert_eq!(kind, REP_ACK);
    assert_eq!(
        c.read_ok(1, 4096, 4096),
        pattern(SIZE as usize, 1)[4096..8192]
    );
}

#[test]
fn export_name_option_with_and_without_zeroes() {
    let server = mem_server(true);
    let data = pattern(SIZE as usize, 1);
    for (client_flags, zeroes) in [(3u32, false), (1u32, true)] {
        let mut c = server.raw();
        assert_eq!(c.greeting(), 3);
        c.send(&client_flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"disk");
        assert_eq!(c.u64(), SIZE);
        assert_eq!(c.u16() & FLAG_HAS_FLAGS, FLAG_HAS_FLAGS);
        if zeroes {
            assert_eq!(c.recv(124), vec![0; 124]);
        }
        // A stray or missing zero would misalign this reply.
        assert_eq!(c.read_ok(1, 512, 512), data[512..1024]);
    }
    // Unknown name: the server can only hang up.
    let mut c = server.raw();
    c.start();
    c.option(OPT_EXPORT_NAME, b"nosuch");
    assert!(c.closed());
    still_serving(&server);
}

#[test]
fn abort_gets_ack_then_close() {
    let server = mem_server(false);
    let mut c = server.raw();
    c.start();
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());
    still_serving(&server);
}

#[test]
fn malformed_handshakes_close_only_their_connection() {
    let server = mem_server(false);
    // A client that connects and says nothing must not hold up others.
    let mut idle = server.raw();
    assert_eq!(idle.greeting(), 3);

    // Unknown client flags.
    let mut c = server.raw();
    c.greeting();
    c.send(&0x80u32.to_be_bytes());
    assert!(c.closed());
    still_serving(&server);

    // Bad option magic.
    let mut c = server.raw();
    c.start();
    c.send(b"BADMAGIC\0\0\0\x07\0\0\0\0");
    assert!(c.closed());
    still_serving(&server);

    // Absurd option length.
    let mut c = server.raw();
    c.start();
    c.send(
        &[
            &IHAVEOPT[..],
            &7u32.to_be_bytes(),
            &(1u32 << 30).to_be_bytes(),
        ]
        .concat(),
    );
    assert!(c.closed());
    still_serving(&server);

    // Hang-up in the middle of an option.
    let mut c = server.raw();
    c.start();
    c.send(
        &[
            &IHAVEOPT[..],
            &7u32.to_be_bytes(),
            &100u32.to_be_bytes(),
            &[0; 10],
        ]
        .concat(),
    );
    drop(c);
    still_serving(&server);
    drop(idle);
}

#[test]
fn transmission_errors() {
    let server = mem_server(false);
    let data = pattern(SIZE as usize, 1);
    let mut c = server.raw();
    c.go(EXPORT);

    c.request(0, 42, 1, 0, 0);
    assert_eq!(c.reply(), (EINVAL, 1));
    c.request(1 << 7, CMD_READ, 2, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 2), "unknown command flag");
    c.request(0, CMD_READ, 3, SIZE, 512);
    assert_eq!(c.reply(), (EINVAL, 3), "read past the end");
    c.request(0, CMD_READ, 4, SIZE - 256, 512);
    assert_eq!(c.reply(), (EINVAL, 4), "read across the end");
    c.request(0, CMD_READ, 5, u64::MAX - 10, 512);
    assert_eq!(c.reply(), (EINVAL, 5), "offset overflow");
    c.request(0, CMD_READ, 6, 0, 64 << 20);
    assert_eq!(c.reply(), (EINVAL, 6), "oversized read");
    c.write(7, SIZE - 256, &[9; 512]);
    assert_eq!(c.reply(), (ENOSPC, 7), "write across the end");
    c.request(0, CMD_TRIM, 8, SIZE, 4096);
    assert_eq!(c.reply(), (ENOSPC, 8));
    c.request(0, CMD_WRITE_ZEROES, 9, SIZE - 1, 2);
    assert_eq!(c.reply(), (ENOSPC, 9));
    c.request(0, CMD_READ, 10, 0, 0);
    assert_eq!(c.reply(), (0, 10), "zero-length read");
    // All of that left the device alone and the connection in step.
    assert_eq!(c.read_ok(11, SIZE - 512, 512), data[data.len() - 512..]);
    assert!(server.device.snapshot() == data);

    // Bad request magic: hang up.
    c.send(&[0u8; 28]);
    assert!(c.closed());

    // Oversized write: the payload is not read, hang up.
    let mut c = server.raw();
    c.go(EXPORT);
    c.request(0, CMD_WRITE, 1, 0, 33 << 20);
    assert!(c.closed());
    still_serving(&server);
}

#[test]
fn requests_overlap_on_one_connection() {
    // Reads of the first 4 KiB wait until a read elsewhere has completed.
    let server = TestServer::start(
        Arc::new(Recording::new(pattern(SIZE as usize, 2)).gated()),
        true,
        false,
    );
    let data = pattern(SIZE as usize, 2);
    let mut c = server.raw();
    c.go(EXPORT);
    c.request(0, CMD_READ, 1, 0, 4096);
    c.request(0, CMD_READ, 2, 65536, 4096);
    // With requests served one at a time, this times out instead.
    assert_eq!(c.reply(), (0, 2), "second request answered first");
    assert_eq!(c.recv(4096), data[65536..65536 + 4096]);
    assert_eq!(c.reply(), (0, 1));
    assert_eq!(c.recv(4096), data[..4096]);
}

#[test]
fn many_requests_in_flight() {
    let server = mem_server(false);
    let mut expect = server.device.snapshot();
    let mut c = server.raw();
    c.go(EXPORT);
    // More than the in-flight bound, all sent before reading any reply;
    // every block written once, so the order of completion does not matter.
    let n = 200u64;
    assert!(n * 4096 <= SIZE);
    for h in 0..n {
        let block = pattern(4096, h as u8);
        let off = h * 4096;
        expect[off as usize..off as usize + 4096].copy_from_slice(&block);
        if h % 3 == 0 {
            c.request(CMD_FLAG_FUA, CMD_WRITE, h, off, 4096);
            c.send(&block);
        } else {
            c.write(h, off, &block);
        }
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0);
        assert!(
            !std::mem::replace(&mut seen[h as usize], true),
            "handle {h} twice"
        );
    }
    c.request(0, CMD_FLUSH, n, 0, 0);
    assert_eq!(c.reply(), (0, n));
    assert!(server.device.snapshot() == expect, "device contents differ");
    assert_eq!(c.read_ok(n + 1, 0, 4096).len(), 4096);
}

#[test]
fn disc_finishes_in_flight_requests() {
    let server = mem_server(true);
    let mut c = server.raw();
    c.go(EXPORT);
    c.write(1, 8192, &[0x77; 4096]);
    c.request(0, CMD_DISC, 2, 0, 0);
    assert_eq!(c.reply(), (0, 1));
    assert!(c.closed());
    assert_eq!(server.device.snapshot()[8192..12288], [0x77; 4096]);
    still_serving(&server);
}

#[test]
fn trim_and_write_zeroes_zero_the_range() {
    let server = mem_server(false);
    let mut c = server.raw();
    c.go(EXPORT);
    c.request(0, CMD_TRIM, 1, 4096, 4096);
    assert_eq!(c.reply(), (0, 1));
    c.request(
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        2,
        16384,
        1000,
    );
    assert_eq!(c.reply(), (0, 2));
    let snap = server.device.snapshot();
    assert!(snap[4096..8192].iter().all(|b| *b == 0));
    assert!(snap[16384..17384].iter().all(|b| *b == 0));
    assert_eq!(snap[17384..17400], pattern(SIZE as usize, 1)[17384..17400]);
}

#[test]
fn present_blocks_are_read_at_once_and_the_rest_through_the_device() {
    let data = pattern(SIZE as usize, 3);
    let dev = Recording::new(data.clone()).present_below(SIZE / 2);
    let server = TestServer::start(Arc::new(dev), false, false);
    let mut c = server.raw();
    c.go(EXPORT);
    assert_eq!(c.read_ok(1, 4096, 8192), data[4096..12288]);
    assert_eq!(
        c.read_ok(2, SIZE / 2, 4096),
        data[SIZE as usize / 2..][..4096]
    );
    assert_eq!(
        server.device.ops(),
        [Op::ReadNow(4096, 8192), Op::Read(SIZE / 2, 4096)]
    );

    // A failing fast path is answered with its error, not retried.
    let dev = Recording::new(data)
        .present_below(SIZE / 2)
        .failing(SIZE / 4, ErrorKind::StorageFull);
    let server = TestServer::start(Arc::new(dev), false, false);
    let mut c = server.raw();
    c.go(EXPORT);
    c.request(0, CMD_READ, 3, SIZE / 4, 512);
    assert_eq!(c.reply(), (ENOSPC, 3));
    assert_eq!(server.device.ops(), [Op::ReadNow(SIZE / 4, 512)]);
}

#[test]
fn device_errors_become_nbd_errors() {
    for (kind, errno) in [
        (ErrorKind::Other, EIO),
        (ErrorKind::PermissionDenied, EPERM),
        (ErrorKind::StorageFull, ENOSPC),
        (ErrorKind::InvalidInput, EINVAL),
    ] {
        let dev = Recording::new(vec![0; SIZE as usize]).failing(SIZE / 2, kind);
        let server = TestServer::start(Arc::new(dev), false, false);
        let mut c = server.raw();
        c.go(EXPORT);
        c.request(0, CMD_READ, 1, SIZE / 2, 512);
        assert_eq!(c.reply(), (errno, 1), "{kind:?}");
        c.write(2, SIZE / 2, &[1; 512]);
        assert_eq!(c.reply(), (errno, 2), "{kind:?}");
        c.request(0, CMD_TRIM, 3, SIZE / 2, 512);
        assert_eq!(c.reply(), (errno, 3), "{kind:?}");
        // Still usable.
        assert_eq!(c.read_ok(4, 0, 512), vec![0; 512]);
    }
}

#[test]
fn listener_errors_and_cleanup() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let first = NbdListener::bind("127.0.0.1:0").await.unwrap();
        let d = first.describe();
        let addr = d.strip_prefix("nbd://").expect("nbd:// URI").to_owned();
        assert!(addr.starts_with("127.0.0.1:"));
        let err = NbdListener::bind(&addr).await.unwrap_err();
        assert!(matches!(err, NbdError::AddrInUse { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"").unwrap();
        let spec = format!("unix:{}", path.display());
        let err = NbdListener::bind(&spec).await.unwrap_err();
        assert!(matches!(err, NbdError::SocketPathExists { .. }), "{err:?}");
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

        for bad in ["nonsense", "unix:", "127.0.0.1"] {
            let err = NbdListener::bind(bad).await.unwrap_err();
            assert!(
                matches!(err, NbdError::InvalidAddress { .. }),
                "{bad}: {err:?}"
            );
        }
    });

    // serve removes its socket and drops open connections on shutdown.
    let mut server = mem_server(true);
    let Addr::Unix(path) = server.addr.clone() else {
        unreachable!()
    };
    assert_eq!(
        server.describe,
        format!("nbd+unix:///?socket={}", path.display())
    );
    assert!(path.exists());
    let mut c = server.raw();
    c.go(EXPORT);
    server.stop().unwrap();
    assert!(!path.exists(), "socket file left behind");
    assert!(c.closed());
}
