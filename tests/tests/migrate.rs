//! End-to-end migrations with real NBD clients: on-demand reads before any
//! background copy, guest writes during the copy, byte-for-byte results,
//! bytes on the wire for a sparse disk, kill -9 and resume, corrupted
//! chunks, a source that goes away and comes back, and a first FLUSH that
//! must wait for a fresh disk's files to be durable.

use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbd_reads_fetch_on_demand_and_writes_survive_the_copy() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(
        &src,
        64 * MIB,
        &[(MIB, 8 * MIB), (40 * MIB, 3 * MIB + 12345)],
        1,
    );
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);

    // `ferry status | true`: a reader that went away before the output
    // came is no error (it was a panic on EPIPE).
    let piped = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' status --control '{}' | true",
            ferry_bin().display(),
            w.path("ctl.sock").display()
        ))
        .output()
        .expect("run bash");
    assert!(
        piped.status.success() && piped.stderr.is_empty(),
        "status into a closed pipe: {:?} {}",
        piped.status,
        String::from_utf8_lossy(&piped.stderr)
    );

    // Background held back: a read of an untouched region returns the
    // source's bytes, fetched on demand.
    let src_bytes = std::fs::read(&src).unwrap();
    let off = 5 * MIB + 4096;
    let out = w.qemu_io(&[&format!("read -v {off} 16")]);
    let first: Vec<String> = src_bytes[off as usize..off as usize + 16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        out.contains(&first.join(" ")),
        "on-demand read returned other bytes than the source's: {out}"
    );
    let s = w.status();
    assert_eq!(s["background"], "paused");
    assert_eq!(s["fetched_background_bytes"], 0);
    assert!(
        s["fetched_on_demand_bytes"].as_u64().unwrap() >= 4096,
        "{s}"
    );
    assert!(s["present_bytes"].as_u64().unwrap() < 64 * MIB);

    // Guest writes during the copy: whole blocks, sub-block (read-modify-
    // write of an absent block), into a zero region, zeroes and discard.
    w.qemu_io(&[
        "write -P 0xa1 2097152 65536",
        "write -P 0xb2 41943140 100",
        "write -P 0xc3 20971520 8192",
        "write -z 1052672 4096",
        "flush",
        "read -P 0xa1 2097152 65536",
        "read -P 0xb2 41943140 100",
    ]);
    let expect = w.path("expect.img");
    std::fs::copy(&src, &expect).unwrap();
    apply_write(&expect, 2097152, &[0xa1; 65536]);
    apply_write(&expect, 41943140, &[0xb2; 100]);
    apply_write(&expect, 20971520, &[0xc3; 8192]);
    apply_write(&expect, 1052672, &[0; 4096]);

    w.background("resume");
    let s = w.wait_verified(Duration::from_secs(120));
    assert_eq!(s["present_bytes"], 64 * MIB);
    assert!(s["guest_written_chunks"].as_u64().unwrap() >= 3);

    // Verified complete: the source is let go, and reads after that come
    // from the local file alone.
    assert_eq!(s["source_state"], "released", "{s}");
    serve.kill9();
    w.qemu_io(&["read -P 0xc3 20971520 8192", "read -P 0xa1 2097152 65536"]);
    let st = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&expect)
        .arg(w.path("dst.img"))
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img compare: destination differs");
    assert_files_equal(&expect, &w.path("dst.img"));
    // The source was not modified.
    assert!(
        std::fs::read(&src).unwrap() == src_bytes,
        "the source changed"
    );
}

#[test]
fn sparse_gib_moves_little_more_than_its_data() {
    let w = World::new();
    let src = w.path("src.img");
    // 1 GiB, 64 MiB of data in four extents, the rest holes.
    let extents: Vec<(u64, u64)> = (0..4)
        .map(|i| (i * 256 * MIB + 3 * MIB, 16 * MIB))
        .collect();
    make_image(&src, 1024 * MIB, &extents, 2);
    let (_serve, port) = w.serve(&src, &[]);
    let _pull = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(180));
    let wire = s["wire_rx_bytes"].as_u64().unwrap();
    assert!(wire > 64 * MIB, "wire count is not counting: {wire}");
    assert!(
        wire <= 70 * MIB,
        "{wire} bytes crossed the wire for 64 MiB of data"
    );
    assert_eq!(s["source_data_bytes"], 64 * MIB);
    assert_eq!(s["skipped_zero_bytes"], 960 * MIB);
    assert_files_equal(&src, &w.path("dst.img"));
}

#[test]
fn kill_9_then_restart_resumes_without_refetching() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 256 * MIB, &[(0, 96 * MIB), (128 * MIB, 32 * MIB)], 3);
    let (_serve, port) = w.serve(&src, &[]);
    let data = 128 * MIB;
    let sync_bytes = 8 * MIB;
    let mut args = w.pull_args(port, "dst.img");
    // Slow the copy down so the kill lands in the middle.
    for a in [
        "--rate",
        "16777216",
        "--sync-bytes",
        "8388608",
        "--window",
        "4",
        "--batch-chunks",
        "16",
    ] {
        args.push(a.into());
    }
    let mut pull = w.pull(&args);
    let before = w.wait_status("40% of the data present", Duration::from_secs(120), |s| {
        s["fetched_background_bytes"].as_u64().unwrap() >= data * 2 / 5
    });
    pull.kill9();
    let present_before = before["fetched_background_bytes"].as_u64().unwrap()
        + before["fetched_on_demand_bytes"].as_u64().unwrap();
    assert!(present_before < data, "the copy finished before the kill");

    // Restart with the same disk and state; no rate limit now.
    let args2 = w.pull_args(port, "dst.img");
    let _pull2 = w.pull(&args2);
    let s = w.wait_verified(Duration::from_secs(120));
    let fetched_after = s["fetched_background_bytes"].as_u64().unwrap()
        + s["fetched_on_demand_bytes"].as_u64().unwrap();
    // One batch: the sync threshold plus the requests in flight.
    let batch = sync_bytes + 4 * 16 * 64 * 1024;
    let remaining = data - present_before;
    assert!(
        fetched_after <= remaining + batch,
        "after restart fetched {fetched_after} bytes; remaining was at most {remaining} (+ one batch {batch})"
    );
    assert!(s["present_at_start_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_files_equal(&src, &w.path("dst.img"));
}

#[test]
fn a_corrupted_chunk_is_rejected_and_fetched_again() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 4 * MIB)], 4);
    // Chunk 7 (64 KiB chunks) gets one byte flipped on its first trip.
    let (serve, port) = w.serve(&src, &["--inject-corrupt-chunk", "7"]);
    let _pull = w.pull(&w.pull_args(port, "dst.img"));
    let s = w.wait_verified(Duration::from_secs(60));
    assert_eq!(s["rejected_corrupt_bytes"], 65536, "{s}");
    assert!(
        serve.log_text().contains("corrupt"),
        "the fault was not injected"
    );
    assert_files_equal(&src, &w.path("dst.img"));
}

#[test]
fn the_source_going_away_makes_reads_wait_not_fail() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 32 * MIB, &[(0, 32 * MIB)], 5);
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    w.qemu_io(&["read 0 65536"]);
    serve.kill9();
    // Bring the source back on the same port after a while, from another
    // thread, while a guest read of absent data waits.
    let src2 = src.clone();
    let w_dir = w.dir.path().to_owned();
    let dst_fp = w.dst_fp.clone();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let bin = ferry_bin();
        std::process::Command::new(bin)
            .args(["serve", "--disk"])
            .arg(&src2)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--identity"])
            .arg(w_dir.join("src-id"))
            .args(["--trust-peer", &dst_fp])
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("restart serve")
    });
    let src_bytes = std::fs::read(&src).unwrap();
    let off = 20 * MIB;
    let out = w.qemu_io(&[&format!("read -v {off} 16")]);
    let hex: Vec<String> = src_bytes[off as usize..off as usize + 16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(out.contains(&hex.join(" ")), "{out}");
    let mut serve2 = Proc {
        child: restarter.join().unwrap(),
        log: w.path("serve2.log"),
    };
    let s = w.status();
    assert!(s["reconnects"].as_u64().unwrap() >= 1, "{s}");
    w.background("resume");
    w.wait_verified(Duration::from_secs(60));
    serve2.kill9();
    assert_files_equal(&src, &w.path("dst.img"));
}

#[test]
fn one_source_serves_two_destinations_at_once() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 48 * MIB, &[(0, 20 * MIB), (30 * MIB, 5 * MIB)], 6);
    let (_serve, port) = w.serve(&src, &[]);
    let _a = w.pull(&w.pull_args_tagged(port, "a.img", "a"));
    let _b = w.pull(&w.pull_args_tagged(port, "b.img", "b"));
    for ctl in ["ctla.sock", "ctlb.sock"] {
        let t0 = std::time::Instant::now();
        loop {
            let s = w.status_of(ctl);
            if s["phase"] == "complete" && s["verified"] == "ok" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{ctl}: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_files_equal(&src, &w.path("a.img"));
    assert_files_equal(&src, &w.path("b.img"));
}

#[test]
fn a_source_changed_after_switchover_stops_the_pull_and_keeps_guest_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 7);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    w.qemu_io(&["write -P 0x77 0 65536", "flush"]);
    // Someone writes to the source behind ferry's back (ferry itself never
    // does: it opens it read-only).
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 8);
    // A read of absent data now fails instead of returning other data...
    let (ok, text) = w.qemu_io_with(&[], &["read 8388608 4096"]);
    assert!(text.contains("Input/output error") || !ok, "{text}");
    // ...the pull says why...
    let s = w.wait_status("error phase", Duration::from_secs(30), |s| {
        s["phase"] == "error"
    });
    assert!(
        s["error"].as_str().unwrap().contains("source disk changed"),
        "{s}"
    );
    assert_eq!(s["rejected_corrupt_bytes"].as_u64().unwrap() % 65536, 0);
    // ...and the guest's flushed write is kept, and still readable.
    w.qemu_io(&["read -P 0x77 0 65536"]);
    let dst = std::fs::read(w.path("dst.img")).unwrap();
    assert!(dst[..65536].iter().all(|b| *b == 0x77));
}

#[test]
fn an_acknowledged_write_survives_a_pull_crash_before_any_flush() {
    // The guest's write is acknowledged, then `ferry pull` dies before any
    // FLUSH. The host's page cache still holds the write, and the guest
    // (e.g. over a ublk device that outlives its server, or an NBD client
    // that reconnects) will later FLUSH expecting it to be durable: the
    // restarted pull must not re-fetch the source's old data over it.
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 9);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    // A client that sends no FLUSH (qemu's clients flush when they close).
    let err = nbd_write_without_flush(&w.path("nbd.sock"), 1048576, &[0x42; 65536]);
    assert_eq!(err, 0, "the write was not acknowledged");
    pull.kill9();
    let _pull2 = w.pull(&w.pull_args(port, "dst.img"));
    w.qemu_io(&["flush", "read -P 0x42 1048576 65536"]);
    let s = w.wait_verified(Duration::from_secs(60));
    assert!(s["guest_written_chunks"].as_u64().unwrap() >= 1, "{s}");
    let dst = std::fs::read(w.path("dst.img")).unwrap();
    assert!(
        dst[1048576..1048576 + 65536].iter().all(|b| *b == 0x42),
        "the acknowledged write was overwritten by source data after the crash"
    );
}

#[test]
fn the_first_flush_waits_for_a_fresh_disks_files_to_be_durable() {
    // A fresh disk is served before its two new files are durable: their
    // fsyncs run beside serving, and the first sync round must wait for
    // them and fail with them (invariants 1 and 2: nothing is made
    // durable before the files that hold it). The hook fails those fsyncs
    // 3 s after they begin, so a FLUSH sent before then must wait and
    // fail; a sync round that did not wait would acknowledge it.
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 11);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend([
        "--hold-background".to_string(),
        "--inject-creation-sync-failure-ms".to_string(),
        "3000".to_string(),
    ]);
    let t0 = std::time::Instant::now();
    let _pull = w.pull(&args);
    // Write-back, so the write is acknowledged at once and the FLUSH is
    // the first sync round (qemu-io's default, write-through, makes the
    // write itself one, with FUA).
    let (ok, text) = w.qemu_io_with(&["-t", "writeback"], &["write -P 0x5a 0 64k", "flush"]);
    assert!(
        text.contains("wrote 65536"),
        "the write itself failed: {text}"
    );
    // qemu-io prints nothing for a failed flush; its exit status tells.
    assert!(
        !ok,
        "the flush was acknowledged before the new files were durable: {text}"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "the flush failed before the fsyncs did: {text}"
    );
    let s = w.status();
    assert_eq!(s["phase"], "error", "{s}");
    assert!(
        s.to_string()
            .contains("cannot make the new disk and state files durable"),
        "{s}"
    );
}
