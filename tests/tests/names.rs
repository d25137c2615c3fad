//! Host names where addresses are given: `ferry serve --listen
//! localhost:PORT` and `ferry pull --source localhost:PORT` migrate a disk;
//! a name that does not resolve is refused, naming it.

use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// Feature: `--listen` and `--source` take HOST:PORT (before, only an IP
/// address and port parsed).
#[test]
fn serve_and_pull_by_host_name_migrate_the_disk() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, 256 * 1024), (2 * MIB, MIB)], 11);
    let id = w.path("src-id");
    let mut started = None;
    for _ in 0..5 {
        let port = free_udp_port();
        let listen = format!("localhost:{port}");
        let p = w.spawn(
            "serve",
            &[
                "serve",
                "--disk",
                src.to_str().expect("utf8"),
                "--listen",
                &listen,
                "--identity",
                id.to_str().expect("utf8"),
                "--trust-peer",
                &w.dst_fp,
            ],
        );
        let t0 = Instant::now();
        let mut p = p;
        while t0.elapsed() < Duration::from_secs(60) {
            if p.log_text().contains("ferry serve: exporting") {
                break;
            }
            if p.wait_exit(Duration::from_millis(50)).is_some() {
                break;
            }
        }
        if p.log_text().contains("ferry serve: exporting") {
            started = Some((p, port));
            break;
        }
        eprintln!("serve did not start on {listen}: {}", p.log_text());
    }
    let (_serve, port) = started.expect("ferry serve --listen localhost:PORT did not start");
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--source").expect("--source") + 1;
    args[i] = format!("localhost:{port}");
    let _pull = w.pull(&args);
    w.wait_verified(Duration::from_secs(120));
    assert_files_equal(&src, &w.path("dst.img"));
}

/// A name that does not resolve: `pull --source` and `serve --listen` stop
/// with an error naming it, and the pull creates nothing.
#[test]
fn an_unresolvable_host_name_is_refused_by_name() {
    let w = World::new();
    let mut args = w.pull_args(7700, "dst.img");
    let i = args.iter().position(|a| a == "--source").expect("--source") + 1;
    args[i] = "no-such-host.invalid:7700".to_string();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = w.spawn("pull", &a);
    let code = p.wait_exit(Duration::from_secs(60));
    let log = p.log_text();
    assert!(code.is_some_and(|c| c != 0), "not refused: {log}");
    assert!(
        log.contains("cannot resolve the source's name no-such-host.invalid:7700"),
        "unclear error: {log}"
    );
    assert!(!w.path("dst.img").exists(), "a refused pull made its disk");
    let src = w.path("src.img");
    make_image(&src, MIB, &[], 1);
    let out = w.ferry(&[
        "serve",
        "--disk",
        src.to_str().expect("utf8"),
        "--listen",
        "no-such-host.invalid:7700",
        "--identity",
        w.path("src-id").to_str().expect("utf8"),
        "--trust-peer",
        &w.dst_fp,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {err}");
    assert!(
        err.contains("cannot resolve no-such-host.invalid:7700"),
        "unclear error: {err}"
    );
}
