//! The client against an in-memory fake server (a tokio duplex pipe):
//! replies split in chunks and out of order, block status walked in
//! pieces, and hostile replies (huge lengths, unknown handles, chunks
//! outside the request) that must end in a clean error, at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_nbd_client::NbdUri;
use ferry_nbd_client::{
    dirty_bitmap_context, Command, Extent, NbdClient, NbdClientError, WireError, STATE_DIRTY,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

// Wire constants, written out independently of the crate under test.
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const DONE: u16 = 1;
const OFFSET_DATA: u16 = 1;
const OFFSET_HOLE: u16 = 2;
const BLOCK_STATUS: u16 = 5;
const ERROR: u16 = 0x8001;

/// Bound on every wait of these tests (generous: a loaded machine).
const LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
struct Req {
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data_chunk(flags: u16, handle: u64, at: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    chunk(flags, OFFSET_DATA, handle, &p)
}

fn hole_chunk(flags: u16, handle: u64, at: u64, n: u32) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend(n.to_be_bytes());
    chunk(flags, OFFSET_HOLE, handle, &p)
}

fn status_chunk(flags: u16, handle: u64, id: u32, ext: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (l, f) in ext {
        p.extend(l.to_be_bytes());
        p.extend(f.to_be_bytes());
    }
    chunk(flags, BLOCK_STATUS, handle, &p)
}

fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(opt.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The server's side of the negotiation: structured replies, the meta
/// contexts among `offered` (ids 1, 2, ... in that order), GO with `size`.
async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    size: u64,
    offered: &[&str],
) -> Option<()> {
    let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
    hello.extend(3u16.to_be_bytes());
    s.write_all(&hello).await.ok()?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await.ok()?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.ok()?;
        assert_eq!(&h[..8], b"IHAVEOPT");
        let opt = u32::from_be_bytes(h[8..12].try_into().ok()?);
        let len = u32::from_be_bytes(h[12..16].try_into().ok()?);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.ok()?;
        match opt {
            8 => s.write_all(&opt_reply(8, 1, &[])).await.ok()?,
            10 => {
                let nl = u32::from_be_bytes(data[0..4].try_into().ok()?) as usize;
                let mut at = 4 + nl;
                let n = u32::from_be_bytes(data[at..at + 4].try_into().ok()?);
                at += 4;
                for _ in 0..n {
                    let ql = u32::from_be_bytes(data[at..at + 4].try_into().ok()?) as usize;
                    let q = std::str::from_utf8(&data[at + 4..at + 4 + ql]).ok()?;
                    at += 4 + ql;
                    if let Some(i) = offered.iter().position(|o| *o == q) {
                        let mut r = (i as u32 + 1).to_be_bytes().to_vec();
                        r.extend_from_slice(q.as_bytes());
                        s.write_all(&opt_reply(10, 4, &r)).await.ok()?;
                    }
                }
                s.write_all(&opt_reply(10, 1, &[])).await.ok()?;
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend(size.to_be_bytes());
                info.extend(1u16.to_be_bytes()); // HAS_FLAGS
                s.write_all(&opt_reply(7, 3, &info)).await.ok()?;
                let mut bs = 3u16.to_be_bytes().to_vec();
                for v in [512u32, 4096, 32 << 20] {
                    bs.extend(v.to_be_bytes());
                }
                s.write_all(&opt_reply(7, 3, &bs)).await.ok()?;
                s.write_all(&opt_reply(7, 1, &[])).await.ok()?;
                return Some(());
            }
            2 => return None,
            other => panic!("fake server: unexpected option {other}"),
        }
    }
}

/// Reads one request; None when the client has gone.
async fn next_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Req> {
    let mut r = [0u8; 28];
    s.read_exact(&mut r).await.ok()?;
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().ok()?), 0x2560_9513);
    Some(Req {
        kind: u16::from_be_bytes(r[6..8].try_into().ok()?),
        handle: u64::from_be_bytes(r[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(r[16..24].try_into().ok()?),
        len: u32::from_be_bytes(r[24..28].try_into().ok()?),
    })
}

/// Serves one connection: the handshake, then each request answered with
/// `answer`'s bytes until the client closes (or sends DISC).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    size: u64,
    offered: &[&str],
    mut answer: impl FnMut(Req) -> Vec<u8>,
    log: Arc<Mutex<Vec<Req>>>,
) {
    if server_handshake(&mut s, size, offered).await.is_none() {
        return;
    }
    while let Some(req) = next_request(&mut s).await {
        log.lock().unwrap().push(req);
        if req.kind == 2 {
            return; // DISC: close
        }
        let out = answer(req);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A fake server task on an in-memory pipe, and the client connected to
/// it with `contexts`.
async fn start(
    size: u64,
    offered: &'static [&'static str],
    contexts: &[String],
    answer: impl FnMut(Req) -> Vec<u8> + Send + 'static,
) -> (Result<NbdClient, NbdClientError>, Arc<Mutex<Vec<Req>>>) {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(server_end, size, offered, answer, seen.clone()));
    let client = tokio::time::timeout(LIMIT, NbdClient::handshake(client_end, "disk", contexts))
        .await
        .expect("handshake within the limit");
    (client, seen)
}

/// Answers a READ with bytes equal to its offset in 512-byte sectors.
fn echo_offset(req: Req) -> Vec<u8> {
    let fill = (req.offset / 512) as u8;
    data_chunk(DONE, req.handle, req.offset, &vec![fill; req.len as usize])
}

#[tokio::test]
async fn connects_by_uri_over_tcp_and_unix_sockets() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = tcp.local_addr().expect("address").port();
    let l = log.clone();
    tokio::spawn(async move {
        if let Ok((s, _)) = tcp.accept().await {
            serve(s, 1 << 20, &[], echo_offset, l).await;
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nbd.sock");
    let unix = tokio::net::UnixListener::bind(&path).expect("bind unix socket");
    let l = log.clone();
    tokio::spawn(async move {
        if let Ok((s, _)) = unix.accept().await {
            serve(s, 1 << 20, &[], echo_offset, l).await;
        }
    });
    for uri in [
        format!("nbd://127.0.0.1:{port}/disk"),
        format!("nbd+unix:///disk?socket={}", path.display()),
    ] {
        let uri = NbdUri::parse(&uri).expect("uri");
        let client = tokio::time::timeout(LIMIT, NbdClient::connect(&uri, &[]))
            .await
            .expect("connect within the limit")
            .expect("connect");
        let got = tokio::time::timeout(LIMIT, client.read(7, 3))
            .await
            .expect("read within the limit");
        // min block 512: an unaligned read is refused locally.
        assert!(
            matches!(got, Err(NbdClientError::InvalidRequest { .. })),
            "{got:?}"
        );
        let got = tokio::time::timeout(LIMIT, client.read(512, 512))
            .await
            .expect("read within the limit")
            .expect("read");
        assert_eq!(got, vec![1u8; 512]);
        tokio::time::timeout(LIMIT, client.disconnect())
            .await
            .expect("disconnect within the limit")
            .expect("disconnect");
    }
    let kinds: Vec<u16> = log.lock().unwrap().iter().map(|r| r.kind).collect();
    assert_eq!(kinds, vec![0, 2, 0, 2], "READ then DISC on each connection");
}

fn bitmap() -> Vec<String> {
    vec![dirty_bitmap_context("b0")]
}

#[tokio::test]
async fn reads_split_in_chunks_answered_out_of_order() {
    // Requests are answered in pairs, the second one first, each as a hole
    // then the data (reverse order).
    let mut held: Option<Req> = None;
    let (client, _) = start(1 << 20, &[], &[], move |req| {
        let Some(first) = held.take() else {
            held = Some(req);
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in [req, first] {
            let half = r.len / 2;
            out.extend(hole_chunk(
                0,
                r.handle,
                r.offset + u64::from(half),
                r.len - half,
            ));
            out.extend(data_chunk(
                DONE,
                r.handle,
                r.offset,
                &vec![r.offset as u8 | 1; half as usize],
            ));
        }
        out
    })
    .await;
    let client = client.expect("handshake");
    assert_eq!(client.size(), 1 << 20);
    assert_eq!(client.info().min_block(), 512);
    let (a, b) = tokio::time::timeout(LIMIT, async {
        tokio::join!(client.read(4096, 8192), client.read(65536, 1024))
    })
    .await
    .expect("both reads answered");
    let a = a.expect("first read");
    let b = b.expect("second read");
    assert_eq!(&a[..4096], &[1u8; 4096][..]);
    assert_eq!(&a[4096..], &[0u8; 4096][..]);
    assert_eq!(&b[..512], &[1u8; 512][..]);
    assert_eq!(&b[512..], &[0u8; 512][..]);
    tokio::time::timeout(LIMIT, client.disconnect())
        .await
        .expect("disconnect within the limit")
        .expect("disconnect");
}

#[tokio::test]
async fn extents_walk_a_large_disk_in_pieces() {
    // 10 GiB: more than one 32-bit request. The server describes only
    // 3 GiB of each request, in 1 GiB extents alternating dirty/clean by
    // position, the last one running 1 MiB past what it was asked.
    const GIB: u64 = 1 << 30;
    let size = 10 * GIB;
    let (client, seen) = start(size, &["qemu:dirty-bitmap:b0"], &bitmap(), |req| {
        let req_end = req.offset + u64::from(req.len);
        let end = req_end.min(req.offset + 3 * GIB);
        let mut ext = Vec::new();
        let mut pos = req.offset;
        while pos < end {
            let next = ((pos / GIB) + 1) * GIB;
            let mut l = next.min(end) - pos;
            if next >= end && end == req_end {
                l += 1 << 20;
            }
            ext.push((l as u32, ((pos / GIB) % 2) as u32));
            pos = next.min(end);
        }
        status_chunk(DONE, req.handle, 1, &ext)
    })
    .await;
    let client = client.expect("handshake");
    let got = tokio::time::timeout(LIMIT, client.extents(&bitmap()[0], 0, size))
        .await
        .expect("walk within the limit")
        .expect("extents");
    let want: Vec<Extent> = (0..10)
        .map(|i| Extent {
            offset: i * GIB,
            length: GIB,
            flags: (i % 2) as u32,
        })
        .collect();
    assert_eq!(got, want);
    let reqs = seen.lock().unwrap().clone();
    assert!(reqs.len() >= 4, "a 10 GiB walk in 3 GiB answers: {reqs:?}");
    let mut pos = 0;
    for r in &reqs {
        assert_eq!(r.kind, 7, "only BLOCK_STATUS: {reqs:?}");
        assert_eq!(
            r.offset, pos,
            "each piece starts where the last answer ended"
        );
        assert_eq!(r.offset % 512, 0);
        assert!(r.offset + u64::from(r.len) <= size);
        pos += (3 * GIB).min(u64::from(r.len));
    }
    assert_eq!(got.iter().filter(|e| e.flags & STATE_DIRTY != 0).count(), 5);
}

#[tokio::test]
async fn missing_bitmap_is_a_typed_error() {
    let (client, _) = start(1 << 20, &["base:allocation"], &bitmap(), |_| Vec::new()).await;
    match client {
        Err(NbdClientError::MetaContextNotOffered {
            export, context, ..
        }) => {
            assert_eq!(export, "disk");
            assert_eq!(context, "qemu:dirty-bitmap:b0");
        }
        other => panic!("expected MetaContextNotOffered, got {other:?}"),
    }
}

#[tokio::test]
async fn server_error_chunk_names_the_request_and_keeps_the_connection() {
    let (client, _) = start(1 << 20, &[], &[], |req| {
        if req.offset == 0 {
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend(9u16.to_be_bytes());
            p.extend_from_slice(b"bad block");
            chunk(DONE, ERROR, req.handle, &p)
        } else {
            data_chunk(DONE, req.handle, req.offset, &vec![7; req.len as usize])
        }
    })
    .await;
    let client = client.expect("handshake");
    let e = tokio::time::timeout(LIMIT, client.read(0, 4096))
        .await
        .expect("answered")
        .expect_err("server error");
    let text = e.to_string();
    assert!(
        matches!(&e, NbdClientError::Server { op: Command::Read, offset: 0, len: 4096, error } if error.errno == 5),
        "{e:?}"
    );
    assert!(
        text.contains("offset 0") && text.contains("EIO") && text.contains("bad block"),
        "{text}"
    );
    let ok = tokio::time::timeout(LIMIT, client.read(4096, 512))
        .await
        .expect("answered")
        .expect("the connection is still usable");
    assert_eq!(ok, vec![7; 512]);
}

/// A hostile reply gives `expect`'s error to the request at once (not a
/// wait for bytes that never come, not a panic) and makes the connection
/// unusable for the next request.
async fn hostile(
    reply: fn(Req) -> Vec<u8>,
    contexts: Vec<String>,
    check: fn(&NbdClientError) -> bool,
) {
    let offered: &'static [&'static str] = &["qemu:dirty-bitmap:b0"];
    let (client, _) = start(1 << 30, offered, &contexts, reply).await;
    let client = client.expect("handshake");
    let e = if contexts.is_empty() {
        tokio::time::timeout(LIMIT, client.read(8192, 4096)).await
    } else {
        tokio::time::timeout(LIMIT, async {
            client.block_status(8192, 4096).await.map(|_| Vec::new())
        })
        .await
    }
    .expect("a hostile reply is refused without waiting for its payload")
    .expect_err("a hostile reply is an error");
    assert!(check(&e), "unexpected error: {e:?}");
    let again = tokio::time::timeout(LIMIT, client.read(0, 512))
        .await
        .expect("answered at once")
        .expect_err("connection unusable");
    assert!(
        matches!(again, NbdClientError::ConnectionLost { .. }),
        "{again:?}"
    );
}

#[tokio::test]
async fn hostile_huge_data_chunk() {
    // A header announcing ~4 GiB of data, and nothing after it.
    hostile(
        |req| {
            let mut h = STRUCTURED_MAGIC.to_be_bytes().to_vec();
            h.extend(DONE.to_be_bytes());
            h.extend(OFFSET_DATA.to_be_bytes());
            h.extend(req.handle.to_be_bytes());
            h.extend(0xFFFF_FFF0u32.to_be_bytes());
            h
        },
        Vec::new(),
        |e| {
            matches!(
                e,
                NbdClientError::Protocol {
                    op: Command::Read,
                    offset: 8192,
                    len: 4096,
                    source: WireError::BadChunkLength {
                        length: 0xFFFF_FFF0,
                        ..
                    }
                }
            )
        },
    )
    .await;
}

#[tokio::test]
async fn hostile_huge_block_status_chunk() {
    hostile(
        |req| {
            let mut h = STRUCTURED_MAGIC.to_be_bytes().to_vec();
            h.extend(DONE.to_be_bytes());
            h.extend(BLOCK_STATUS.to_be_bytes());
            h.extend(req.handle.to_be_bytes());
            h.extend(0x8000_0004u32.to_be_bytes());
            h
        },
        bitmap(),
        |e| {
            matches!(
                e,
                NbdClientError::Protocol {
                    op: Command::BlockStatus,
                    source: WireError::BadChunkLength { .. },
                    ..
                }
            )
        },
    )
    .await;
}

#[tokio::test]
async fn hostile_wrong_handle() {
    hostile(
        |req| {
            data_chunk(
                DONE,
                req.handle + 1000,
                req.offset,
                &vec![1; req.len as usize],
            )
        },
        Vec::new(),
        |e| matches!(e, NbdClientError::ConnectionLost { reason, .. } if reason.contains("handle")),
    )
    .await;
}

#[tokio::test]
async fn hostile_chunk_beyond_the_request() {
    hostile(
        |req| {
            data_chunk(
                DONE,
                req.handle,
                req.offset + 512,
                &vec![1; req.len as usize],
            )
        },
        Vec::new(),
        |e| {
            matches!(
                e,
                NbdClientError::Protocol {
                    source: WireError::OutsideRequest { offset: 8704, .. },
                    ..
                }
            )
        },
    )
    .await;
}

#[tokio::test]
async fn hostile_bad_magic_and_short_read() {
    hostile(
        |_| b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        Vec::new(),
        |e| matches!(e, NbdClientError::ConnectionLost { reason, .. } if reason.contains("magic")),
    )
    .await;
    hostile(
        |req| data_chunk(DONE, req.handle, req.offset, &[1; 512]),
        Vec::new(),
        |e| {
            matches!(
                e,
                NbdClientError::Protocol {
                    source: WireError::IncompleteRead {
                        covered: 512,
                        len: 4096
                    },
                    ..
                }
            )
        },
    )
    .await;
}

#[tokio::test]
async fn requests_past_the_end_or_misaligned_are_refused_locally() {
    let (client, seen) = start(128 << 20, &[], &[], |_| Vec::new()).await;
    let client = client.expect("handshake");
    for (off, len) in [((128 << 20) - 512, 1024), (100, 512), (0, 0)] {
        let e = client.read(off, len).await.expect_err("refused");
        assert!(matches!(e, NbdClientError::InvalidRequest { .. }), "{e:?}");
    }
    let e = client.read(0, 64 << 20).await.expect_err("too long");
    assert!(e.to_string().contains("largest read"), "{e}");
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
}
