//! Log lines as journald and log pipelines take them: no colour codes when
//! stderr is not a terminal, one JSON object per line with
//! `--log-format json`, a span naming the disk of each pull, and an
//! error's causes printed once each.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// `ferry ARGS` with stderr a pipe, killed after 120 s.
fn ferry_piped(args: &[String]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(ferry_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry")
}

/// A pull whose source is not there: it logs, then fails.
fn failing_pull(w: &World, global: &[&str]) -> String {
    let mut args: Vec<String> = global.iter().map(|s| s.to_string()).collect();
    args.extend(w.pull_args(free_udp_port(), "dst.img"));
    args.extend(["--connect-timeout-secs".to_string(), "1".to_string()]);
    let out = ferry_piped(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr).expect("UTF-8 stderr")
}

#[test]
fn text_logs_into_a_pipe_have_no_colour_and_name_the_disk() {
    let w = World::new();
    let log = failing_pull(&w, &[]);
    assert!(!log.contains('\x1b'), "escape codes in a pipe: {log:?}");
    let disk = w.path("dst.img");
    assert!(
        log.contains(&format!("pull{{disk={}}}", disk.display())),
        "no span naming the disk: {log}"
    );
    assert!(log.contains("connecting to the source"), "{log}");
    assert!(
        log.contains("ferry: error: cannot connect to the source"),
        "{log}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_level_and_message() {
    let w = World::new();
    let log = failing_pull(&w, &["--log-format", "json"]);
    let disk = w.path("dst.img").display().to_string();
    let mut lines = 0;
    let mut spans = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        if v["span"]["name"] == "pull" {
            assert_eq!(v["span"]["disk"], disk.as_str(), "{line}");
            spans += 1;
        }
        lines += 1;
    }
    assert!(spans >= 1, "no line in the pull's span: {log}");
    // The error that ended it reads as text too (no `after 1s`).
    assert_no_debug_dumps(&ferry_lines(&log));
    // The last line is the error that ended the command.
    let last: serde_json::Value =
        serde_json::from_str(log.lines().last().expect("a line")).expect("JSON");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot connect to the source")),
        "{last}"
    );
    assert!(lines >= 2, "{log}");
}

#[test]
fn an_error_chain_names_each_cause_once() {
    let w = World::new();
    let disk = w.path("src.img");
    make_image(&disk, 1 << 20, &[], 1);
    // The port is taken.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("address").to_string();
    let args: Vec<String> = [
        "serve",
        "--disk",
        disk.to_str().expect("utf8"),
        "--listen",
        &listen,
        "--identity",
        w.path("src-id").to_str().expect("utf8"),
        "--trust-peer",
        &w.dst_fp,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = ferry_piped(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    let line = e
        .lines()
        .find(|l| l.starts_with("ferry: error:"))
        .unwrap_or_else(|| panic!("no error line: {e}"));
    assert!(line.contains(&listen), "{line}");
    assert_eq!(line.matches("(os error").count(), 1, "{line}");
}

#[test]
fn lines_of_the_copier_and_verification_carry_the_disks_span_too() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 3);
    let (_serve, port) = w.serve(&src, &[]);
    let pull = w.pull(&w.pull_args(port, "dst.img"));
    let disk = w.path("dst.img");
    let span = format!("pull{{disk={}}}", disk.display());
    let st = w.wait_verified(std::time::Duration::from_secs(120));
    assert_eq!(st["verified"], "ok", "{st}");
    let log = pull.log_text();
    // The verification runs in a task the copier spawned: its line must
    // still name the disk.
    let verifying = log
        .lines()
        .find(|l| l.contains("verifying the whole disk"))
        .unwrap_or_else(|| panic!("no verification line: {log}"));
    assert!(verifying.contains(&span), "{verifying:?} lacks {span}");
    let verified = log
        .lines()
        .find(|l| l.contains("copy complete and verified"))
        .unwrap_or_else(|| panic!("no verified line: {log}"));
    assert!(verified.contains(&span), "{verified:?} lacks {span}");
}

/// Reads `len` bytes at `offset` through the NBD export at unix socket
/// `sock` with a minimal client; returns the server's error code and the
/// data.
fn nbd_read(sock: &std::path::Path, offset: u64, len: u32) -> (u32, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the NBD socket");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("server greeting");
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    // Fixed newstyle, no zeroes; NBD_OPT_EXPORT_NAME "ferry".
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&5u32.to_be_bytes());
    opt.extend_from_slice(b"ferry");
    s.write_all(&opt).expect("export name");
    let mut export = [0u8; 10];
    s.read_exact(&mut export).expect("export info");
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    req.extend_from_slice(&9u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).expect("read request");
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("read reply");
    let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
    let mut data = vec![0u8; if error == 0 { len as usize } else { 0 }];
    s.read_exact(&mut data).expect("read data");
    (error, data)
}

/// `ferry ARGS` in the background, stderr (the log) and stdout to files of
/// their own, at log level `rust_log`.
fn spawn_logged(w: &World, name: &str, args: &[String], rust_log: &str) -> (Proc, PathBuf) {
    let log = w.path(&format!("{name}.log"));
    let out = w.path(&format!("{name}.out"));
    let child = Command::new(ferry_bin())
        .args(args)
        .env("RUST_LOG", rust_log)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn ferry");
    (Proc { child, log }, out)
}

/// Waits until `out` (a process's stdout) contains `what`.
fn wait_printed(p: &mut Proc, out: &std::path::Path, what: &str) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(60) {
        if std::fs::read_to_string(out)
            .unwrap_or_default()
            .contains(what)
        {
            return;
        }
        if let Some(code) = p.wait_exit(std::time::Duration::from_millis(50)) {
            panic!("exited ({code}) before {what:?}: {}", p.log_text());
        }
    }
    panic!("no {what:?} within 60 s: {}", p.log_text());
}

/// Whether a log value reads like Rust's `{:?}` rather than text for
/// people: `Some(…)`, `None`, a range `3..5`, a list `[…]`, a struct
/// `{ … }`, a duration `1.5s`, a CamelCase variant.
fn looks_like_debug(v: &str) -> bool {
    let duration = |w: &str| {
        let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == 'µ');
        let unit = &w[digits.len()..];
        !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && ["ns", "µs", "ms", "s"].contains(&unit)
    };
    let range = |w: &str| {
        w.split_once("..").is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().all(|c| c.is_ascii_digit())
                && b.chars().all(|c| c.is_ascii_digit())
        })
    };
    let camel = |w: &str| {
        let mut c = w.chars();
        c.next().is_some_and(|f| f.is_ascii_uppercase())
            && w.chars().all(|c| c.is_ascii_alphabetic())
            && w.chars().skip(1).any(|c| c.is_ascii_uppercase())
            && w.chars().any(|c| c.is_ascii_lowercase())
    };
    v.contains("Some(")
        || v == "None"
        || (v.starts_with('[') && v.ends_with(']'))
        || (v.contains("{ ") && v.contains(" }"))
        || camel(v)
        || v.split(|c: char| c.is_whitespace() || ",;:()".contains(c))
            .any(|w| duration(w) || range(w))
}

/// The JSON lines of `log` from ferry's own code.
fn ferry_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))
        })
        .filter(|v| v["target"].as_str().is_some_and(|t| t.starts_with("ferry")))
        .collect()
}

/// Every field of every line (and of its spans) is text for people, not a
/// Rust debug dump.
fn assert_no_debug_dumps(lines: &[serde_json::Value]) {
    for v in lines {
        let mut values: Vec<(&str, &serde_json::Value)> = Vec::new();
        for (k, x) in v.as_object().expect("an object") {
            if !["timestamp", "level", "target", "span", "spans"].contains(&k.as_str()) {
                values.push((k, x));
            }
        }
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        for (k, x) in values {
            if let Some(s) = x.as_str() {
                assert!(
                    !looks_like_debug(s),
                    "field {k} = {s:?} is a debug dump: {v}"
                );
            }
        }
        for span in &spans {
            for (k, x) in span.as_object().expect("a span object") {
                if let Some(s) = x.as_str() {
                    assert!(!looks_like_debug(s), "span field {k} = {s:?}: {v}");
                }
            }
        }
    }
}

fn line_with<'a>(
    lines: &'a [serde_json::Value],
    message: &str,
    log: &str,
) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
        .unwrap_or_else(|| panic!("no line {message:?}: {log}"))
}

#[test]
fn the_debug_dump_detector_knows_what_it_looks_for() {
    for dump in [
        "Some(ab12)",
        "None",
        "3..5",
        "[3, 5]",
        "Read { first_chunk: 1 }",
        "OnDemand",
        "retrying in 1.5s",
        "within 500ms (x)",
    ] {
        assert!(looks_like_debug(dump), "{dump}");
    }
    for text in [
        "on-demand",
        "3, 5",
        "within 1 s (--absent-timeout-secs)",
        "127.0.0.1:7700",
        "Connected",
        "/tmp/x.img",
        "ab12cd",
    ] {
        assert!(!looks_like_debug(text), "{text}");
    }
}

#[test]
fn log_fields_are_text_for_people_not_rust_debug_dumps() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, 4 * MIB)], 7);
    let port = free_udp_port();
    let serve_args: Vec<String> = [
        "--log-format",
        "json",
        "serve",
        "--disk",
        src.to_str().expect("utf8"),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--identity",
        w.path("src-id").to_str().expect("utf8"),
        "--trust-peer",
        &w.dst_fp,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut serve, serve_out) =
        spawn_logged(&w, "serve", &serve_args, "info,ferry_transport=debug");
    wait_printed(&mut serve, &serve_out, "ferry serve: exporting");
    let mut args = vec!["--log-format".to_string(), "json".to_string()];
    args.extend(w.pull_args(port, "dst.img"));
    args.push("--hold-background".into());
    let debug = "info,ferry=debug,ferry_pull=debug,ferry_nbd=debug,ferry_transport=debug";
    let (mut pull, pull_out) = spawn_logged(&w, "pull", &args, debug);
    wait_printed(&mut pull, &pull_out, "ferry pull: serving");
    w.wait_status(
        "the source reached",
        std::time::Duration::from_secs(60),
        |s| s["source_state"] == "connected",
    );
    // Chunk 5 fetched on demand, then damaged on the disk behind the
    // pull's back: the verification finds it and fetches it again.
    let chunk = 65536u64;
    let (error, data) = nbd_read(&w.path("nbd.sock"), 5 * chunk, 4096);
    assert_eq!(error, 0);
    let mut expected = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&src).expect("source"),
        &mut expected,
        5 * chunk,
    )
    .expect("read the source");
    assert_eq!(data, expected);
    // The source goes away for a while: the pull says it cannot reconnect.
    serve.kill9();
    let t0 = std::time::Instant::now();
    while !pull.log_text().contains("reconnect failed") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "no failed reconnect: {}",
            pull.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _serve2 = w.serve_on(&src, port);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(w.path("dst.img"))
            .expect("destination"),
        &[0xa5; 64],
        5 * chunk + 100,
    )
    .expect("damage the destination");
    w.background("resume");
    let s = w.wait_verified(std::time::Duration::from_secs(120));
    assert_eq!(s["verify_refetched_chunks"], 1, "{s}");

    let disk = w.path("dst.img").display().to_string();
    let log = pull.log_text();
    let lines = ferry_lines(&log);
    let fetch = line_with(&lines, "on-demand fetch", &log);
    assert_eq!(fetch["first_chunk"], 5, "{fetch}");
    assert!(fetch["chunks"].is_u64(), "{fetch}");
    // Fetched for an NBD request: in the connection's span, inside the
    // pull's, which names the disk.
    assert_eq!(fetch["spans"][0]["name"], "pull", "{fetch}");
    assert_eq!(fetch["spans"][0]["disk"], disk.as_str(), "{fetch}");
    assert_eq!(fetch["span"]["name"], "nbd", "{fetch}");
    let failed = line_with(&lines, "reconnect failed", &log);
    assert!(failed["error"].is_string(), "{failed}");
    let found = line_with(&lines, "verification found chunks differing", &log);
    assert_eq!(found["mismatched_chunks"], 1, "{found}");
    assert_eq!(found["chunks"], "5", "{found}");
    assert_no_debug_dumps(&lines);

    let slog = serve.log_text();
    let slines = ferry_lines(&slog);
    let connected = line_with(&slines, "destination connected", &slog);
    assert_eq!(connected["peer"], w.dst_fp.as_str(), "{connected}");
    let read = line_with(&slines, "on-demand read written", &slog);
    assert!(
        ["on-demand", "hedge"].contains(&read["priority"].as_str().unwrap_or("")),
        "{read}"
    );
    assert_no_debug_dumps(&slines);
}

#[test]
fn nbd_requests_log_inside_the_disks_span() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, 4 * MIB)], 8);
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let mut pull = w.pull(&args);
    w.wait_status(
        "the source reached",
        std::time::Duration::from_secs(60),
        |s| s["source_state"] == "connected",
    );
    pull.kill9();
    serve.kill9();
    // Resumed without its source: a write into an absent block waits for
    // data that cannot come, and fails after a second.
    args.extend(["--absent-timeout-secs".into(), "1".into()]);
    let pull = w.pull(&args);
    let error = nbd_write_without_flush(&w.path("nbd.sock"), 512, &[7u8; 512]);
    assert_ne!(error, 0, "a write needing absent data succeeded");
    let log = pull.log_text();
    let span = format!("pull{{disk={}}}", w.path("dst.img").display());
    for what in [
        "absent data not fetched within 1 s",
        "device request failed",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line {what:?}: {log}"));
        assert!(line.contains(&span), "{line:?} lacks {span}");
        assert!(
            line.contains(":nbd{peer="),
            "{line:?} lacks the connection's span"
        );
    }
}
