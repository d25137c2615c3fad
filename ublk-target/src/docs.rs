//! `ferry generate-docs`: the man pages and shell completions, made from
//! the CLI's own clap `Command` so they never drift from what ferry takes.
//! The packaging step (`cargo xtask dist`) runs it on the binary it ships.
//!
//! Hidden subcommands and options (test hooks, this command itself) are
//! left out of both: clap_mangen skips them, clap_complete does not, so
//! the pages and completions are made from a copy without them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// The shells completions are written for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `cmd` without its hidden arguments and subcommands (recursively), with
/// what the pages and completions show of it kept.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string())
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set())
        .disable_version_flag(cmd.is_disable_version_flag_set());
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_string());
    }
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    if let Some(a) = cmd.get_long_about() {
        out = out.long_about(a.clone());
    }
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        out = out.arg(arg.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(visible(sub));
    }
    out
}

/// The CLI as its pages and completions show it.
pub(crate) fn documented_command() -> clap::Command {
    visible(&Cli::command())
}

/// Writes the page of `cmd` (built) and of each of its subcommands, named
/// as their display names (`ferry-pull.1`), into `dir`.
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands() {
        write_pages(sub, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .source(format!("ferry {}", env!("CARGO_PKG_VERSION")))
        .manual("ferry manual");
    written.push(page.generate_to(dir)?);
    Ok(())
}

/// Writes `man/ferry.1` and `man/ferry-SUBCOMMAND.1` for each subcommand,
/// and `completions/` for bash, zsh and fish, under `out` (created if
/// missing). Returns the files written.
pub(crate) fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cmd = documented_command();
    let mut written = Vec::new();
    let mut pages = cmd.clone().disable_help_subcommand(true);
    pages.build();
    write_pages(&pages, &man, &mut written)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in SHELLS {
        let mut cmd = cmd.clone();
        let path = clap_complete::generate_to(shell, &mut cmd, "ferry", &completions)
            .with_context(|| {
                format!("writing {shell} completions into {}", completions.display())
            })?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[PathBuf], root: &Path) -> Vec<String> {
        files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn a_page_per_visible_subcommand_and_completions_for_three_shells() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        // Nested subcommands (`ferry index build`) have pages of their own.
        fn pages(cmd: &clap::Command, name: &str, out: &mut Vec<String>) {
            out.push(format!("man/{name}.1"));
            for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                pages(s, &format!("{name}-{}", s.get_name()), out);
            }
        }
        let mut want = Vec::new();
        pages(&Cli::command(), "ferry", &mut want);
        assert!(want.contains(&"man/ferry-index-update.1".to_string()));
        want.extend(["_ferry", "ferry.bash", "ferry.fish"].map(|c| format!("completions/{c}")));
        want.sort();
        assert_eq!(names(&files, dir.path()), want);
        assert!(want.contains(&"man/ferry-pull.1".to_string()));
    }

    #[test]
    fn the_pull_page_lists_every_visible_option_and_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/ferry-pull.1")).unwrap();
        let cli = Cli::command();
        let pull = cli.find_subcommand("pull").unwrap();
        let mut hidden = 0;
        for arg in pull.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // roff escapes each '-' of an option as "\-".
            let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
            if arg.is_hide_set() {
                hidden += 1;
                assert!(!page.contains(&roff), "hidden --{long} is on the page");
            } else {
                assert!(page.contains(&roff), "--{long} is not on the page");
            }
        }
        assert!(hidden > 0, "pull has test hooks, hidden from the page");
        assert!(
            page.contains(".TH ferry-pull 1"),
            "{}",
            &page[..200.min(page.len())]
        );
    }

    #[test]
    fn completions_offer_subcommands_and_options_but_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        for c in ["ferry.bash", "_ferry", "ferry.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(c)).unwrap();
            for word in [
                "pull",
                "serve",
                "absent-timeout-secs",
                "background-read-kib",
            ] {
                assert!(text.contains(word), "{c} lacks {word}");
            }
            for hidden in ["generate-docs", "inject-corrupt-chunk", "ublk-no-user-copy"] {
                assert!(!text.contains(hidden), "{c} offers hidden {hidden}");
            }
        }
    }
}
