//! The server driven by real clients: qemu-io and qemu-img.

mod common;

use std::sync::Arc;

use common::*;
use ferry_device::MemDevice;

const SIZE: usize = 4 << 20;

/// The qemu-io session of the round-trip tests and the contents it leaves
/// on a zeroed device.
fn round_trip(unix: bool) {
    if !have_tool("qemu-io") {
        return;
    }
    let server = TestServer::start(Arc::new(Recording::new(vec![0; SIZE])), unix, false);
    let url = server.url(EXPORT);
    let out = qemu_io_ok(
        &url,
        &[
            "write -P 0x11 0 131072",
            "write -P 0xab 4096 8192",
            "read -P 0xab 4096 8192",
            "read -P 0x11 0 4096",
            "flush",
            "write -z 0 4096",
            "read -P 0 0 4096",
            "discard 65536 65536",
            "read -P 0 65536 65536",
            "write -f -P 0xcd 1048576 4096",
            "write -z -f 1052672 4096",
            "aio_write -P 0xee 2097152 65536",
            "aio_write -P 0xef 2162688 65536",
            "aio_flush",
            "read -P 0xee 2097152 65536",
            "read -P 0 4190208 4096",
        ],
    );
    assert!(
        out.contains("wrote 8192/8192 bytes at offset 4096"),
        "{out}"
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 2097152"),
        "{out}"
    );

    let mut expect = vec![0u8; SIZE];
    expect[0..131072].fill(0x11);
    expect[4096..12288].fill(0xab);
    expect[0..4096].fill(0);
    expect[65536..131072].fill(0);
    expect[1048576..1052672].fill(0xcd);
    expect[2097152..2162688].fill(0xee);
    expect[2162688..2228224].fill(0xef);
    let got = server.device.mem.snapshot();
    assert!(
        got == expect,
        "device contents differ from what qemu-io wrote"
    );

    let ops = server.device.ops();
    assert!(
        ops.contains(&Op::Flush),
        "no flush reached the device: {ops:?}"
    );
    assert!(
        ops.contains(&Op::Write {
            offset: 1048576,
            len: 4096,
            fua: true
        }),
        "FUA write not passed on: {ops:?}"
    );
    assert!(
        ops.iter().any(|op| matches!(
            op,
            Op::Zeroes {
                offset: 0,
                len: 4096,
                fua: false
            }
        )),
        "write -z did not become WRITE_ZEROES: {ops:?}"
    );
    assert!(
        ops.iter().any(|op| matches!(
            op,
            Op::Zeroes {
                offset: 1052672,
                fua: true,
                ..
            }
        )),
        "FUA write-zeroes not passed on: {ops:?}"
    );
    assert!(
        ops.contains(&Op::Trim(65536, 65536)),
        "discard did not become TRIM: {ops:?}"
    );
}

#[test]
fn qemu_io_round_trip_tcp() {
    round_trip(false);
}

#[test]
fn qemu_io_round_trip_unix() {
    round_trip(true);
}

#[test]
fn default_and_unknown_export_names() {
    if !have_tool("qemu-io") {
        return;
    }
    let data = pattern(1 << 20, 7);
    let server = TestServer::start(Arc::new(MemDevice::from_bytes(data.clone())), false, false);
    // The default export "" is the same disk.
    qemu_io_ok(
        &server.url(""),
        &["write -P 0x42 0 512", "read -P 0x42 0 512"],
    );
    assert_eq!(&server.device.snapshot()[..512], &[0x42; 512][..]);
    assert_eq!(server.device.snapshot()[512..], data[512..]);

    let out = qemu_io(&server.url("nosuch"), &["read 0 512"], false);
    assert!(
        !out.status.success(),
        "unknown export was opened: {}",
        text(&out)
    );
    // The server keeps serving.
    qemu_io_ok(&server.url(EXPORT), &["read -P 0x42 0 512"]);
}

#[test]
fn qemu_img_info_convert_compare() {
    if !have_tool("qemu-img") {
        return;
    }
    let size = 3 * 1024 * 1024 + 512; // not a multiple of 4096
    let data = pattern(size, 3);
    let server = TestServer::start(Arc::new(MemDevice::from_bytes(data.clone())), false, false);
    let url = server.url(EXPORT);
    let dir = tempfile::tempdir().unwrap();

    let out = run("qemu-img", &["info", "--output=json", &url]);
    assert!(out.status.success());
    let t = text(&out);
    assert!(t.contains(&format!("\"virtual-size\": {size}")), "{t}");

    // Export -> file.
    let copy = dir.path().join("copy.raw");
    let copy_s = copy.to_str().unwrap();
    let out = run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, copy_s],
    );
    assert!(out.status.success());
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "converted image differs"
    );

    // compare: equal, then one byte off must be reported.
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", copy_s, &url],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut changed = data.clone();
    changed[size - 100] ^= 0xff;
    std::fs::write(&copy, &changed).unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", copy_s, &url],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // File -> export, with qemu-img's parallel writers and zero detection.
    let mut src = pattern(size, 99);
    src[1 << 20..2 << 20].fill(0);
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-m",
            "16",
            "-W",
            "-f",
            "raw",
            "-O",
            "raw",
            src_path.to_str().unwrap(),
            &url,
        ],
    );
    assert!(out.status.success());
    assert!(
        server.device.snapshot() == src,
        "export differs after convert into it"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    if !have_tool("qemu-io") {
        return;
    }
    let data = pattern(1 << 20, 5);
    let server = TestServer::start(Arc::new(MemDevice::from_bytes(data.clone())), true, true);
    let url = server.url(EXPORT);
    let out = qemu_io(&url, &["read 0 4096"], true);
    assert!(out.status.success(), "{}", text(&out));

    for cmd in ["write -P 0xab 0 4096", "write -z 0 4096", "discard 0 4096"] {
        let out = qemu_io(&url, &[cmd], false);
        let t = text(&out);
        assert!(
            !out.status.success() || t.contains("failed") || t.contains("ermission"),
            "{cmd} on a read-only export looked successful: {t}"
        );
    }
    assert!(
        server.device.snapshot() == data,
        "read-only export was modified"
    );

    // The protocol answer itself.
    let mut c = server.raw();
    let (_, flags) = c.go(EXPORT);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    c.write(1, 0, &[1; 512]);
    assert_eq!(c.reply(), (EPERM, 1));
    c.request(0, CMD_TRIM, 2, 0, 512);
    assert_eq!(c.reply(), (EPERM, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512);
    assert_eq!(c.reply(), (EPERM, 3));
    assert_eq!(c.read_ok(4, 0, 512), data[..512]);
    assert!(server.device.snapshot() == data);
}

#[test]
fn qemu_io_requests_overlap_on_one_connection() {
    if !have_tool("qemu-io") {
        return;
    }
    // Reads of the first 4 KiB block until a read elsewhere has completed:
    // with one request at a time the aio_read would never finish and
    // qemu-io would be killed by its timeout.
    let dev = Arc::new(Recording::new(vec![0x5a; 1 << 20]).gated());
    let server = TestServer::start(dev, false, false);
    qemu_io_ok(
        &server.url(EXPORT),
        &[
            "aio_read -P 0x5a 0 4096",
            "read -P 0x5a 65536 4096",
            "aio_flush",
        ],
    );
    let ops = server.device.ops();
    assert!(ops.contains(&Op::Read(0, 4096)), "{ops:?}");
}
