//! Log lines as journald and log pipelines take them: no colour codes when
//! stderr is not a terminal, one JSON object per line with
//! `--log-format json`, a span naming the disk of each pull, and an
//! error's causes printed once each.

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
    args.extend(["--connect-timeout".to_string(), "1".to_string()]);
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
