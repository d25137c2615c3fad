//! Waiting for and watching a pull as an operator does: `ferry status
//! --wait` exits 0 once the pull is complete and verified, 2 when it is
//! stopped by an error, 3 at its timeout, and reaches a restarted pull
//! again; `ferry status --watch` draws a bar on a terminal and plain lines
//! in a pipe; a finished pull shows no rate and no ETA; rates with units.

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// `ferry status ARGS --control ctl.sock`, run to completion (killed
/// after 300 s: a wait that never ends fails the test, not hangs it).
fn status(w: &World, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("300")
        .arg(ferry_bin())
        .arg("status")
        .arg("--control")
        .arg(w.path("ctl.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry status")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A source of 4 MiB (1 MiB of data, the rest zero) and a pull of it
/// with `extra` options.
fn pull_of_4_mib(w: &World, extra: &[&str]) -> (Proc, Proc, u16) {
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend(extra.iter().map(|s| s.to_string()));
    let pull = w.pull(&args);
    (serve, pull, port)
}

#[test]
fn status_wait_exits_0_once_complete_and_verified_without_rate_or_eta() {
    let w = World::new();
    let (_serve, _pull, _) = pull_of_4_mib(&w, &[]);
    let out = status(&w, &["--wait", "--timeout-secs", "240"]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(said.contains("phase:       complete"), "{said}");
    assert!(said.contains("verified:    ok"), "{said}");
    assert!(said.contains("present:     4.0 MiB of 4.0 MiB"), "{said}");
    // Finished: neither rate nor ETA, in the waited status or a new one.
    let plain = text(&status(&w, &[]).stdout);
    for t in [&said, &plain] {
        assert!(!t.contains("ETA") && !t.contains("rate:"), "{t}");
    }
    // --wait --json prints the final status as JSON.
    let out = status(&w, &["--wait", "--json", "--timeout-secs", "240"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(s["verified"], "ok", "{s}");
    // The JSON too: a finished copy has no rate and no ETA.
    assert_eq!(s["rate_bytes_per_sec"], 0, "{s}");
    assert!(s["eta_seconds"].is_null(), "{s}");
    // --watch into a pipe ends as --wait does, its line without rate/ETA.
    let out = status(&w, &["--watch", "--timeout-secs", "240"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = text(&out.stdout);
    let last = lines.lines().last().expect("a line");
    assert!(
        last.starts_with("complete 100.0%: 4.0 MiB of 4.0 MiB; source released"),
        "{last:?}"
    );
    assert!(!last.contains("ETA") && !last.contains("/s"), "{last:?}");
}

#[test]
fn status_wait_exits_2_when_the_source_changes() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 7);
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let ctl = w.path("ctl.sock");
    let ctl = ctl.to_str().expect("utf8");
    let mut wait = w.spawn(
        "wait",
        &[
            "status",
            "--control",
            ctl,
            "--wait",
            "--timeout-secs",
            "240",
        ],
    );
    // It waits while the copy is held back.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        wait.child.try_wait().expect("try_wait").is_none(),
        "{}",
        wait.log_text()
    );
    // The source comes back on the same port with other contents.
    serve.kill9();
    let other = w.path("other.img");
    make_image(&other, 16 * MIB, &[(0, 16 * MIB)], 8);
    let _serve2 = w.serve_on(&other, port);
    w.background("resume");
    let code = wait.wait_exit(Duration::from_secs(240));
    let log = wait.log_text();
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("the pull stopped with an error"), "{log}");
    assert!(log.contains("source"), "{log}");
    assert!(!log.contains("ETA"), "{log}");
}

#[test]
fn status_wait_and_watch_exit_3_at_their_timeout() {
    let w = World::new();
    let (_serve, _pull, _) = pull_of_4_mib(&w, &["--hold-background"]);
    let out = status(&w, &["--wait", "--timeout-secs", "1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let e = text(&out.stderr);
    assert!(e.contains("timed out after 1 s"), "{e}");
    assert!(e.contains("last seen: copying"), "{e}");
    // Without --wait or --watch, --timeout-secs means nothing: refused.
    let out = status(&w, &["--timeout-secs", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn status_wait_reaches_a_restarted_pull_again() {
    let w = World::new();
    let (_serve, mut pull, port) = pull_of_4_mib(&w, &["--hold-background"]);
    let ctl = w.path("ctl.sock");
    let ctl = ctl.to_str().expect("utf8");
    let mut wait = w.spawn(
        "wait",
        &[
            "status",
            "--control",
            ctl,
            "--wait",
            "--timeout-secs",
            "240",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    pull.kill9();
    // Gone for a few seconds, as under systemd's Restart=.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        wait.child.try_wait().expect("try_wait").is_none(),
        "{}",
        wait.log_text()
    );
    let _pull2 = w.pull(&w.pull_args(port, "dst.img"));
    let code = wait.wait_exit(Duration::from_secs(240));
    let log = wait.log_text();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("trying again, attempt 1 of"), "{log}");
    assert!(log.contains("reached the pull at"), "{log}");
    assert!(log.contains("verified:    ok"), "{log}");
}

#[test]
fn status_watch_draws_a_bar_in_a_pty_and_plain_lines_in_a_pipe() {
    if !require_tool("script") {
        return;
    }
    let w = World::new();
    let (_serve, _pull, _) = pull_of_4_mib(&w, &["--hold-background"]);
    // The zero 3 MiB are present once the manifest is in: 75%.
    w.wait_status("the manifest", Duration::from_secs(120), |s| {
        s["present_bytes"] == 3 * MIB
    });
    let cmd = format!(
        "{} status --control {} --watch --timeout-secs 3",
        ferry_bin().display(),
        w.path("ctl.sock").display()
    );
    let out = Command::new("timeout")
        .args(["300", "script", "-qfec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let tty = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A bar, three quarters full, redrawn in place.
    assert!(tty.contains(&format!("{}>", "=".repeat(20))), "{tty:?}");
    assert!(tty.contains(" 75% 3.0 MiB/4.0 MiB 0 B/s ETA -"), "{tty:?}");
    assert!(tty.contains('\r') || tty.contains('\x1b'), "{tty:?}");

    let out = status(&w, &["--watch", "--timeout-secs", "5"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let lines = text(&out.stdout);
    assert!(
        !lines.contains('\x1b') && !lines.contains('\r'),
        "{lines:?}"
    );
    assert!(lines.lines().count() >= 2, "{lines:?}");
    for l in lines.lines() {
        assert!(
            l.starts_with("copying 75.0%: 3.0 MiB of 4.0 MiB, ") && l.contains("ETA"),
            "{l:?}"
        );
    }
}

#[test]
fn rates_and_sizes_take_units_and_name_bad_input() {
    let w = World::new();
    let (_serve, _pull, port) = pull_of_4_mib(
        &w,
        &[
            "--hold-background",
            "--sync-bytes",
            "1MiB",
            "--rate",
            "8Mbit",
        ],
    );
    // 8 Mbit/s is 1 MB/s, shown in binary units.
    assert_eq!(w.status()["rate_limit_bytes_per_sec"], 1_000_000);
    let plain = text(&status(&w, &[]).stdout);
    assert!(plain.contains("limited to 976.6 KiB/s"), "{plain}");
    for (rate, bytes) in [
        ("rate=50M", 50_000_000u64),
        ("rate=50MiB", 50 * MIB),
        ("rate=100Mbit", 12_500_000),
        ("rate=4096", 4096),
    ] {
        w.background(rate);
        assert_eq!(w.status()["rate_limit_bytes_per_sec"], bytes, "{rate}");
    }
    let out = w.ferry(&[
        "background",
        "--control",
        w.path("ctl.sock").to_str().expect("utf8"),
        "rate=50Mb",
    ]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("\"50Mb\"") && e.contains("bits or bytes"), "{e}");
    // At the command line too, before anything is made.
    for (opt, value, says) in [
        ("--rate", "fast", "\"fast\""),
        ("--rate", "2TiB", "1 TiB/s"),
        ("--sync-bytes", "1Gbit", "bits are for rates"),
    ] {
        let mut args = w.pull_args(port, "other.img");
        args.extend([opt.to_string(), value.to_string()]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.ferry(&a);
        assert!(!out.status.success(), "{opt} {value} accepted");
        let e = text(&out.stderr);
        assert!(e.contains(says), "{opt} {value}: {e}");
        assert!(!w.path("other.img").exists());
    }
}
