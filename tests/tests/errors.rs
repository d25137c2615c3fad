//! Bad input and untrusted peers: each gets a clear error and a non-zero
//! exit, and existing files are left untouched.

use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_pull(w: &World, args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.ferry(&a)
}

#[test]
fn untrusted_destination_is_refused_on_both_sides_naming_its_fingerprint() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (serve, port) = w.serve(&src, &[]);
    let intruder = w.keygen("intruder-id");
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--identity").unwrap();
    args[i + 1] = w.path("intruder-id").display().to_string();
    let out = run_pull(&w, &args);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains(&intruder),
        "pull's error does not name our fingerprint: {e}"
    );
    assert!(e.contains("refused"), "{e}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        serve.log_text().contains(&intruder),
        "serve's log does not name the refused fingerprint: {}",
        serve.log_text()
    );
    assert!(
        !w.path("dst.img").exists(),
        "a refused pull created the disk"
    );
}

#[test]
fn untrusted_source_is_refused_naming_its_fingerprint() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--trust-peer").unwrap();
    args[i + 1] = "ab".repeat(32);
    let out = run_pull(&w, &args);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains(&w.src_fp),
        "pull's error does not name the source's fingerprint: {e}"
    );
    assert!(!w.path("dst.img").exists());
}

#[test]
fn missing_or_unreadable_source_disk_is_a_clear_error() {
    let w = World::new();
    let id = w.path("src-id");
    let out = w.ferry(&[
        "serve",
        "--disk",
        w.path("nope.img").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--identity",
        id.to_str().unwrap(),
        "--trust-peer",
        &w.dst_fp,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope.img"), "{}", stderr(&out));
    // A directory is not a disk.
    let out = w.ferry(&[
        "serve",
        "--disk",
        w.dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--identity",
        id.to_str().unwrap(),
        "--trust-peer",
        &w.dst_fp,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("neither a regular file nor a block device"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn existing_disk_of_another_size_is_refused_and_untouched() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let dst = w.path("dst.img");
    make_image(&dst, 5 * MIB, &[(0, 5 * MIB)], 9);
    let before = std::fs::read(&dst).unwrap();
    let out = run_pull(&w, &w.pull_args(port, "dst.img"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("exists with size 5242880"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        before,
        "the disk was modified"
    );
    assert!(
        !w.path("dst.img.ferry-state").exists(),
        "a state file was created"
    );
}

#[test]
fn existing_disk_without_state_is_refused_and_untouched() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let dst = w.path("dst.img");
    make_image(&dst, 8 * MIB, &[(0, MIB)], 9);
    let before = std::fs::read(&dst).unwrap();
    let out = run_pull(&w, &w.pull_args(port, "dst.img"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no state file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&dst).unwrap(), before);
}

#[test]
fn state_of_another_source_is_refused_and_files_untouched() {
    let w = World::new();
    let a = w.path("a.img");
    let b = w.path("b.img");
    make_image(&a, 8 * MIB, &[(0, MIB)], 1);
    make_image(&b, 8 * MIB, &[(0, MIB)], 2);
    {
        let (_serve, port) = w.serve(&a, &[]);
        let _pull = w.pull(&w.pull_args(port, "dst.img"));
        w.wait_verified(Duration::from_secs(60));
    }
    let disk_before = std::fs::read(w.path("dst.img")).unwrap();
    let state_before = std::fs::read(w.path("dst.img.ferry-state")).unwrap();
    let (_serve, port) = w.serve(&b, &[]);
    let out = run_pull(&w, &w.pull_args(port, "dst.img"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("belongs to another source"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(w.path("dst.img")).unwrap(), disk_before);
    assert_eq!(
        std::fs::read(w.path("dst.img.ferry-state")).unwrap(),
        state_before
    );
}

#[test]
fn unreachable_source_fails_after_the_timeout_naming_it() {
    let w = World::new();
    let port = free_udp_port();
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--connect-timeout-secs".to_string(), "2".to_string()]);
    let t0 = std::time::Instant::now();
    let out = run_pull(&w, &args);
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(30));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("unreachable"),
        "{e}"
    );
    assert!(!w.path("dst.img").exists());
}

#[test]
fn ports_in_use_are_clear_errors() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    // A second source on the same UDP port.
    let id = w.path("src-id");
    let out = w.ferry(&[
        "serve",
        "--disk",
        src.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--identity",
        id.to_str().unwrap(),
        "--trust-peer",
        &w.dst_fp,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
    // A pull whose NBD TCP port is taken: fails before creating anything.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--nbd").unwrap();
    args[i + 1] = taken_addr.clone();
    args.push("--nbd-tcp-insecure".into());
    let out = run_pull(&w, &args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&taken_addr), "{}", stderr(&out));
    assert!(
        !w.path("dst.img").exists(),
        "a failed pull created the disk"
    );
}

#[test]
fn malformed_fingerprint_and_status_without_pull_are_clear_errors() {
    let w = World::new();
    let mut args = w.pull_args(1, "dst.img");
    let i = args.iter().position(|a| a == "--trust-peer").unwrap();
    args[i + 1] = "not-hex".into();
    let out = run_pull(&w, &args);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a certificate fingerprint"),
        "{}",
        stderr(&out)
    );
    let out = w.ferry(&["status", "--control", w.path("none.sock").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach a running `ferry pull`"),
        "{}",
        stderr(&out)
    );
}
