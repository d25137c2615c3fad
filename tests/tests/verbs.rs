//! The migration's verbs end to end: `ferry abort` of a half-done pull
//! keeps every guest write aside (applied with `ferry apply-writes` to a
//! copy of the source, it gives what the guest wrote) and a later pull is
//! refused unless told to start over; `ferry commit` is refused before the
//! verification and, after it, a restart serves the disk with the source
//! gone; `ferry list` shows running pulls and their phases, and stale
//! sockets; bad input gives clear errors.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// Reads the whole NBD export of the pull at `sock` into `out`.
fn read_export(sock: &Path, out: &Path) {
    let st = Command::new("timeout")
        .args(["120", "qemu-img", "convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///ferry?socket={}", sock.display()))
        .arg(out)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img convert of the export failed");
}

#[test]
fn abort_of_a_half_done_pull_keeps_every_guest_write() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(
        &src,
        64 * MIB,
        &[(MIB, 8 * MIB), (40 * MIB, 3 * MIB + 12345)],
        7,
    );
    let src_bytes = std::fs::read(&src).unwrap();
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    // Half done: a read fetched on demand, the rest absent.
    w.qemu_io(&["read 5242880 4096"]);
    // Guest writes: whole blocks over data, sub-block (read-modify-write
    // of an absent block), into a zero region, zeroes, a discard.
    w.qemu_io(&[
        "write -P 0xa1 2097152 65536",
        "write -P 0xb2 41943140 100",
        "write -P 0xc3 20971520 8192",
        "write -z 1052672 4096",
        "discard 3145728 65536",
        "flush",
    ]);
    // And one acknowledged but never flushed.
    assert_eq!(
        nbd_write_without_flush(&w.path("nbd.sock"), 50 * MIB + 8192, &[0xd4; 4096]),
        0
    );
    let expect = w.path("expect.img");
    std::fs::copy(&src, &expect).unwrap();
    apply_write(&expect, 2097152, &[0xa1; 65536]);
    apply_write(&expect, 41943140, &[0xb2; 100]);
    apply_write(&expect, 20971520, &[0xc3; 8192]);
    apply_write(&expect, 1052672, &[0; 4096]);
    apply_write(&expect, 3145728, &[0; 65536]);
    apply_write(&expect, 50 * MIB + 8192, &[0xd4; 4096]);
    let s0 = w.status();
    assert_eq!(s0["phase"], "copying", "{s0}");

    let ctl = w.path("ctl.sock");
    let out = w.ferry(&["abort", "--control", s(&ctl), "--json"]);
    assert!(out.status.success(), "abort failed: {}", text(&out));
    let kept: serde_json::Value = serde_json::from_slice(&out.stdout).expect("abort JSON");
    let dir = kept["writes_dir"].as_str().expect("writes_dir").to_string();
    assert_eq!(dir, w.path("dst.img.ferry-writes").display().to_string());
    assert!(kept["extents"].as_u64().unwrap() >= 5, "{kept}");
    assert!(
        kept["bytes"].as_u64().unwrap() >= 65536 + 8192 + 4096,
        "{kept}"
    );
    // The daemon stops serving and exits with the aborted status.
    let code = pull.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(4), "pull after abort: {}", pull.log_text());
    assert!(
        pull.log_text().contains("migration aborted"),
        "{}",
        pull.log_text()
    );
    assert!(!ctl.exists() && !w.path("nbd.sock").exists());
    // The source was not written by ferry.
    assert!(
        std::fs::read(&src).unwrap() == src_bytes,
        "the source changed"
    );

    // Applied to a copy of the source: exactly what the guest wrote.
    let applied = w.path("applied.img");
    std::fs::copy(&src, &applied).unwrap();
    let out = w.ferry(&["apply-writes", &dir, "--to", s(&applied)]);
    assert!(out.status.success(), "apply-writes: {}", text(&out));
    assert!(text(&out).contains("applied"), "{}", text(&out));
    assert_files_equal(&expect, &applied);

    // A later pull on the aborted disk is refused, saying what to do.
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.ferry(&a);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("aborted") && t.contains("--start-over") && t.contains("apply-writes"),
        "{t}"
    );
    // Aborting again: clear errors, by socket and by disk.
    let out = w.ferry(&["abort", "--control", s(&ctl)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no `ferry pull` answers at control socket"),
        "{}",
        text(&out)
    );
    let out = w.ferry(&["abort", "--disk", s(&w.path("dst.img"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("was aborted"), "{}", text(&out));
    assert!(text(&out).contains(&dir), "{}", text(&out));

    // Told to start over: a fresh pull, the kept writes left alone.
    let mut over = args.clone();
    over.push("--start-over".into());
    let _pull = w.pull(&over);
    let st = w.status();
    assert_eq!(st["present_at_start_bytes"], 0, "{st}");
    let out = w.qemu_io(&["read -v 2097152 16"]);
    assert!(
        out.contains(&qemu_hex(&src_bytes[2097152..2097168])),
        "a fresh pull reads the source: {out}"
    );
    assert!(Path::new(&dir).join("extents.json").exists());
}

#[test]
fn offline_abort_keeps_the_writes_of_a_stopped_pull() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 3);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    w.qemu_io(&["write -P 0x5e 1048576 8192", "flush"]);
    // Refused while the pull runs (it holds the files).
    let out = w.ferry(&["abort", "--disk", s(&w.path("dst.img"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("in use by"), "{}", text(&out));
    pull.kill9();
    let out = w.ferry(&["abort", "--disk", s(&w.path("dst.img"))]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("migration aborted") && t.contains("ferry apply-writes"),
        "{t}"
    );
    let expect = w.path("expect.img");
    std::fs::copy(&src, &expect).unwrap();
    apply_write(&expect, 1048576, &[0x5e; 8192]);
    let applied = w.path("applied.img");
    std::fs::copy(&src, &applied).unwrap();
    let dir = w.path("dst.img.ferry-writes");
    let out = w.ferry(&["apply-writes", s(&dir), "--to", s(&applied)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_files_equal(&expect, &applied);
}

#[test]
fn commit_is_refused_before_verification_and_then_a_restart_needs_no_source() {
    if !require_tool("qemu-io") || !require_tool("qemu-img") {
        return;
    }
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 32 * MIB, &[(MIB, 6 * MIB), (20 * MIB, 5 * MIB)], 11);
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    let ctl = w.path("ctl.sock");
    w.qemu_io(&["write -P 0x77 8388608 65536", "flush"]);
    let expect = w.path("expect.img");
    std::fs::copy(&src, &expect).unwrap();
    apply_write(&expect, 8388608, &[0x77; 65536]);

    // Before verification: refused, saying why.
    let out = w.ferry(&["commit", "--control", s(&ctl)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not verified yet"), "{}", text(&out));
    assert_eq!(w.status()["committed"], false);

    w.background("resume");
    w.wait_verified(Duration::from_secs(120));
    let out = w.ferry(&["release", "--control", s(&ctl)]);
    assert!(out.status.success(), "commit: {}", text(&out));
    assert!(text(&out).contains("committed"), "{}", text(&out));
    assert_eq!(w.status()["committed"], true);
    // Committed: nothing to abort to.
    let out = w.ferry(&["abort", "--control", s(&ctl)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("committed"), "{}", text(&out));
    // Committing again is no error.
    let out = w.ferry(&["commit", "--control", s(&ctl)]);
    assert!(text(&out).contains("already committed"), "{}", text(&out));

    // The source gone for good, the pull restarted with the same
    // arguments (its --source now an address nobody answers at).
    serve.kill9();
    pull.kill9();
    let mut again = args.clone();
    again.extend(["--connect-timeout".into(), "1".into()]);
    let pull = w.pull(&again);
    let st = w.status();
    assert_eq!(st["phase"], "complete", "{st}");
    assert_eq!(st["verified"], "ok", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    let out = w.path("out.img");
    read_export(&w.path("nbd.sock"), &out);
    assert_files_equal(&expect, &out);
    assert_files_equal(&expect, &w.path("dst.img"));
    // A committed migration does not try its source at all (an uncommitted
    // verified one keeps trying it in the background).
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !pull.log_text().contains("cannot reach the source"),
        "{}",
        pull.log_text()
    );
    assert!(
        pull.log_text().contains("the source is not contacted"),
        "{}",
        pull.log_text()
    );
}

#[test]
fn exit_when_complete_exits_0_once_verified() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 4 * MIB)], 5);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--exit-when-complete".into());
    let mut pull = w.pull(&args);
    assert_eq!(
        pull.wait_exit(Duration::from_secs(120)),
        Some(0),
        "{}",
        pull.log_text()
    );
    assert_files_equal(&src, &w.path("dst.img"));
    // Committed afterwards, offline; then a commit by socket finds none.
    let out = w.ferry(&["commit", "--disk", s(&w.path("dst.img"))]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("committed"), "{}", text(&out));
}

/// Defect: `--exit-when-complete` exited once verified whoever was
/// connected, cutting off a hypervisor still on the export. Now it waits
/// for the NBD clients to leave; with `--ublk` it is refused.
#[test]
fn exit_when_complete_waits_for_the_nbd_clients_to_leave() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 4 * MIB)], 6);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--exit-when-complete".into(), "--hold-background".into()]);
    let mut pull = w.pull(&args);
    // A client that stays connected (a hypervisor), then the copy runs.
    let mut guest = ferry_tests::qmp::NbdWriter::connect(&w.path("nbd.sock"), "ferry");
    w.background("resume");
    w.wait_verified(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pull.wait_exit(Duration::from_millis(100)),
        None,
        "the pull exited with a client connected: {}",
        pull.log_text()
    );
    guest.write(8 * MIB, &[0x42; 4096]);
    assert!(
        pull.log_text()
            .contains("waits for the NBD clients to disconnect"),
        "{}",
        pull.log_text()
    );
    drop(guest);
    assert_eq!(
        pull.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        pull.log_text()
    );
    let mut ublk = w.pull_args(port, "other.img");
    ublk.extend(["--ublk".into(), "--exit-when-complete".into()]);
    let ublk: Vec<&str> = ublk.iter().map(String::as_str).collect();
    let out = w.ferry(&ublk);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--exit-when-complete with --ublk"),
        "{}",
        text(&out)
    );
}

#[test]
fn list_shows_running_pulls_their_phases_and_stale_sockets() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 4 * MIB)], 9);
    let (_serve, port) = w.serve(&src, &[]);
    let run = w.path("run");
    std::fs::create_dir(&run).unwrap();
    let with_control = |disk: &str, name: &str, extra: &[&str]| {
        let mut a = w.pull_args_tagged(port, disk, name);
        let i = a.iter().position(|x| x == "--control").unwrap();
        a[i + 1] = run.join(format!("{name}.ctl")).display().to_string();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let _a = w.pull(&with_control("a.img", "a", &["--hold-background"]));
    let _b = w.pull(&with_control("b.img", "b", &[]));
    let t0 = std::time::Instant::now();
    while w.status_of("run/b.ctl")["verified"] != "ok" {
        assert!(t0.elapsed() < Duration::from_secs(120), "b not verified");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A socket left behind by a pull that is gone, and a file that is no
    // control socket.
    drop(std::os::unix::net::UnixListener::bind(run.join("gone.ctl")).unwrap());
    std::fs::write(run.join("notes.txt"), "x").unwrap();

    let out = w.ferry(&["list", "--run-dir", s(&run), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    let rows = v.as_array().expect("an array");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "gone"], "{v}");
    assert_eq!(rows[0]["phase"], "copying", "{v}");
    assert_eq!(
        rows[0]["status"]["disk"],
        w.path("a.img").display().to_string()
    );
    assert_eq!(rows[1]["phase"], "verified", "{v}");
    assert_eq!(rows[2]["phase"], "stale", "{v}");
    assert!(rows[2]["problem"].as_str().unwrap().contains("no process"));

    let out = w.ferry(&["commit", "--control", s(&run.join("b.ctl"))]);
    assert!(out.status.success(), "{}", text(&out));
    let out = w.ferry(&["list", "--run-dir", s(&run)]);
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    let line = |name: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {t}"))
            .to_string()
    };
    assert!(t.starts_with("NAME"), "{t}");
    assert!(line("a").contains("copying"), "{t}");
    assert!(
        line("b").contains("committed") && line("b").contains("100.0%"),
        "{t}"
    );
    assert!(line("gone").contains("stale"), "{t}");
    // An empty directory: said so.
    let empty = w.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = w.ferry(&["list", "--run-dir", s(&empty)]);
    assert!(text(&out).contains("no migrations"), "{}", text(&out));
}

#[test]
fn bad_input_gives_clear_errors() {
    let w = World::new();
    let nowhere = w.path("nowhere.ctl");
    for verb in ["abort", "commit"] {
        let out = w.ferry(&[verb, "--control", s(&nowhere)]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        let t = text(&out);
        assert!(
            t.contains("no `ferry pull` answers at control socket")
                && t.contains(&format!("ferry {verb} --disk")),
            "{verb}: {t}"
        );
        let out = w.ferry(&[verb, "--disk", s(&w.path("none.img"))]);
        assert_eq!(out.status.code(), Some(1), "{verb}");
        assert!(
            text(&out).contains("no state file"),
            "{verb}: {}",
            text(&out)
        );
        // Neither or both of --control and --disk: usage errors.
        let out = w.ferry(&[verb]);
        assert_eq!(out.status.code(), Some(2), "{verb}");
    }
    let img = w.path("img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let out = w.ferry(&["apply-writes", s(w.dir.path()), "--to", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("not a complete ferry writes directory"),
        "{}",
        text(&out)
    );
}
