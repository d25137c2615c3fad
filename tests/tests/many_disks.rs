//! Several disks of one VM in one pull (`ferry serve --disk NAME=PATH`
//! twice, `ferry pull --disk NAME=PATH` twice;
//! docs/decisions/many-disks-one-budget.md): both copied and verified
//! byte for byte, reads on each disk's export right during the copy, one
//! background rate limit for the two together (bytes over time), changed
//! while running, and one status with both disks and their totals.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

fn u(s: &serde_json::Value, field: &str) -> u64 {
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {s}"))
}

/// The disk named `name` in a status of several.
fn disk<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks in {s}"))
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {s}"))
}

/// Reads 4 KiB at `offset` of disk `name` through its export and checks
/// them against the source image.
fn check_read(w: &World, name: &str, src: &std::path::Path, offset: u64) {
    let mut want = vec![0u8; 4096];
    std::fs::File::open(src)
        .expect("open source")
        .read_exact_at(&mut want, offset)
        .expect("read source");
    let sock = w.path(&format!("nbd/{name}.sock"));
    let (ok, text) = qemu_io_nbd(&sock, name, 60, &[], &[&format!("read -v {offset} 4096")]);
    assert!(ok, "qemu-io on disk {name} failed: {text}");
    let hex = qemu_hex(&want[..16]);
    assert!(
        text.contains(&hex),
        "disk {name} at {offset}: expected {hex}…, got {text}"
    );
}

#[test]
fn two_disks_in_one_pull_share_one_budget() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    make_image(&src_a, 32 * MIB, &[(0, 24 * MIB)], 1);
    make_image(&src_b, 24 * MIB, &[(0, 20 * MIB)], 2);
    let (_serve, port) = w.serve_two(&src_a, &src_b);
    let rate: u64 = 4_000_000;
    let args = w.pull_two_args(Some(port), &["--rate", "4M", "--link-rtt-ms", "10"]);
    let _pull = w.pull(&args);

    // Reads of each disk right away, on demand (absent still).
    check_read(&w, "a", &src_a, 13 * MIB + 4096);
    check_read(&w, "b", &src_b, 17 * MIB + 8192);

    // The two background copies together at most at the rate: both under
    // way, then bytes over a few seconds.
    let s0 = w.wait_status("both disks copying", Duration::from_secs(60), |s| {
        s["disks"].as_array().is_some_and(|d| d.len() == 2)
            && u(disk(s, "a"), "fetched_background_bytes") > 0
            && u(disk(s, "b"), "fetched_background_bytes") > 0
    });
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let s1 = w.status();
    let dt = t0.elapsed().as_secs_f64();
    let got = u(&s1, "fetched_background_bytes") - u(&s0, "fetched_background_bytes");
    let a = u(disk(&s1, "a"), "fetched_background_bytes")
        - u(disk(&s0, "a"), "fetched_background_bytes");
    let b = u(disk(&s1, "b"), "fetched_background_bytes")
        - u(disk(&s0, "b"), "fetched_background_bytes");
    assert_eq!(got, a + b, "the totals are not the sum: {s1}");
    // Slack: the bytes in flight the limit allows (2 RTT + 0.1 s of the
    // rate) and two requests of 1 MiB.
    let allowed = rate as f64 * (dt + 0.12) + 2.0 * MIB as f64;
    assert!(
        (got as f64) <= allowed,
        "{got} bytes in {dt:.1} s by both disks together (a {a}, b {b}) against a limit of \
         {rate} B/s (at most {allowed:.0})"
    );
    assert!(
        got as f64 >= 0.5 * rate as f64 * dt,
        "{got} bytes in {dt:.1} s: the limit is not used"
    );
    assert!(a > 0 && b > 0, "one disk had all of it: a {a}, b {b}");
    assert_eq!(u(&s1, "rate_limit_bytes_per_sec"), rate, "{s1}");

    // Changed while running, for both; then everything is copied.
    w.background("rate=0");
    let s = w.status();
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 0, "{s}");
    assert_eq!(u(disk(&s, "b"), "rate_limit_bytes_per_sec"), 0, "{s}");
    let s = w.wait_verified(Duration::from_secs(300));
    for name in ["a", "b"] {
        let d = disk(&s, name);
        assert_eq!(d["phase"], "complete", "{s}");
        assert_eq!(d["verified"], "ok", "{s}");
    }
    assert_eq!(u(&s, "total_bytes"), 56 * MIB, "{s}");
    assert_eq!(u(&s, "present_bytes"), 56 * MIB, "{s}");
    check_read(&w, "a", &src_a, 3 * MIB);
    check_read(&w, "b", &src_b, 19 * MIB);
    assert_files_equal(&src_a, &w.path("dst-a.img"));
    assert_files_equal(&src_b, &w.path("dst-b.img"));
}

/// With `--exit-when-complete` a pull of several disks waits for every
/// disk to be verified and for the NBD client on one of them to leave,
/// then exits 0 by itself with both disks equal to their sources.
#[test]
fn a_pull_of_two_disks_exits_when_both_are_verified_and_left() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    make_image(&src_a, 8 * MIB, &[(0, 6 * MIB)], 4);
    make_image(&src_b, 4 * MIB, &[(MIB, 2 * MIB)], 5);
    let (_serve, port) = w.serve_two(&src_a, &src_b);
    let args = w.pull_two_args(Some(port), &["--hold-background", "--exit-when-complete"]);
    let mut pull = w.pull(&args);
    // A client on disk b, held open across the end of the copy (qemu-io
    // keeps the connection while it sleeps between its commands).
    let sock_b = w.path("nbd/b.sock");
    let sock_s = sock_b.display().to_string();
    let client = std::thread::spawn(move || {
        qemu_io_nbd(
            std::path::Path::new(&sock_s),
            "b",
            120,
            &[],
            &["read 1048576 4096", "sleep 20000", "read 0 4096"],
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    // Nothing copied yet (held): it must not have exited.
    assert_eq!(
        pull.wait_exit(Duration::from_millis(100)),
        None,
        "{}",
        pull.log_text()
    );
    w.background("resume");
    w.wait_verified(Duration::from_secs(120));
    // Verified, but the client on disk b is still connected.
    assert_eq!(
        pull.wait_exit(Duration::from_secs(1)),
        None,
        "exited with a client connected: {}",
        pull.log_text()
    );
    let (ok, text) = client.join().expect("client thread");
    assert!(ok, "qemu-io on disk b: {text}");
    let code = pull.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", pull.log_text());
    assert!(pull
        .log_text()
        .contains("every disk complete and verified: exiting"));
    assert_files_equal(&src_a, &w.path("dst-a.img"));
    assert_files_equal(&src_b, &w.path("dst-b.img"));
}

/// `--index` with several disks: each disk fills from the local copies
/// what matches it (disk a has a copy here, disk b none), and both end
/// equal to their sources.
#[test]
fn two_disks_fill_from_one_index() {
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    // Seeds 6 and 8 (make_image sets the low bit: 7 and 9), so no chunk
    // of b equals one of a.
    make_image(&src_a, 8 * MIB, &[(0, 6 * MIB)], 6);
    make_image(&src_b, 4 * MIB, &[(MIB, 2 * MIB)], 8);
    let copy = w.path("local-copy-of-a.img");
    std::fs::copy(&src_a, &copy).expect("copy");
    let idx = w.path("local.ferry-index");
    let out = w.ferry(&[
        "index",
        "build",
        "--out",
        idx.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let (_serve, port) = w.serve_two(&src_a, &src_b);
    let args = w.pull_two_args(
        Some(port),
        &["--index", &idx.display().to_string(), "--hold-background"],
    );
    let _pull = w.pull(&args);
    // The copier held: what disk a has is filled locally, all of it.
    let want = 6 * MIB;
    let s = w.wait_status("disk a filled locally", Duration::from_secs(120), |s| {
        s["disks"].as_array().is_some_and(|d| d.len() == 2)
            && u(disk(s, "a"), "filled_local_bytes") >= want
    });
    assert_eq!(u(disk(&s, "a"), "filled_local_bytes"), want, "{s}");
    assert_eq!(u(disk(&s, "b"), "filled_local_bytes"), 0, "{s}");
    assert_eq!(u(&s, "filled_local_bytes"), want, "{s}");
    assert_eq!(u(&s, "fetched_background_bytes"), 0, "{s}");
    w.background("resume");
    let s = w.wait_verified(Duration::from_secs(180));
    assert_eq!(u(disk(&s, "a"), "fetched_background_bytes"), 0, "{s}");
    assert!(u(disk(&s, "b"), "fetched_background_bytes") > 0, "{s}");
    assert_files_equal(&src_a, &w.path("dst-a.img"));
    assert_files_equal(&src_b, &w.path("dst-b.img"));
}

/// `ferry commit` of a pull of several disks: refused (and nothing
/// recorded) until every disk is verified, then recorded in each disk's
/// state file; restarted without its source, the pull serves both disks.
#[test]
fn two_disks_commit_together_and_restart_without_the_source() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    make_image(&src_a, 8 * MIB, &[(0, 3 * MIB)], 10);
    make_image(&src_b, 4 * MIB, &[(MIB, 2 * MIB)], 12);
    let (serve, port) = w.serve_two(&src_a, &src_b);
    let mut pull = w.pull(&w.pull_two_args(Some(port), &["--hold-background"]));
    let ctl = w.path("ctl.sock").display().to_string();
    let early = w.ferry(&["commit", "--control", &ctl]);
    let err = String::from_utf8_lossy(&early.stderr).to_string()
        + &String::from_utf8_lossy(&early.stdout);
    assert!(!early.status.success(), "committed before verified: {err}");
    assert!(err.contains("not verified yet"), "{err}");
    assert_eq!(w.status()["committed"], false);
    w.background("resume");
    w.wait_verified(Duration::from_secs(120));
    let out = w.ferry(&["commit", "--control", &ctl]);
    assert!(out.status.success(), "{out:?}");
    let s = w.status();
    assert_eq!(s["committed"], true, "{s}");
    for d in ["a", "b"] {
        assert_eq!(disk(&s, d)["committed"], true, "{s}");
    }
    pull.kill9();
    drop(serve);
    // The source is gone; the committed pull serves both disks without it.
    let _pull = w.pull(&w.pull_two_args(None, &[]));
    check_read(&w, "a", &src_a, 2 * MIB);
    check_read(&w, "b", &src_b, 2 * MIB + 4096);
    let s = w.status();
    assert_eq!(s["committed"], true, "{s}");
    assert_files_equal(&src_a, &w.path("dst-a.img"));
    assert_files_equal(&src_b, &w.path("dst-b.img"));
}

/// `ferry abort` of a pull of several disks: every disk's guest writes
/// kept beside its own state file (disk a was written, disk b not), the
/// pull exits with the aborted status, and a new pull of the two refuses
/// to resume them.
#[test]
fn two_disks_abort_together_keeping_each_disks_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    make_image(&src_a, 8 * MIB, &[(0, 3 * MIB)], 14);
    make_image(&src_b, 4 * MIB, &[(MIB, 2 * MIB)], 16);
    let (_serve, port) = w.serve_two(&src_a, &src_b);
    let args = w.pull_two_args(Some(port), &["--hold-background"]);
    let mut pull = w.pull(&args);
    let (ok, text) = qemu_io_nbd(
        &w.path("nbd/a.sock"),
        "a",
        60,
        &[],
        &["write -P 0x5a 1048576 65536"],
    );
    assert!(ok, "{text}");
    let ctl = w.path("ctl.sock").display().to_string();
    let out = w.ferry(&["abort", "--control", &ctl, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let kept: serde_json::Value = serde_json::from_slice(&out.stdout).expect("abort JSON");
    let by_name = |n: &str| {
        kept.as_array()
            .expect("a list")
            .iter()
            .find(|d| d["name"] == n)
            .unwrap_or_else(|| panic!("no disk {n} in {kept}"))
            .clone()
    };
    let (a, b) = (by_name("a"), by_name("b"));
    assert_eq!(
        a["writes_dir"],
        w.path("dst-a.img.ferry-writes").display().to_string(),
        "{kept}"
    );
    assert!(a["bytes"].as_u64().unwrap() >= 65536, "{kept}");
    assert_eq!(b["bytes"], 0, "{kept}");
    assert!(w.path("dst-a.img.ferry-writes").is_dir());
    let code = pull.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(4), "pull after abort: {}", pull.log_text());
    // Not resumed: the two disks were aborted.
    let a2: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut again = w.spawn("pull", &a2);
    let code = again.wait_exit(Duration::from_secs(60));
    assert!(code.is_some_and(|c| c != 0), "{}", again.log_text());
    assert!(
        again.log_text().contains("--start-over"),
        "{}",
        again.log_text()
    );
    // Told to start over: both pulled afresh, the kept writes left alone,
    // disk a reads as its source again where the guest had written.
    let mut over = args.clone();
    over.push("--start-over".into());
    let _pull = w.pull(&over);
    let s = w.status();
    assert_eq!(u(&s, "present_at_start_bytes"), 0, "{s}");
    assert!(w.path("dst-a.img.ferry-writes").is_dir());
    check_read(&w, "a", &src_a, MIB);
}

/// A destination that names no disk, or one the source does not serve,
/// is refused with the reason; a pull of several disks refuses options
/// it does not take.
#[test]
fn a_disk_must_be_named_and_served() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 3);
    let a_arg = format!("a={}", src.display());
    let b_arg = format!("b={}", src.display());
    let (_serve, port) = w.serve_from(&["--disk", &a_arg, "--disk", &b_arg], &[]);
    let args = w.pull_args(port, "dst.img");
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = w.spawn("pull", &a);
    let code = p.wait_exit(Duration::from_secs(60));
    assert!(
        code.is_some_and(|c| c != 0),
        "a pull naming no disk was not refused ({code:?}): {}",
        p.log_text()
    );
    assert!(
        p.log_text().contains("name one"),
        "the refusal does not say why: {}",
        p.log_text()
    );

    std::fs::create_dir(w.path("nbd")).expect("mkdir nbd");
    let pull = |disks: [&str; 2], extra: &[&str]| {
        let mut v: Vec<String> = vec!["pull".into(), "--source".into()];
        v.push(format!("127.0.0.1:{port}"));
        for d in disks {
            v.push("--disk".into());
            v.push(d.to_string());
        }
        for s in [
            "--nbd",
            &format!("unix:{}", w.path("nbd").display()),
            "--control",
            w.path("ctl.sock").to_str().unwrap(),
            "--identity",
            w.path("dst-id").to_str().unwrap(),
            "--trust-peer",
            &w.src_fp,
        ] {
            v.push(s.to_string());
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        w.ferry(&a)
    };
    let x = format!("x={}", w.path("x.img").display());
    let y = format!("y={}", w.path("y.img").display());
    let out = pull([&x, &y], &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "unknown disks accepted: {err}");
    assert!(err.contains("no disk named"), "{err}");
    let out = pull([&x, &y], &["--ublk"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("--ublk"),
        "--ublk with several disks: {err}"
    );
    let out = pull([&x, &w.path("z.img").display().to_string()], &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("NAME=PATH"),
        "an unnamed disk among several: {err}"
    );
    assert!(!w.path("x.img").exists(), "a refused pull made a disk");
}
