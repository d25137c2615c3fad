//! `ferry background pause|resume|rate=` survive a restart of the pull
//! (kill -9, as a crash or a systemd restart): they are in the state file
//! before the command answers, and a restart with the same command line
//! keeps them; a command line with another value replaces them.

use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn u(s: &serde_json::Value, field: &str) -> u64 {
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {s}"))
}

#[test]
fn a_pause_and_a_rate_set_at_runtime_survive_kill_9() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 64 * MIB, &[(0, 64 * MIB)], 5);
    let (_serve, port) = w.serve(&src, &[]);
    let args = with(w.pull_args(port, "dst.img"), &["--rate", "4M"]);
    let mut pull = w.pull(&args);
    w.wait_status(
        "the background copy under way",
        Duration::from_secs(120),
        |s| u(s, "fetched_background_bytes") > 0,
    );
    w.background("rate=16M");
    w.background("pause");
    let s = w.status();
    assert_eq!(s["background"], "paused", "{s}");
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 16_000_000, "{s}");
    assert!(
        u(&s, "present_bytes") < 64 * MIB,
        "finished before the kill: {s}"
    );
    pull.kill9();

    // The same command line again: the runtime changes win.
    let pull = w.pull(&args);
    let s = w.wait_status(
        "the source reached and its manifest in",
        Duration::from_secs(120),
        |s| s["source_state"] == "connected" && u(s, "source_data_bytes") > 0,
    );
    assert_eq!(s["background"], "paused", "{s}");
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 16_000_000, "{s}");
    // The copier could run now (source reached, manifest in); it must not:
    // nothing is fetched in the background while we look.
    let present = u(&s, "present_bytes");
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let s = w.status();
        assert_eq!(
            u(&s, "fetched_background_bytes"),
            0,
            "copied while paused: {s}"
        );
        assert_eq!(u(&s, "present_bytes"), present, "{s}");
        assert_eq!(s["background"], "paused", "{s}");
    }
    let log = pull.log_text();
    assert!(
        log.contains("background paused (set at runtime on "),
        "the start does not say why it is paused: {log}"
    );
    assert!(
        log.contains("background rate 15.3 MiB/s (set at runtime on "),
        "the start does not say where its rate comes from: {log}"
    );
    w.background("resume");
    let s = w.wait_verified(Duration::from_secs(300));
    assert!(u(&s, "fetched_background_bytes") > 0, "{s}");
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 16_000_000, "{s}");
    assert_files_equal(&src, &w.path("dst.img"));
}

#[test]
fn a_changed_command_line_replaces_what_was_set_at_runtime() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 64 * MIB, &[(0, 64 * MIB)], 6);
    let (_serve, port) = w.serve(&src, &[]);
    let base = w.pull_args(port, "dst.img");
    // As a systemd unit would: --hold-background and --rate on every start.
    let held_1m = with(base.clone(), &["--hold-background", "--rate", "1M"]);
    let mut pull = w.pull(&held_1m);
    w.background("rate=3M");
    w.background("resume");
    pull.kill9();

    // Same command line: resumed and at 3M, although it says hold and 1M.
    let mut pull = w.pull(&held_1m);
    let s = w.status();
    assert_eq!(s["background"], "running", "{s}");
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 3_000_000, "{s}");
    pull.kill9();

    // A new --rate: the command line wins, and says so; the resume stays.
    let mut pull = w.pull(&with(base.clone(), &["--hold-background", "--rate", "2M"]));
    let s = w.status();
    assert_eq!(s["background"], "running", "{s}");
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 2_000_000, "{s}");
    let log = pull.log_text();
    assert!(log.contains("as --rate says"), "{log}");
    pull.kill9();

    // The runtime rate it replaced is gone for good: back to the first
    // command line, its --rate applies.
    let _pull = w.pull(&held_1m);
    let s = w.status();
    assert_eq!(u(&s, "rate_limit_bytes_per_sec"), 1_000_000, "{s}");
    assert_eq!(s["background"], "running", "{s}");
}
