//! `ferry index build|update|stats`: the content index of local images
//! that `ferry pull --index` fills chunks from (see `ferry_index`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::control::emit;

#[derive(Args, Debug)]
pub(crate) struct IndexArgs {
    #[command(subcommand)]
    pub(crate) command: IndexCommand,
}

#[derive(Subcommand, Debug)]
pub(crate) enum IndexCommand {
    /// Hash every 64 KiB chunk of images or block devices into a new index
    /// (replacing any file at --out).
    Build(BuildArgs),
    /// Hash again the files of an index that changed since it was built
    /// (unchanged files are not read), drop those gone.
    Update(UpdateArgs),
    /// Show an index's files, records and size.
    Stats(StatsArgs),
}

#[derive(Args, Debug)]
pub(crate) struct BuildArgs {
    /// The index file to write (mode 0600, replaced atomically).
    #[arg(long, value_name = "INDEX")]
    pub(crate) out: PathBuf,
    /// Images or block devices to index (templates, other VM disks).
    #[arg(required = true, value_name = "PATH")]
    pub(crate) paths: Vec<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    /// The index file to update in place.
    #[arg(value_name = "INDEX")]
    pub(crate) index: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// The index file.
    #[arg(value_name = "INDEX")]
    pub(crate) index: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(args: IndexArgs) -> Result<()> {
    match args.command {
        IndexCommand::Build(a) => {
            let r = ferry_index::build(&a.out, &a.paths)
                .with_context(|| format!("cannot build index {}", a.out.display()))?;
            report(&r, a.json)
        }
        IndexCommand::Update(a) => {
            let r = ferry_index::update(&a.index)
                .with_context(|| format!("cannot update index {}", a.index.display()))?;
            report(&r, a.json)
        }
        IndexCommand::Stats(a) => {
            let index = ferry_index::Index::open(&a.index)?;
            let s = index.stats()?;
            if a.json {
                let files: Vec<_> = index
                    .files()
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "path": f.path.display().to_string(),
                            "size": f.identity.size,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "files": s.files,
                    "file_bytes": s.file_bytes,
                    "records": s.records,
                    "distinct_hashes": s.distinct_hashes,
                    "index_bytes": s.index_bytes,
                    "paths": files,
                });
                return emit(&format!("{v}\n"));
            }
            let mut out = format!(
                "{} files, {} bytes; {} records, {} distinct chunks; index {} bytes\n",
                s.files, s.file_bytes, s.records, s.distinct_hashes, s.index_bytes
            );
            for f in index.files() {
                out.push_str(&format!(
                    "  {} ({} bytes)\n",
                    f.path.display(),
                    f.identity.size
                ));
            }
            emit(&out)
        }
    }
}

fn report(r: &ferry_index::BuildReport, json: bool) -> Result<()> {
    let secs = r.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        r.bytes_hashed as f64 / secs
    } else {
        0.0
    };
    if json {
        let v = serde_json::json!({
            "files_hashed": r.files_hashed,
            "files_unchanged": r.files_unchanged,
            "files_gone": r.files_gone,
            "bytes_hashed": r.bytes_hashed,
            "records": r.records,
            "rewritten": r.rewritten,
            "seconds": secs,
            "hash_bytes_per_sec": rate,
        });
        return emit(&format!("{v}\n"));
    }
    emit(&format!(
        "{} files hashed ({} bytes in {:.3} s, {:.0} MB/s), {} unchanged, {} gone; {} records{}\n",
        r.files_hashed,
        r.bytes_hashed,
        secs,
        rate / 1e6,
        r.files_unchanged,
        r.files_gone,
        r.records,
        if r.rewritten { "" } else { "; index unchanged" }
    ))
}
