//! `ferry pull --metrics ADDR:PORT` as Prometheus scrapes it: the text
//! passes `promtool check metrics`, and its figures move the right way
//! during and after a pull (bytes grow, the phase turns complete and the
//! verification ok). And the systemd `STATUS=` line, in human units.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// promtool: `$FERRY_PROMTOOL` (set by `cargo xtask ci`, which extracts it
/// from Debian's `prometheus` package to `target/tools/promtool`
/// without installing it), else that extracted one, else on PATH.
/// Missing, the test fails: it is never skipped.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_PROMTOOL") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "FERRY_PROMTOOL={} does not exist; `cargo xtask ci` extracts promtool there",
            p.display()
        );
        return p;
    }
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| ws.join("target"), PathBuf::from);
    let extracted = target.join("tools/promtool");
    if extracted.exists() {
        return extracted;
    }
    qmp::need_tool(
        "promtool",
        "prometheus (cargo xtask ci extracts promtool from it and sets FERRY_PROMTOOL)",
    );
    PathBuf::from("promtool")
}

/// `promtool check metrics` on `text`: must pass without a complaint.
fn promtool_check(text: &str) {
    let out = promtool_run(text);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {out:?}\non:\n{text}"
    );
}

/// `promtool check metrics` on `text`.
fn promtool_run(text: &str) -> std::process::Output {
    let mut c = Command::new("timeout")
        .arg("60")
        .arg(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    c.wait_with_output().expect("promtool output")
}

/// `GET /metrics` at `addr`: the body of a 200 reply.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to --metrics");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\nAccept: text/plain\r\n\r\n")
        .expect("send the request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// The value of `series` (name and labels as printed) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("a number")
}

/// Starts `ferry pull ARGS` with `$NOTIFY_SOCKET` set to `notify`, and
/// waits until it serves.
fn pull_notifying(w: &World, args: &[String], notify: &std::path::Path) -> Proc {
    let log = w.path("pull-notify.log");
    let f = std::fs::File::create(&log).expect("log file");
    let child = Command::new(ferry_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", notify)
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .expect("spawn ferry pull");
    let mut p = Proc { child, log };
    let t0 = Instant::now();
    while !p.log_text().contains("ferry pull: serving") {
        if let Some(code) = p.wait_exit(Duration::from_millis(50)) {
            panic!("ferry pull exited ({code}): {}", p.log_text());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "ferry pull did not start: {}",
            p.log_text()
        );
    }
    p
}

/// The address the pull printed for `--metrics`.
fn metrics_addr(p: &Proc) -> String {
    let log = p.log_text();
    log.lines()
        .find_map(|l| l.strip_prefix("ferry pull: metrics on http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in the log: {log}"))
        .to_string()
}

/// The `STATUS=` lines received on `rx` so far.
fn status_lines(rx: &UnixDatagram, seen: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = rx.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("STATUS="))
                .map(str::to_string),
        );
    }
}

#[test]
fn metrics_pass_promtool_and_move_with_the_pull() {
    // Fails at once, before the pull, if promtool is missing; and the
    // check is a real one: an OpenMetrics counter (family `x`, sample
    // `x_total`) is not text format 0.0.4.
    let refused = promtool_run("# HELP x X.\n# TYPE x counter\nx_total 1\n");
    assert!(
        !refused.status.success(),
        "promtool passed junk: {refused:?}"
    );
    let w = World::new();
    let src = w.path("src.img");
    // 8 MiB: 2 MiB of data at 0, 1 MiB at 5 MiB, the rest zero.
    make_image(&src, 8 * MIB, &[(0, 2 * MIB), (5 * MIB, MIB)], 7);
    let (_serve, port) = w.serve(&src, &[]);
    let notify = w.path("notify.sock");
    let rx = UnixDatagram::bind(&notify).expect("bind the notify socket");
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut args = w.pull_args(port, "dst.img");
    // Loopback only, a port the kernel picks; the background copy held so
    // the first scrapes see a pull in progress.
    args.extend(["--metrics", "127.0.0.1:0", "--hold-background"].map(String::from));
    let pull = pull_notifying(&w, &args, &notify);
    let addr = metrics_addr(&pull);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // Serving, nothing asked for yet.
    let first = scrape(&addr);
    promtool_check(&first);
    assert_eq!(value(&first, r#"ferry_pull_phase{phase="copying"}"#), 1.0);
    assert_eq!(value(&first, r#"ferry_pull_phase{phase="complete"}"#), 0.0);
    assert_eq!(
        value(&first, r#"ferry_pull_verification{result="pending"}"#),
        1.0
    );
    assert_eq!(value(&first, "ferry_pull_disk_bytes"), (8 * MIB) as f64);
    assert_eq!(value(&first, "ferry_pull_disk_chunks"), 128.0);

    // A guest read of absent data: fetched on demand, the guest waited.
    w.qemu_io(&["read 0 256k"]);
    let during = scrape(&addr);
    promtool_check(&during);
    let on_demand = r#"ferry_pull_fetched_bytes_total{kind="on_demand"}"#;
    let background = r#"ferry_pull_fetched_bytes_total{kind="background"}"#;
    assert!(value(&during, on_demand) >= (256 * 1024) as f64, "{during}");
    assert_eq!(value(&during, background), 0.0, "{during}");
    assert!(value(&during, "ferry_pull_on_demand_fetch_seconds_count") >= 1.0);
    assert!(value(&during, "ferry_pull_guest_stalled_requests_total") >= 1.0);
    assert!(value(&during, "ferry_pull_guest_stall_seconds_total") > 0.0);
    assert!(value(&during, "ferry_pull_present_bytes") > value(&first, "ferry_pull_present_bytes"));
    assert!(value(&during, "ferry_pull_wire_received_bytes_total") > 256.0 * 1024.0);
    assert_eq!(
        value(&during, r#"ferry_pull_source_state{state="connected"}"#),
        1.0
    );
    assert_eq!(value(&during, r#"ferry_pull_phase{phase="copying"}"#), 1.0);
    // A guest write.
    w.qemu_io(&["write -P 0x5a 7m 64k"]);
    let written = scrape(&addr);
    assert_eq!(
        value(&written, "ferry_pull_guest_written_bytes_total"),
        (64 * 1024) as f64
    );
    assert_eq!(value(&written, "ferry_pull_guest_written_chunks"), 1.0);

    // The rest in the background, then verification.
    w.background("resume");
    w.wait_verified(Duration::from_secs(240));
    let after = scrape(&addr);
    promtool_check(&after);
    assert_eq!(value(&after, r#"ferry_pull_phase{phase="complete"}"#), 1.0);
    assert_eq!(value(&after, r#"ferry_pull_phase{phase="copying"}"#), 0.0);
    assert_eq!(
        value(&after, r#"ferry_pull_verification{result="ok"}"#),
        1.0
    );
    assert_eq!(
        value(&after, r#"ferry_pull_verification{result="pending"}"#),
        0.0
    );
    assert_eq!(value(&after, "ferry_pull_present_bytes"), (8 * MIB) as f64);
    assert!(value(&after, background) > 0.0, "{after}");
    assert!(value(&after, on_demand) >= value(&during, on_demand));
    // 3 MiB of data; the 5 MiB of zero chunks are never fetched.
    assert_eq!(
        value(&after, "ferry_pull_zero_skipped_bytes"),
        (5 * MIB) as f64
    );
    assert!(
        value(&after, on_demand) + value(&after, background) >= (3 * MIB - 64 * 1024) as f64,
        "{after}"
    );
    assert!(value(&after, "ferry_pull_verified_chunks") > 0.0);
    // A finished copy has no rate and no ETA.
    assert_eq!(
        value(&after, "ferry_pull_progress_rate_bytes_per_second"),
        0.0
    );
    assert!(!after.contains("ferry_pull_eta_seconds"), "{after}");

    // systemd's STATUS= (every 5 s): the progress in human units, the
    // line `ferry status --watch` prints, ending complete.
    let mut seen: Vec<String> = Vec::new();
    let t0 = Instant::now();
    while !seen.iter().any(|l| l.starts_with("complete ")) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no STATUS= line of a complete pull; seen {seen:?}"
        );
        status_lines(&rx, &mut seen);
    }
    let done = seen
        .iter()
        .rev()
        .find(|l| l.starts_with("complete "))
        .expect("a complete line");
    assert!(
        done.starts_with("complete 100.0%: 8.0 MiB of 8.0 MiB; source released"),
        "{done:?}"
    );
}

#[test]
fn no_metrics_listener_unless_asked() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 3);
    let (_serve, port) = w.serve(&src, &[]);
    let pull = w.pull(&w.pull_args(port, "dst.img"));
    assert!(
        !pull.log_text().contains("metrics on"),
        "{}",
        pull.log_text()
    );
    // No TCP socket of the pull listens (its NBD export is a unix socket).
    let pid = pull.child.id();
    let ss = Command::new("ss")
        .args(["-Htlnp"])
        .output()
        .expect("run ss");
    let listening = String::from_utf8_lossy(&ss.stdout);
    assert!(
        !listening.contains(&format!("pid={pid},")),
        "ferry pull listens on TCP without --metrics:\n{listening}"
    );
}

/// A pull of several disks serves every disk's series, labelled
/// `disk="NAME"`, as one valid exposition; each disk's figures move on
/// their own.
#[test]
fn metrics_of_two_disks_are_labelled_by_disk() {
    let w = World::new();
    let (src_a, src_b) = (w.path("src-a.img"), w.path("src-b.img"));
    make_image(&src_a, 8 * MIB, &[(0, 2 * MIB)], 6);
    make_image(&src_b, 4 * MIB, &[(MIB, MIB)], 8);
    let (_serve, port) = w.serve_two(&src_a, &src_b);
    let args = w.pull_two_args(
        Some(port),
        &["--metrics", "127.0.0.1:0", "--hold-background"],
    );
    let pull = w.pull(&args);
    let addr = metrics_addr(&pull);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let first = scrape(&addr);
    promtool_check(&first);
    assert_eq!(
        value(&first, r#"ferry_pull_disk_bytes{disk="a"}"#),
        (8 * MIB) as f64
    );
    assert_eq!(
        value(&first, r#"ferry_pull_disk_bytes{disk="b"}"#),
        (4 * MIB) as f64
    );
    for d in ["a", "b"] {
        let copying = format!(r#"ferry_pull_phase{{disk="{d}",phase="copying"}}"#);
        assert_eq!(value(&first, &copying), 1.0, "{first}");
    }
    // A read of disk a's absent data: only disk a fetched on demand.
    let (ok, text) = qemu_io_nbd(&w.path("nbd/a.sock"), "a", 60, &[], &["read 0 256k"]);
    assert!(ok, "{text}");
    let during = scrape(&addr);
    promtool_check(&during);
    let on_demand =
        |d: &str| format!(r#"ferry_pull_fetched_bytes_total{{disk="{d}",kind="on_demand"}}"#);
    assert!(
        value(&during, &on_demand("a")) >= (256 * 1024) as f64,
        "{during}"
    );
    assert_eq!(value(&during, &on_demand("b")), 0.0, "{during}");
    w.background("resume");
    w.wait_verified(Duration::from_secs(120));
    let done = scrape(&addr);
    promtool_check(&done);
    for d in ["a", "b"] {
        let ok = format!(r#"ferry_pull_verification{{disk="{d}",result="ok"}}"#);
        assert_eq!(value(&done, &ok), 1.0, "{done}");
    }
    assert_eq!(
        value(&done, r#"ferry_pull_present_bytes{disk="a"}"#),
        (8 * MIB) as f64
    );
}
