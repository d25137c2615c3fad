//! The systemd units in `scripts/systemd/`: systemd itself accepts them
//! (`systemd-analyze verify`, which names unknown or misspelt directives),
//! and every option their `ExecStart=` passes is one that the subcommand
//! it runs takes.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::{ferry_bin, require_tool};

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("scripts/systemd")
}

/// The unit's text with its `ExecStart=` pointed at the built binary.
fn unit_text(name: &str) -> String {
    let text = std::fs::read_to_string(unit_dir().join(name))
        .unwrap_or_else(|e| panic!("reading {name}: {e}"));
    assert!(text.contains("/usr/local/bin/ferry "), "{name}: ExecStart");
    text.replace("/usr/local/bin/ferry", &ferry_bin().display().to_string())
}

/// What `systemd-analyze verify` says about `text` as an instance of a
/// template unit (empty: nothing to say).
fn verify(template: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let instance = template.replace("@.", "@vm1.");
    let path = dir.path().join(&instance);
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        said.push_str(&format!("\n(exit {:?})", out.status.code()));
    }
    said.trim().to_string()
}

/// The `--options` of the `ExecStart=` command (continuation lines
/// joined) and its subcommand.
fn exec_options(text: &str) -> (String, Vec<String>) {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart=");
    let words: Vec<&str> = line.split_whitespace().collect();
    let sub = words[1].to_string();
    let opts = words
        .iter()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.to_string())
        .collect();
    (sub, opts)
}

#[test]
fn the_systemd_units_verify_and_pass_only_options_ferry_takes() {
    if !require_tool("systemd-analyze") {
        return;
    }
    for unit in ["ferry-serve@.service", "ferry-pull@.service"] {
        let text = unit_text(unit);
        let said = verify(unit, &text);
        assert!(
            said.is_empty(),
            "{unit}: systemd-analyze verify says:\n{said}"
        );
        let (sub, opts) = exec_options(&text);
        let help = Command::new(ferry_bin())
            .args([sub.as_str(), "--help"])
            .output()
            .expect("run ferry --help");
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(!opts.is_empty(), "{unit}: no options found");
        for o in opts {
            assert!(
                help.contains(&format!("{o} ")) || help.contains(&format!("{o}\n")),
                "{unit}: ferry {sub} has no option {o}"
            );
        }
    }
}

/// The check above can fail: a misspelt directive is reported.
#[test]
fn a_misspelt_directive_is_reported() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let text = unit_text("ferry-serve@.service").replace("DeviceAllow=", "DeviceAlow=");
    let said = verify("ferry-serve@.service", &text);
    assert!(said.contains("DeviceAlow"), "{said}");
}
