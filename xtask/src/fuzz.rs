//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` and runs
//! each for a bounded time (coverage-guided libFuzzer, no sanitizer, so it
//! works on the stable toolchain), then prints the executions per target
//! and fails if any target found a crash (or hang, or leak of memory past
//! libFuzzer's limit).
//!
//! Stable toolchain: with `--sanitizer none`, cargo-fuzz (0.13) passes only
//! stable rustc flags (`-Cpasses=sancov-module`,
//! `-Cllvm-args=-sanitizer-coverage-*`, `--cfg fuzzing`,
//! `-Cdebug-assertions`, `-Ccodegen-units=1`); the `-Z` flags it knows are
//! for sanitizers, `--build-std` and `--careful` only. So no nightly and no
//! `RUSTC_BOOTSTRAP` are needed.
//!
//! The build keeps debug assertions and overflow checks on (cargo-fuzz's
//! default without `-O`): an arithmetic overflow on fuzzed input is a
//! crash. Each target starts from its committed seeds (`fuzz/seeds/T`) and
//! from the corpus earlier runs grew (`fuzz/corpus/T`, not committed);
//! crashing inputs land in `fuzz/artifacts/T`; each run's libFuzzer output
//! is kept in `target/fuzz-logs/T.log`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::setup::{cargo, run, target_dir, workspace_root};

/// Every fuzz target (a `[[bin]]` of `fuzz/Cargo.toml`).
pub(crate) const TARGETS: &[&str] = &[
    "wire",
    "nbd_handshake",
    "nbd_transmission",
    "state_file",
    "control",
];

/// libFuzzer's per-input time limit, in seconds: far above what any input
/// takes (milliseconds), so only a hang trips it, even on a loaded machine.
const INPUT_TIMEOUT_S: u32 = 30;

#[derive(Args, Debug)]
pub(crate) struct FuzzArgs {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable); default: all of them.
    #[arg(long = "target", value_name = "T")]
    targets: Vec<String>,
}

/// What one target's run did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RunStats {
    /// Inputs executed.
    pub(crate) execs: u64,
    /// Seconds libFuzzer ran.
    pub(crate) seconds: u64,
}

/// Reads libFuzzer's closing line `Done N runs in S second(s)`.
pub(crate) fn parse_done(log: &str) -> Option<RunStats> {
    let line = log.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let (_, execs, _, _, seconds) = (
        words.next()?,
        words.next()?,
        words.next()?,
        words.next()?,
        words.next()?,
    );
    Some(RunStats {
        execs: execs.parse().ok()?,
        seconds: seconds.parse().ok()?,
    })
}

/// `cargo fuzz …` without what `cargo run` set for xtask itself: ring's
/// build script watches `CARGO_MANIFEST_DIR`, so inheriting xtask's would
/// rebuild every target (minutes) whenever `cargo fuzz` is run both from
/// here and by hand.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).arg("fuzz");
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Makes sure `cargo fuzz` runs, installing cargo-fuzz from crates.io
/// (`cargo install cargo-fuzz --locked`) when it does not.
fn ensure_cargo_fuzz() -> Result<()> {
    let works = cargo_fuzz(&workspace_root())
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz");
    run(Command::new(cargo()).args(["install", "cargo-fuzz", "--locked"]))
        .context("cannot install cargo-fuzz")
}

/// Runs `cargo xtask fuzz`.
pub(crate) fn run_fuzz(args: &FuzzArgs) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target {t:?}; the targets: {}",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let root = workspace_root();
    let t0 = Instant::now();
    ensure_cargo_fuzz()?;
    eprintln!(
        "xtask fuzz: cargo-fuzz ready ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    let t1 = Instant::now();
    let mut build = cargo_fuzz(&root);
    build.args(["build", "--sanitizer", "none"]);
    if targets.len() == 1 {
        build.args(&targets);
    }
    run(&mut build).context("cannot build the fuzz targets")?;
    eprintln!(
        "xtask fuzz: targets built ({:.0} s)",
        t1.elapsed().as_secs_f64()
    );
    let logs = target_dir().join("fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut results = Vec::new();
    for t in &targets {
        results.push((*t, fuzz_one(&root, &logs, t, args.seconds)?));
    }
    eprintln!("xtask fuzz: target, executions, seconds, executions/s, result");
    let mut failed = Vec::new();
    for (t, (stats, crash)) in &results {
        let rate = stats.execs / stats.seconds.max(1);
        let verdict = match crash {
            None => "ok".to_string(),
            Some(why) => {
                failed.push(*t);
                format!("CRASH: {why}")
            }
        };
        println!(
            "fuzz\t{t}\t{}\t{}\t{rate}\t{verdict}",
            stats.execs, stats.seconds
        );
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/, output in {})",
            failed.join(", "),
            logs.display()
        );
    }
    eprintln!(
        "xtask fuzz: all {} targets ran without a crash ({:.0} s in all)",
        targets.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one target for `seconds`; its stats and, if it failed, why.
fn fuzz_one(
    root: &Path,
    logs: &Path,
    target: &str,
    seconds: u64,
) -> Result<(RunStats, Option<String>)> {
    let fuzz = root.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz.join("seeds").join(target);
    eprintln!("xtask fuzz: running {target} for {seconds} s");
    let mut cmd = cargo_fuzz(root);
    cmd.args(["run", "--sanitizer", "none", target])
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log_path = logs.join(format!("{target}.log"));
    std::fs::write(&log_path, &log)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let stats = parse_done(&log);
    let crash = if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for l in tail.iter().rev() {
            eprintln!("  {target}: {l}");
        }
        Some(format!(
            "cargo fuzz run exited with {} (see {})",
            out.status,
            log_path.display()
        ))
    } else if stats.is_none() {
        Some(format!(
            "libFuzzer's final `Done` line is missing (see {})",
            log_path.display()
        ))
    } else {
        None
    };
    let stats = stats.unwrap_or(RunStats {
        execs: 0,
        seconds: 0,
    });
    eprintln!(
        "xtask fuzz: {target}: {} executions in {} s",
        stats.execs, stats.seconds
    );
    Ok((stats, crash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_libfuzzer_line_is_read() {
        let log = "#2\tINITED cov: 370 ft: 371 corp: 1/1b exec/s: 0 rss: 50Mb\n\
                   #240980\tDONE   cov: 382 ft: 399 corp: 8/32b lim: 2380 exec/s: 21907 rss: 50Mb\n\
                   stat::number_of_executed_units: 240980\n\
                   Done 240980 runs in 11 second(s)\n";
        assert_eq!(
            parse_done(log),
            Some(RunStats {
                execs: 240980,
                seconds: 11
            })
        );
        assert_eq!(
            parse_done("==123== ERROR: libFuzzer: deadly signal\n"),
            None
        );
    }

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_seeds() {
        let root = crate::setup::workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has {bins} targets");
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "fuzz/Cargo.toml lacks target {t}"
            );
            assert!(
                root.join("fuzz_targets").join(format!("{t}.rs")).is_file(),
                "fuzz/fuzz_targets/{t}.rs is missing"
            );
            let seeds = std::fs::read_dir(root.join("seeds").join(t))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "fuzz/seeds/{t} has no seed");
        }
    }
}
