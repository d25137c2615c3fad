//! The client against the real qemu-storage-daemon (Debian's
//! qemu-system-common), each test with its own daemon on sockets in its own
//! temporary directory: reads match the image (holes included), the
//! `qemu:dirty-bitmap` context reports exactly what qemu-io wrote through
//! the export (as `nbdinfo --map` does), clearing the bitmap starts a new
//! round, a missing bitmap is a typed error, and a disk larger than one
//! 32-bit request is walked whole. A missing tool fails the test.

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_nbd_client::{
    dirty_bitmap_context, Extent, NbdClient, NbdClientError, NbdUri, BASE_ALLOCATION, STATE_DIRTY,
    STATE_HOLE, STATE_ZERO,
};
use ferry_tests::make_image;
use ferry_tests::qmp::{need_tool, StorageDaemon};
use serde_json::json;

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 * 1024;
/// Bound on each client operation (generous: a loaded machine).
const LIMIT: Duration = Duration::from_secs(120);

fn block<T>(rt: &tokio::runtime::Runtime, f: impl Future<Output = T>) -> T {
    rt.block_on(async { tokio::time::timeout(LIMIT, f).await })
        .expect("client operation within the time limit")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs qemu-io commands on the export (writes go through the daemon, so
/// its dirty bitmap sees them).
fn qemu_io(qsd: &StorageDaemon, cmds: &[&str]) -> String {
    need_tool("qemu-io", "qemu-utils");
    let (ok, text) = ferry_tests::qemu_io_nbd(&qsd.nbd_socket, "disk0", 120, &[], cmds);
    assert!(ok, "qemu-io {cmds:?}: {text}");
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

/// Adjacent extents with equal flags merged.
fn merged(list: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in list {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.end() == e.offset => l.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

/// `nbdinfo --map=CONTEXT` of export `disk0`, merged.
fn nbdinfo_map(qsd: &StorageDaemon, context: &str) -> Vec<Extent> {
    nbdinfo_map_of(qsd, "disk0", context)
}

/// `nbdinfo --map=CONTEXT` of `export`, merged.
fn nbdinfo_map_of(qsd: &StorageDaemon, export: &str, context: &str) -> Vec<Extent> {
    need_tool("nbdinfo", "libnbd-bin");
    let out = Command::new("timeout")
        .args([
            "120",
            "nbdinfo",
            &format!("--map={context}"),
            &qsd.uri(export),
        ])
        .output()
        .expect("run nbdinfo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nbdinfo --map={context}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    merged(text.lines().map(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .take(3)
            .map(|w| w.parse().expect("nbdinfo --map: a number"))
            .collect();
        Extent {
            offset: f[0],
            length: f[1],
            flags: f[2] as u32,
        }
    }))
}

/// The dirty ranges (offset, length) among `extents`.
fn dirty(extents: &[Extent]) -> Vec<(u64, u64)> {
    extents
        .iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect()
}

/// The 64 KiB-granular range a write of `len` bytes at `offset` dirties.
fn grains(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / GRAIN * GRAIN;
    let end = (offset + len).div_ceil(GRAIN) * GRAIN;
    (start, end - start)
}

fn connect(
    rt: &tokio::runtime::Runtime,
    qsd: &StorageDaemon,
    contexts: &[String],
) -> Result<NbdClient, NbdClientError> {
    let uri = NbdUri::parse(&qsd.uri("disk0")).expect("the daemon's URI parses");
    block(rt, NbdClient::connect(&uri, contexts))
}

fn daemon_with_bitmap(dir: &Path, image: &Path) -> StorageDaemon {
    let mut qsd = StorageDaemon::start(dir, image);
    qsd.export_with_bitmap("b0");
    qsd
}

#[test]
fn reads_match_the_image_holes_included() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let size = 64 * MIB;
    make_image(
        &image,
        size,
        &[(0, MIB), (5 * MIB + 4096, 300_000), (size - 8192, 8192)],
        42,
    );
    let expect = std::fs::read(&image).expect("read the image");
    let qsd = daemon_with_bitmap(dir.path(), &image);
    let rt = runtime();
    let client = Arc::new(
        connect(&rt, &qsd, &[BASE_ALLOCATION.to_string()]).expect("connect with base:allocation"),
    );
    assert_eq!(client.size(), size);

    // Single reads: data, data then hole, all hole (OFFSET_HOLE), the end.
    for (off, len) in [
        (0, MIB),
        (5 * MIB, 2 * MIB),
        (30 * MIB, 4 * MIB),
        (size - 65536, 65536),
        (5 * MIB + 4095, 3),
    ] {
        let got = block(&rt, client.read(off, len as u32)).expect("read");
        let want = &expect[off as usize..(off + len) as usize];
        assert!(got == want, "bytes at {off}+{len} differ from the image");
    }

    // The whole disk, 16 reads of 4 MiB in flight at once.
    let whole = block(&rt, async {
        let tasks: Vec<_> = (0..size / (4 * MIB))
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.read(i * 4 * MIB, 4 * MIB as u32).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.extend(t.await.expect("read task").expect("read"));
        }
        out
    });
    assert_eq!(
        blake3::hash(&whole),
        blake3::hash(&expect),
        "the whole disk read through the client differs from the image"
    );

    // base:allocation: the holes are holes, as nbdinfo sees them too.
    let alloc = merged(block(&rt, client.extents(BASE_ALLOCATION, 0, size)).expect("extents"));
    assert_eq!(alloc, nbdinfo_map(&qsd, BASE_ALLOCATION));
    let at = |pos: u64| {
        alloc
            .iter()
            .find(|e| e.offset <= pos && pos < e.end())
            .expect("covered")
            .flags
    };
    assert_eq!(at(0), 0, "data at 0: {alloc:?}");
    assert_eq!(
        at(32 * MIB),
        STATE_HOLE | STATE_ZERO,
        "hole at 32 MiB: {alloc:?}"
    );
    assert_eq!(at(size - 1), 0, "data at the end: {alloc:?}");
    assert_eq!(alloc.first().map(|e| e.offset), Some(0));
    assert_eq!(alloc.last().map(|e| e.end()), Some(size));

    let client = Arc::try_unwrap(client).expect("one owner left");
    block(&rt, client.disconnect()).expect("disconnect");
}

#[test]
fn dirty_bitmap_reports_exactly_the_written_grains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let size = 64 * MIB;
    make_image(&image, size, &[(0, 2 * MIB)], 7);
    let qsd = daemon_with_bitmap(dir.path(), &image);
    let rt = runtime();
    let bitmap = dirty_bitmap_context("b0");
    let contexts = [bitmap.clone(), BASE_ALLOCATION.to_string()];
    let client = connect(&rt, &qsd, &contexts).expect("connect with the bitmap");
    assert_eq!(
        client
            .info()
            .contexts
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>(),
        contexts
    );

    let before = block(&rt, client.extents(&bitmap, 0, size)).expect("extents");
    assert_eq!(dirty(&before), vec![], "nothing written yet: {before:?}");

    let writes = [
        (4096u64, 4096u64, 0xabu8),
        (1_000_000, 200_000, 0xcd),
        (48 * MIB, 65536, 0xef),
        (size - 65536, 65536, 0x11),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    qemu_io(&qsd, &cmds.iter().map(String::as_str).collect::<Vec<_>>());

    let after = block(&rt, client.extents(&bitmap, 0, size)).expect("extents");
    let want: Vec<(u64, u64)> = writes.iter().map(|(o, l, _)| grains(*o, *l)).collect();
    assert_eq!(dirty(&after), want, "dirty map: {after:?}");
    assert_eq!(merged(after.clone()), nbdinfo_map(&qsd, &bitmap));
    assert_eq!(after.last().map(|e| e.end()), Some(size));

    // The written bytes read back through the client.
    for (o, l, p) in writes {
        let got = block(&rt, client.read(o, l as u32)).expect("read");
        assert!(
            got.iter().all(|b| *b == p),
            "bytes at {o}+{l} are not {p:#x}"
        );
    }

    // base:allocation on the same connection: the written 48 MiB grain is
    // data now, 32 MiB is still a hole.
    let alloc = block(&rt, client.extents(BASE_ALLOCATION, 0, size)).expect("extents");
    let flags_at = |pos: u64| {
        alloc
            .iter()
            .find(|e| e.offset <= pos && pos < e.end())
            .expect("covered")
            .flags
    };
    assert_eq!(flags_at(48 * MIB), 0, "{alloc:?}");
    assert_eq!(flags_at(32 * MIB), STATE_HOLE | STATE_ZERO, "{alloc:?}");
    block(&rt, client.disconnect()).expect("disconnect");
}

/// Ends generation `old` and starts `new` in one transaction (every write
/// after it lands in `new`), then exports the frozen `old` as export `old`.
fn next_generation(qsd: &mut StorageDaemon, old: &str, new: &str) {
    qsd.qmp
        .execute(
            "transaction",
            json!({ "actions": [
                { "type": "block-dirty-bitmap-add",
                  "data": { "node": "disk0", "name": new, "granularity": 65536 } },
                { "type": "block-dirty-bitmap-disable",
                  "data": { "node": "disk0", "name": old } },
            ] }),
        )
        .expect("the generation switch");
    qsd.export(&format!("e-{old}"), old, &[old], false)
        .expect("export the frozen generation");
}

/// Deletes export `e-{name}` (its clients gone), retrying while the server
/// still holds it (bounded).
fn unexport(qsd: &mut StorageDaemon, name: &str) {
    let mut last = None;
    for _ in 0..200 {
        match qsd
            .qmp
            .execute("block-export-del", json!({ "id": format!("e-{name}") }))
        {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("block-export-del e-{name}: {last:?}");
}

fn dirty_of(rt: &tokio::runtime::Runtime, qsd: &StorageDaemon, gen: &str) -> Vec<Extent> {
    let uri = NbdUri::parse(&qsd.uri(gen)).expect("uri");
    let ctx = dirty_bitmap_context(gen);
    let client = block(rt, NbdClient::connect(&uri, std::slice::from_ref(&ctx))).expect("connect");
    let size = client.size();
    let map = block(rt, client.extents(&ctx, 0, size)).expect("extents");
    block(rt, client.disconnect()).expect("disconnect");
    map
}

#[test]
fn bitmap_generations_give_pre_copy_rounds() {
    // The pre-copy round mechanism: the recording bitmap is never exported
    // (QEMU refuses to clear, disable or merge an exported one); a round
    // ends by starting the next generation and freezing the last in one
    // transaction, and the frozen one is exported and read.
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let size = 32 * MIB;
    make_image(&image, size, &[(0, MIB)], 3);
    let mut qsd = StorageDaemon::start(dir.path(), &image);
    qsd.qmp
        .execute(
            "block-dirty-bitmap-add",
            json!({ "node": "disk0", "name": "g0", "granularity": 65536 }),
        )
        .expect("block-dirty-bitmap-add g0");
    qsd.export("data", "disk0", &[], true)
        .expect("the writable export");
    let rt = runtime();

    qemu_io(
        &qsd,
        &["write -P 0x22 0 131072", "write -P 0x33 10485760 4096"],
    );
    next_generation(&mut qsd, "g0", "g1");
    qemu_io(&qsd, &["write -P 0x44 2097162 100"]);
    // g0 is frozen at the switch: the write after it is not in it.
    let g0 = dirty_of(&rt, &qsd, "g0");
    assert_eq!(dirty(&g0), vec![(0, 131072), (10 * MIB, GRAIN)], "{g0:?}");
    assert_eq!(
        merged(g0),
        nbdinfo_map_of(&qsd, "g0", "qemu:dirty-bitmap:g0")
    );
    // An exported bitmap is busy: why rounds are generations, not clears.
    let busy = qsd.qmp.execute(
        "block-dirty-bitmap-clear",
        json!({ "node": "disk0", "name": "g0" }),
    );
    assert!(busy.is_err(), "QEMU cleared an exported bitmap: {busy:?}");

    // The next round sees only the writes since the last switch.
    next_generation(&mut qsd, "g1", "g2");
    qemu_io(&qsd, &["write -P 0x55 20971520 65536"]);
    let g1 = dirty_of(&rt, &qsd, "g1");
    assert_eq!(dirty(&g1), vec![grains(2_097_162, 100)], "{g1:?}");

    // A round that failed (its changes not taken) is merged back into the
    // recording generation once unexported: nothing is lost.
    unexport(&mut qsd, "g1");
    qsd.qmp
        .execute(
            "block-dirty-bitmap-merge",
            json!({ "node": "disk0", "target": "g2", "bitmaps": ["g1"] }),
        )
        .expect("merge the failed round back");
    next_generation(&mut qsd, "g2", "g3");
    let g2 = dirty_of(&rt, &qsd, "g2");
    assert_eq!(
        dirty(&g2),
        vec![grains(2_097_162, 100), (20 * MIB, GRAIN)],
        "{g2:?}"
    );

    // A generation taken is retired; cleared, it reads all clean.
    unexport(&mut qsd, "g0");
    qsd.qmp
        .execute(
            "block-dirty-bitmap-clear",
            json!({ "node": "disk0", "name": "g0" }),
        )
        .expect("clear the retired generation");
    qsd.export("e-g0", "g0", &["g0"], false)
        .expect("export g0 again");
    let cleared = dirty_of(&rt, &qsd, "g0");
    assert_eq!(
        cleared,
        vec![Extent {
            offset: 0,
            length: size,
            flags: 0
        }]
    );
}

#[test]
fn a_bitmap_the_export_lacks_is_a_typed_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, 4 * MIB, &[], 1);
    let qsd = daemon_with_bitmap(dir.path(), &image);
    let rt = runtime();
    let err = connect(
        &rt,
        &qsd,
        &[BASE_ALLOCATION.to_string(), dirty_bitmap_context("nope")],
    )
    .expect_err("no bitmap `nope` is exported");
    match &err {
        NbdClientError::MetaContextNotOffered {
            export,
            context,
            offered,
        } => {
            assert_eq!(export, "disk0");
            assert_eq!(context, "qemu:dirty-bitmap:nope");
            assert_eq!(offered, &vec![BASE_ALLOCATION.to_string()]);
        }
        other => panic!("expected MetaContextNotOffered, got {other:?}"),
    }
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"), "{err}");

    // An export that does not exist: typed too.
    let uri = NbdUri::parse(&qsd.uri("other")).expect("uri");
    let err = block(&rt, NbdClient::connect(&uri, &[])).expect_err("no such export");
    assert!(
        matches!(&err, NbdClientError::NoSuchExport { export, .. } if export == "other"),
        "{err:?}"
    );
}

#[test]
fn a_disk_beyond_one_32_bit_request_is_walked_whole() {
    // 9 GiB, sparse (no space used): BLOCK_STATUS lengths are 32-bit, so
    // the walk takes several requests.
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let size = 9u64 << 30;
    make_image(&image, size, &[], 5);
    let qsd = daemon_with_bitmap(dir.path(), &image);
    let rt = runtime();
    let bitmap = dirty_bitmap_context("b0");
    let client =
        connect(&rt, &qsd, &[bitmap.clone(), BASE_ALLOCATION.to_string()]).expect("connect");

    let writes = [(5u64 << 30) + 12_345, (15u64 << 29) - 4096, size - 1];
    let cmds: Vec<String> = writes
        .iter()
        .map(|o| format!("write -P 0x5a {o} 1"))
        .collect();
    qemu_io(&qsd, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let d = block(&rt, client.extents(&bitmap, 0, size)).expect("extents");
    let want: Vec<(u64, u64)> = writes.iter().map(|o| grains(*o, 1)).collect();
    assert_eq!(dirty(&d), want, "{d:?}");
    assert_eq!(d.first().map(|e| e.offset), Some(0));
    assert_eq!(d.last().map(|e| e.end()), Some(size));
    assert_eq!(merged(d), nbdinfo_map(&qsd, &bitmap));

    let alloc = block(&rt, client.extents(BASE_ALLOCATION, 0, size)).expect("extents");
    assert_eq!(alloc.last().map(|e| e.end()), Some(size));
    assert!(
        alloc
            .iter()
            .filter(|e| e.flags & STATE_HOLE == 0)
            .all(|e| writes.iter().any(|w| e.offset <= *w && *w < e.end())),
        "only the written blocks are data: {alloc:?}"
    );
    let last = block(&rt, client.read(size - 512, 512)).expect("read the last sector");
    assert_eq!(last[511], 0x5a);
    assert!(last[..511].iter().all(|b| *b == 0));
    block(&rt, client.disconnect()).expect("disconnect");
}
