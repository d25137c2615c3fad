//! `cargo xtask bench --dedup`: ferry with and without `--index` on a
//! source disk derived from a template the destination already holds, over
//! the emulated 200 Mbit/s, 50 ms link, both in the same run, interleaved.
//!
//! The template is an ext4 image made by `mkfs.ext4 -d` from a system
//! directory (real files). The source is a copy of it changed in place with
//! `debugfs -w`, as a VM changes its disk after it was cloned: files added
//! (about a tenth of the disk, half random and half text-like data, made by
//! a seeded generator), some rewritten, some deleted; everything else stays
//! where it was. The destination indexes the template (`ferry index
//! build`, timed from a cold page cache: the index build rate) and pulls
//! the source twice per run: plain, and with `--index`. Reported: whole-disk
//! time, bytes on the wire, bytes filled locally, first read and 4 KiB miss
//! latency, into the `dedup` section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{
    all_cases, allocated_bytes, chrono_now, drop_page_cache, fs_source_dir, git_head, machine,
    pick_probes, run_ferry, start_ferry_serve, write_section, BenchArgs, Ctx, Image, RunResult,
};
use crate::setup::{target_dir, workspace_root};
use crate::stats::{median, mmm, percentile};
use crate::wan::procs::{self, FerryIds};
use crate::wan::Wan;

/// What the derivation did to the template.
pub(crate) struct Derived {
    added_files: usize,
    added_bytes: u64,
    changed_files: usize,
    changed_bytes: u64,
    deleted_files: usize,
    deleted_bytes: u64,
}

impl Derived {
    /// One line for a report: what was added, rewritten and deleted.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} files added, {:.0} MiB, half random, half text-like; {} files rewritten, {:.0} MiB; {} deleted, {:.0} MiB",
            self.added_files,
            self.added_bytes as f64 / 1048576.0,
            self.changed_files,
            self.changed_bytes as f64 / 1048576.0,
            self.deleted_files,
            self.deleted_bytes as f64 / 1048576.0,
        )
    }
}

/// What the derivation needs besides the bench's tools.
pub(crate) const NEEDS: &[crate::setup::Need] = &[
    crate::setup::tool("mkfs.ext4", "e2fsprogs"),
    crate::setup::tool("debugfs", "e2fsprogs"),
    crate::setup::tool("e2fsck", "e2fsprogs"),
];

/// A seeded generator of file contents: 4 KiB pieces, alternately random
/// and text-like (words from a small vocabulary), as binaries and text mix
/// in an installed package.
fn contents(len: u64, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the ",
        "package ",
        "lib",
        "config ",
        "usr/share/",
        "version ",
        "= ",
        "0.",
        "1",
        "\n",
        "debian ",
        "install ",
        "file ",
        "data ",
        "#include ",
        "return ",
        "{ ",
        "}\n",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len as usize);
    let mut piece = 0u64;
    while (out.len() as u64) < len {
        let end = (out.len() + 4096).min(len as usize);
        if piece.is_multiple_of(2) {
            while out.len() < end {
                out.extend_from_slice(&next().to_le_bytes());
            }
        } else {
            while out.len() < end {
                out.extend_from_slice(WORDS[(next() % WORDS.len() as u64) as usize].as_bytes());
            }
        }
        out.truncate(end);
        piece += 1;
    }
    out
}

/// Regular files under `root` (sorted, relative), with their sizes; only
/// names debugfs takes without quoting.
fn files_under(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).expect("under root").to_path_buf();
                let plain = rel
                    .to_str()
                    .is_some_and(|s| s.chars().all(|c| c.is_ascii_graphic() && c != '"'));
                if plain {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((rel, len));
                }
            }
        }
    }
    out.sort();
    out
}

/// Makes the template (once per size and directory) and the source derived
/// from it; returns both paths, the template's description and what the
/// derivation did. Also `cargo xtask dedup-analysis --make-images`.
pub(crate) fn make_images(
    dir: &Path,
    size_mib: u64,
) -> Result<(PathBuf, PathBuf, String, Derived)> {
    let size = size_mib << 20;
    let (src_dir, n) = fs_source_dir(size).context("no directory small enough")?;
    let template = dir.join(format!("template-{size_mib}M.img"));
    let source = dir.join(format!("derived-{size_mib}M.img"));
    let stamp = dir.join(format!("template-{size_mib}M.from"));
    let want = format!("{}:{n}:v1", src_dir.display());
    let fresh = !template.exists()
        || !source.exists()
        || std::fs::read_to_string(&stamp).unwrap_or_default() != want;
    if fresh {
        eprintln!(
            "bench: making a {size_mib} MiB ext4 template from {} ({:.0} MiB)",
            src_dir.display(),
            n as f64 / 1048576.0
        );
        let _ = std::fs::remove_file(&template);
        super::mkfs_ext4_from(&src_dir, &template, size_mib)?;
        crate::setup::run(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&template)
                .arg(&source),
        )?;
    }
    // The derivation: a tenth of the disk added, every 23rd file rewritten,
    // every 37th deleted.
    let files = files_under(&src_dir);
    let staging = dir.join("dedup-staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let mut cmds = String::from("mkdir /ferry-added\n");
    let mut d = Derived {
        added_files: 0,
        added_bytes: 0,
        changed_files: 0,
        changed_bytes: 0,
        deleted_files: 0,
        deleted_bytes: 0,
    };
    for (i, (rel, len)) in files.iter().enumerate() {
        let path = format!("/{}", rel.display());
        if i % 37 == 36 {
            writeln!(cmds, "rm {path}")?;
            d.deleted_files += 1;
            d.deleted_bytes += len;
        } else if i % 23 == 22 && *len > 0 {
            let local = staging.join(format!("changed-{i}"));
            if fresh {
                std::fs::write(&local, contents(*len, i as u64))?;
            }
            writeln!(cmds, "rm {path}")?;
            writeln!(cmds, "write {} {path}", local.display())?;
            d.changed_files += 1;
            d.changed_bytes += len;
        }
    }
    let mut k = 0u64;
    while d.added_bytes < size / 10 {
        // 16 KiB to 4 MiB.
        let len = 16384u64 << (k % 9);
        let local = staging.join(format!("added-{k}"));
        if fresh {
            std::fs::write(&local, contents(len, 1_000_000 + k))?;
        }
        writeln!(cmds, "write {} /ferry-added/file-{k}", local.display())?;
        d.added_files += 1;
        d.added_bytes += len;
        k += 1;
    }
    if fresh {
        let cmd_file = staging.join("debugfs.cmds");
        std::fs::write(&cmd_file, &cmds)?;
        crate::setup::run(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&cmd_file)
                .arg(&source),
        )?;
        let fsck = Command::new("e2fsck").arg("-fn").arg(&source).output()?;
        if !fsck.status.success() {
            bail!(
                "the derived image does not check: {}",
                String::from_utf8_lossy(&fsck.stdout)
            );
        }
        std::fs::write(&stamp, &want)?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    let desc = format!(
        "ext4, {size_mib} MiB, `mkfs.ext4 -d {}` ({:.0} MiB of files; {:.0} MiB allocated)",
        src_dir.display(),
        n as f64 / 1048576.0,
        allocated_bytes(&template)? as f64 / 1048576.0
    );
    Ok((template, source, desc, d))
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Runs the dedup bench (see the module documentation).
pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    crate::setup::ensure(super::NEEDS)?;
    crate::setup::ensure(NEEDS)?;
    let runs = a.runs.unwrap_or(if a.quick { 1 } else { 3 });
    let size_mib = a.size_mib.unwrap_or(if a.quick { 256 } else { 1024 });
    let bin = procs::ferry_bin(true)?;
    let dir = target_dir().join("bench").join("dedup");
    std::fs::create_dir_all(&dir)?;
    let (template, source, desc, derived) = make_images(&dir, size_mib)?;
    let size = std::fs::metadata(&source)?.len();
    // The destination's index of its template, from a cold page cache.
    let index = dir.join("template.ferry-index");
    drop_page_cache(&template)?;
    let out = procs::output(
        Command::new(&bin)
            .args(["index", "build", "--json", "--out"])
            .arg(&index)
            .arg(&template),
    )?;
    let built: serde_json::Value = serde_json::from_str(&out).context("index build JSON")?;
    let build_rate = built["hash_bytes_per_sec"].as_f64().unwrap_or(0.0);
    let build_s = built["seconds"].as_f64().unwrap_or(0.0);
    eprintln!("bench: indexed the template: {}", out.trim());
    let started = chrono_now();
    let load_before = loadavg();
    let case = all_cases()
        .into_iter()
        .find(|c| c.id == "base")
        .expect("the base case");
    // Its own instance: a full bench may be running beside it.
    let wan = Wan::up("dedup", &case.link, &a.tcp_cc, true)?;
    let ctx = Ctx {
        a,
        bin: bin.clone(),
        dir: dir.clone(),
        ids: FerryIds::make(&bin, &dir)?,
        wan,
        link: case.link.clone(),
        logs: dir.join("logs"),
    };
    std::fs::create_dir_all(&ctx.logs)?;
    let img = Image {
        id: "derived".into(),
        probes: pick_probes(&source, size, a.probes + 1)?,
        alloc: allocated_bytes(&source)?,
        path: source.clone(),
        size,
        desc: desc.clone(),
    };
    let mut serve = start_ferry_serve(&ctx, &img)?;
    let systems: [(&str, Vec<String>); 2] = [
        ("ferry", Vec::new()),
        (
            "ferry --index",
            vec!["--index".into(), index.display().to_string()],
        ),
    ];
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(), Vec::new()];
    for run in 0..runs {
        for (i, (name, extra)) in systems.iter().enumerate() {
            drop_page_cache(&source)?;
            drop_page_cache(&template)?;
            let tag = if extra.is_empty() { "plain" } else { "index" };
            let stolen0 = super::steal::stolen_ms();
            let mut r = run_ferry(&ctx, &img, &mut serve, run, tag, extra)
                .with_context(|| format!("{name} run {}", run + 1))?;
            r.host_stolen_ms = super::steal::between(stolen0, super::steal::stolen_ms());
            eprintln!(
                "bench: dedup {name} run {}: whole disk {:.1} s, wire {:.1} MiB, filled locally {:.1} MiB, first read {} s",
                run + 1,
                r.t_complete,
                r.wire_bytes as f64 / 1048576.0,
                r.filled_local_bytes as f64 / 1048576.0,
                r.t_first.map(|t| format!("{t:.2}")).unwrap_or("-".into()),
            );
            results[i].push(r);
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    drop(serve);
    ctx.wan.down()?;

    let mut o = String::new();
    writeln!(o, "## Local fills from a content index (`--index`)\n")?;
    writeln!(
        o,
        "`cargo xtask bench --dedup{}`, {started}, ferry {} (release), {}; link {}; {runs} run(s) of each, interleaved, source page cache dropped before each.\n",
        if a.quick { " --quick" } else { "" },
        git_head(),
        machine(),
        case.link.describe()
    )?;
    writeln!(
        o,
        "Template at the destination: {desc}. Source: the template changed in place with `debugfs -w` ({}); {:.0} MiB allocated.\n",
        derived.summary(),
        img.alloc as f64 / 1048576.0
    )?;
    writeln!(
        o,
        "Index of the template (cold page cache): {:.1} s, {:.0} MB/s, {} records.\n",
        build_s,
        build_rate / 1e6,
        built["records"]
    )?;
    writeln!(
        o,
        "| | whole disk, s | on the wire, MiB | filled locally, MiB | first read, s | 4 KiB misses p50 / p99, ms |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|")?;
    let col = |rs: &[RunResult], f: &dyn Fn(&RunResult) -> f64, d: usize| {
        mmm(&rs.iter().map(f).collect::<Vec<_>>(), d)
    };
    for ((name, _), rs) in systems.iter().zip(&results) {
        let misses: Vec<f64> = rs.iter().flat_map(|r| r.probes_ms.clone()).collect();
        writeln!(
            o,
            "| {name} | {} | {} | {} | {} | {} / {} |",
            col(rs, &|r| r.t_complete, 1),
            col(rs, &|r| r.wire_bytes as f64 / 1048576.0, 0),
            col(rs, &|r| r.filled_local_bytes as f64 / 1048576.0, 0),
            col(rs, &|r| r.t_first.unwrap_or(f64::NAN), 2),
            percentile(&misses, 50.0)
                .map(|v| format!("{v:.0}"))
                .unwrap_or("–".into()),
            percentile(&misses, 99.0)
                .map(|v| format!("{v:.0}"))
                .unwrap_or("–".into()),
        )?;
    }
    let per_sys: std::collections::BTreeMap<String, Vec<RunResult>> = systems
        .iter()
        .zip(&results)
        .map(|((name, _), rs)| (name.to_string(), rs.clone()))
        .collect();
    writeln!(
        o,
        "\n{} Load average (1 min) {load_before} before, {} after: the machine was shared with other work.",
        super::steal_line(&per_sys),
        loadavg()
    )?;
    let med = |rs: &[RunResult], f: &dyn Fn(&RunResult) -> f64| {
        median(&rs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let wire = |r: &RunResult| r.wire_bytes as f64;
    let time = |r: &RunResult| r.t_complete;
    let (w0, w1) = (med(&results[0], &wire), med(&results[1], &wire));
    let (t0, t1) = (med(&results[0], &time), med(&results[1], &time));
    writeln!(
        o,
        "\nWith the index: {:.0}% fewer bytes on the wire, {:.0}% less whole-disk time (medians). Cells: median (min–max); misses are probes not answered within half an RTT.\n",
        (1.0 - w1 / w0) * 100.0,
        (1.0 - t1 / t0) * 100.0
    )?;
    let report = a
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    write_section(&report, "dedup", &o)?;
    let raw = json!({
        "started": started,
        "image": desc,
        "index_build": built,
        "runs": systems.iter().zip(&results).map(|((name, _), rs)| {
            json!({ "system": name, "runs": rs.iter().map(|r| {
                let mut v = r.to_json();
                v["filled_local_bytes"] = json!(r.filled_local_bytes);
                v
            }).collect::<Vec<_>>() })
        }).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("dedup.json"), serde_json::to_string_pretty(&raw)?)?;
    eprintln!("bench: wrote the dedup section of {}", report.display());
    Ok(())
}
