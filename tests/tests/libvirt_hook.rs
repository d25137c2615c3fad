//! The libvirt hook `scripts/libvirt/qemu`, run as libvirt runs it (the
//! file itself, executable, `DOMAIN OPERATION SUB-OPERATION EXTRA`, the
//! domain's XML on stdin) with a fake `systemctl` first on PATH that logs
//! its arguments: for each event the units it starts, none for a domain
//! without ferry settings, nothing on stdout (libvirt would take it as the
//! domain's XML), a failing `systemctl` failing the hook, a domain name no
//! unit can carry refused; and shellcheck finds nothing in it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_tests::require_tool;

fn hook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("scripts/libvirt/qemu")
}

/// A host: /etc/ferry with `pull-vm1.env` (a destination of vm1) and
/// `serve-vm2.env` (a source of vm2), and a fake `systemctl`.
struct Host {
    dir: tempfile::TempDir,
}

/// What one run of the hook did.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    /// The `systemctl` calls, one line of arguments each.
    calls: Vec<String>,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("etc-ferry");
        std::fs::create_dir(&conf).expect("mkdir");
        for env in ["pull-vm1.env", "serve-vm2.env", "pull-odd name.env"] {
            std::fs::write(conf.join(env), "").expect("write env");
        }
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        let fake = bin.join("systemctl");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"$*\" >> \"$FAKE_LOG\"\necho 'systemctl chatter'\nexit \"${FAKE_RC:-0}\"\n",
        )
        .expect("write the fake systemctl");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Host { dir }
    }

    fn run_rc(&self, args: &[&str], systemctl_rc: u8) -> Run {
        let log = self.dir.path().join("calls.log");
        let _ = std::fs::remove_file(&log);
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new(hook())
            .args(args)
            .env("PATH", path)
            .env("FERRY_CONF_DIR", self.dir.path().join("etc-ferry"))
            .env("FAKE_LOG", &log)
            .env("FAKE_RC", systemctl_rc.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the hook (is it executable?)");
        // libvirt writes the domain's XML; the hook need not read it.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"<domain type='kvm'><name>x</name></domain>\n");
        let out = child.wait_with_output().expect("wait for the hook");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            calls: std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect(),
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_rc(args, 0)
    }
}

/// Every event libvirt's QEMU driver sends, with the extra argument.
const EVENTS: &[(&str, &str)] = &[
    ("migrate", "begin"),
    ("restore", "begin"),
    ("prepare", "begin"),
    ("start", "begin"),
    ("started", "begin"),
    ("stopped", "end"),
    ("release", "end"),
    ("reconnect", "begin"),
    ("attach", "begin"),
];

#[test]
fn each_event_starts_the_units_this_host_has() {
    let h = Host::new();
    for (domain, pull, serve) in [
        ("vm1", true, false),
        ("vm2", false, true),
        ("vm3", false, false),
    ] {
        for (op, sub) in EVENTS {
            let r = h.run(&[domain, op, sub, "-"]);
            assert!(r.ok, "{domain} {op} {sub}: {}", r.stderr);
            assert_eq!(r.stdout, "", "{domain} {op} {sub} printed on stdout");
            let want: Vec<String> = match (*op, *sub) {
                ("migrate" | "prepare", "begin") if pull => {
                    vec![format!("start ferry-pull@{domain}.service")]
                }
                ("release", "end") if serve => vec![format!("start ferry-serve@{domain}.service")],
                _ => vec![],
            };
            assert_eq!(r.calls, want, "{domain} {op} {sub}");
        }
    }
}

#[test]
fn a_failing_unit_fails_the_hook_and_an_odd_domain_name_is_refused() {
    let h = Host::new();
    let r = h.run_rc(&["vm1", "prepare", "begin", "-"], 1);
    assert!(!r.ok, "a unit that did not start let the domain start");
    assert_eq!(r.calls, ["start ferry-pull@vm1.service"]);
    assert_eq!(r.stdout, "");
    let r = h.run_rc(&["vm2", "release", "end", "-"], 1);
    assert!(!r.ok);

    // A name with a space cannot be a unit instance as the units spell it.
    let r = h.run(&["odd name", "migrate", "begin", "-"]);
    assert!(!r.ok);
    assert!(r.calls.is_empty(), "{:?}", r.calls);
    assert!(r.stderr.contains("'odd name'"), "{}", r.stderr);
    // Not configured: any name passes untouched.
    let r = h.run(&["other name", "migrate", "begin", "-"]);
    assert!(r.ok && r.calls.is_empty());
}

#[test]
fn the_hook_is_shellcheck_clean() {
    if !require_tool("shellcheck") {
        return;
    }
    let out = Command::new("shellcheck")
        .arg(hook())
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
