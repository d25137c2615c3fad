//! Who may use a running pull: its sockets are owner-only whatever the
//! umask (or one group's with `--group`), NBD over TCP needs an explicit
//! flag, the control socket cannot be exhausted by long lines or idle
//! connections, and a refused start leaves no socket files behind.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// Starts `ferry pull ARGS` under umask 000 and waits until it serves.
fn pull_under_umask_000(w: &World, args: &[String]) -> Proc {
    let log = w.path("pull-umask.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(ferry_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
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

/// Runs ferry to completion, killed after 120 s (a start that should be
/// refused but is not would otherwise serve for ever).
fn ferry_bounded(args: &[String]) -> std::process::Output {
    Command::new("timeout")
        .arg("120")
        .arg(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Our own uid and gid (from a file we create).
fn me(w: &World) -> (u32, u32) {
    let p = w.path("whoami");
    std::fs::write(&p, b"").unwrap();
    let m = std::fs::metadata(&p).unwrap();
    (m.uid(), m.gid())
}

/// Runs `ferry status` from a copy of the binary anyone may run, as user
/// `uid` with group `gid` (needs root); returns whether it succeeded and
/// what it said.
fn status_as(w: &World, uid: u32, gid: u32) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let bin = w.path("ferry-copy");
    if !bin.exists() {
        std::fs::copy(ferry_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new(&bin)
        .args(["status", "--control"])
        .arg(w.path("ctl.sock"))
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn sockets_are_owner_only_under_umask_000() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = pull_under_umask_000(&w, &args);
    assert_eq!(mode(&w.path("nbd.sock")), 0o600, "NBD socket");
    assert_eq!(mode(&w.path("ctl.sock")), 0o600, "control socket");
    // Our own user still gets in.
    assert_eq!(w.status()["background"], "paused");
    // Another user does not, even where the directory lets it through.
    if me(&w).0 == 0 {
        std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ok, said) = status_as(&w, 65534, 65534);
        assert!(!ok, "another user reached the control socket: {said}");
        assert!(said.contains("ermission denied"), "{said}");
    } else {
        eprintln!("not root: skipping the connection attempt as another user");
    }
}

#[test]
fn group_option_gives_one_group_the_sockets_and_files() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let (uid, own_gid) = me(&w);
    // Root may give them to any group (a number without a name here);
    // another user to its own.
    let gid = if uid == 0 { 4242 } else { own_gid };
    let mut args = w.pull_args(port, "dst.img");
    args.extend([
        "--hold-background".to_string(),
        "--group".to_string(),
        gid.to_string(),
    ]);
    let _pull = pull_under_umask_000(&w, &args);
    for name in ["nbd.sock", "ctl.sock", "dst.img", "dst.img.ferry-state"] {
        let p = w.path(name);
        assert_eq!(mode(&p), 0o660, "{name}");
        assert_eq!(std::fs::metadata(&p).unwrap().gid(), gid, "{name}");
    }
    if uid == 0 {
        std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ok, said) = status_as(&w, 65534, gid);
        assert!(ok, "a member of the group was refused: {said}");
        let (ok, said) = status_as(&w, 65534, 65534);
        assert!(!ok, "a user outside the group got in: {said}");
    }
    // An unknown group name is a clear error before anything is made.
    let mut args = w.pull_args(port, "other.img");
    args.extend(["--group".to_string(), "no-such-group-ferry".to_string()]);
    let out = ferry_bounded(&args);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("no-such-group-ferry"), "{e}");
    assert!(!w.path("other.img").exists());
}

#[test]
fn nbd_over_tcp_needs_an_explicit_flag_and_warns() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    let i = args.iter().position(|a| a == "--nbd").unwrap();
    args[i + 1] = "127.0.0.1:0".into();
    let out = ferry_bounded(&args);
    assert!(!out.status.success(), "NBD over TCP without the flag");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--nbd-tcp-insecure"), "{e}");
    assert!(!w.path("dst.img").exists());
    assert!(!w.path("ctl.sock").exists());
    args.push("--nbd-tcp-insecure".into());
    let pull = w.pull(&args);
    assert!(pull.log_text().contains("INSECURE"), "{}", pull.log_text());
    assert!(pull.log_text().contains("nbd://127.0.0.1:"));
}

/// Sends `bytes` on a new control connection and returns the reply (or
/// what came before the server closed it; empty: nothing).
fn control_exchange(w: &World, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(w.path("ctl.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may stop reading (and close) before all of it is sent.
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no reply from the control socket within 30 s: {e}"),
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// A pull with the background copy held back, for control-socket tests.
fn idle_pull(w: &World) -> (Proc, Proc) {
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    (serve, w.pull(&args))
}

#[test]
fn the_control_socket_refuses_long_lines_and_bad_text() {
    let w = World::new();
    let _procs = idle_pull(&w);
    // A line without end: refused after 4 KiB, not buffered.
    let reply = control_exchange(&w, &vec![b'x'; 8 * MIB as usize]);
    assert!(reply.contains("longer than 4096 bytes"), "{reply:?}");
    // Not UTF-8: an error reply, not silence.
    let reply = control_exchange(&w, b"sta\xfftus\n");
    assert!(reply.contains("not UTF-8"), "{reply:?}");
    // An absurd rate: refused, the limit unchanged.
    let reply = control_exchange(&w, b"rate 18446744073709551615\n");
    assert!(
        reply.contains("\"ok\":false") && reply.contains("1 TiB/s"),
        "{reply:?}"
    );
    assert_eq!(w.status()["rate_limit_bytes_per_sec"], 0);
}

#[test]
fn the_control_socket_closes_idle_connections() {
    let w = World::new();
    let _procs = idle_pull(&w);
    // Closed within 30 s (the timeout is 10 s; the rest is margin).
    let mut idle = UnixStream::connect(w.path("ctl.sock")).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        idle.read(&mut b).expect("closed within 30 s"),
        0,
        "an idle control connection got data"
    );
}

#[test]
fn the_control_socket_turns_away_connections_beyond_its_cap() {
    let w = World::new();
    let _procs = idle_pull(&w);
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(w.path("ctl.sock")).unwrap())
        .collect();
    // At once, with a reason (not after the idle ones time out).
    let reply = control_exchange(&w, b"status\n");
    assert!(reply.contains("too many control connections"), "{reply:?}");
    // Once they go, status works again.
    drop(held);
    let t0 = Instant::now();
    loop {
        let reply = control_exchange(&w, b"status\n");
        if reply.contains("\"phase\"") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{reply:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn absurd_rates_are_refused_with_the_limit_named() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.extend(["--rate".to_string(), u64::MAX.to_string()]);
    let out = ferry_bounded(&args);
    assert!(!out.status.success(), "--rate u64::MAX accepted");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("1 TiB/s"), "{e}");
    assert!(!w.path("dst.img").exists());

    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let out = w.ferry(&[
        "background",
        "--control",
        w.path("ctl.sock").to_str().unwrap(),
        &format!("rate={}", u64::MAX),
    ]);
    assert!(!out.status.success(), "rate=u64::MAX accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 TiB/s"),
        "{out:?}"
    );
    w.background("rate=50000000");
    assert_eq!(w.status()["rate_limit_bytes_per_sec"], 50_000_000);
}

#[test]
fn refused_starts_leave_no_socket_files() {
    let w = World::new();
    // The source is unreachable.
    let mut args = w.pull_args(free_udp_port(), "dst.img");
    args.extend(["--connect-timeout-secs".to_string(), "1".to_string()]);
    let out = ferry_bounded(&args);
    assert!(!out.status.success());
    assert!(!w.path("ctl.sock").exists(), "control socket left behind");
    assert!(!w.path("nbd.sock").exists(), "NBD socket left behind");
    // The disk exists with another size.
    let src = w.path("src.img");
    make_image(&src, 8 * MIB, &[(0, MIB)], 1);
    let (_serve, port) = w.serve(&src, &[]);
    make_image(&w.path("dst.img"), 5 * MIB, &[], 1);
    let args = w.pull_args(port, "dst.img");
    let out = ferry_bounded(&args);
    assert!(!out.status.success());
    assert!(!w.path("ctl.sock").exists(), "control socket left behind");
    assert!(!w.path("nbd.sock").exists(), "NBD socket left behind");
}

#[test]
fn a_changed_source_reads_stopped_and_status_exits_non_zero() {
    let w = World::new();
    let src = w.path("src.img");
    make_image(&src, 16 * MIB, &[(0, 16 * MIB)], 7);
    let (mut serve, port) = w.serve(&src, &[]);
    let mut args = w.pull_args(port, "dst.img");
    args.push("--hold-background".into());
    let _pull = w.pull(&args);
    let ctl = w.path("ctl.sock");
    let plain_status = || {
        w.ferry(&["status", "--control", ctl.to_str().unwrap()])
            .status
            .code()
    };
    assert_eq!(plain_status(), Some(0));
    // The source comes back on the same port with other contents.
    serve.kill9();
    let other = w.path("other.img");
    make_image(&other, 16 * MIB, &[(0, 16 * MIB)], 8);
    let mut serve2 = None;
    let t0 = Instant::now();
    while serve2.is_none() {
        let id = w.path("src-id");
        let mut p = w.spawn(
            "serve2",
            &[
                "serve",
                "--disk",
                other.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--identity",
                id.to_str().unwrap(),
                "--trust-peer",
                &w.dst_fp,
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        if p.wait_exit(Duration::from_millis(10)).is_none() {
            serve2 = Some(p);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "cannot restart serve"
        );
    }
    w.background("resume");
    let s = w.wait_status("error phase", Duration::from_secs(60), |s| {
        s["phase"] == "error"
    });
    assert!(s["error"].as_str().unwrap().contains("source"), "{s}");
    assert_eq!(s["source_state"], "stopped", "{s}");
    assert_eq!(plain_status(), Some(2), "ferry status in phase error");
}
