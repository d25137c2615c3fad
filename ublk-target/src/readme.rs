//! Keeps the README's option and status tables in step with the CLI and
//! the status struct: every visible option of `serve` and `pull` has a row,
//! every option named in a row exists (a hidden one only on a row that says
//! so), and the status table lists exactly `ferry status --json`'s fields.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::control::Status;

/// The README, read from the workspace root.
fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first cells of the table under the heading line `heading`.
fn first_cells(readme: &str, heading: &str) -> Vec<String> {
    let mut lines = readme.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "README has no heading {heading:?}");
    lines
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|row| {
            let row = row.trim_start_matches('|');
            // A cell may hold `a\|b`: split at the first unescaped bar.
            let mut end = row.len();
            let b = row.as_bytes();
            for i in 0..b.len() {
                if b[i] == b'|' && (i == 0 || b[i - 1] != b'\\') {
                    end = i;
                    break;
                }
            }
            row[..end].trim().to_string()
        })
        .collect()
}

/// The backquoted words of a cell, each cut at its first space
/// (`` `--disk PATH` `` → `--disk`).
fn code_words(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|w| w.split(' ').next().unwrap_or("").to_string())
        .collect()
}

/// Checks one subcommand's option table in `readme` against its clap
/// definition.
fn option_problems(readme: &str, sub: &str) -> Vec<String> {
    let cli = Cli::command();
    let cmd = cli.find_subcommand(sub).expect("subcommand");
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for cell in first_cells(readme, &format!("### `ferry {sub}`")) {
        for word in code_words(&cell) {
            let Some(long) = word.strip_prefix("--") else {
                problems.push(format!("row {cell:?}: {word:?} is not an option"));
                continue;
            };
            match cmd.get_arguments().find(|a| a.get_long() == Some(long)) {
                None => problems.push(format!("README names --{long}, which `ferry {sub}` lacks")),
                Some(a) if a.is_hide_set() && !cell.contains("(hidden)") => {
                    problems.push(format!("--{long} is hidden; its row must say (hidden)"))
                }
                Some(_) => {}
            }
            documented.insert(long.to_string());
        }
    }
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long() {
            if long != "help" && !documented.contains(long) {
                problems.push(format!("`ferry {sub} --{long}` has no row in the README"));
            }
        }
    }
    problems
}

#[test]
fn the_serve_table_lists_every_visible_option_of_serve() {
    let problems = option_problems(&readme(), "serve");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_pull_table_lists_every_visible_option_of_pull() {
    let problems = option_problems(&readme(), "pull");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_status_table_lists_exactly_the_json_fields() {
    // A pull of several disks adds its fields (`name`, `disks`).
    let several = Status {
        name: Some("a".into()),
        disks: vec![Status::default()],
        ..Status::default()
    };
    let json = serde_json::to_value(several).expect("status serializes");
    let fields: BTreeSet<String> = json
        .as_object()
        .expect("status is an object")
        .keys()
        .cloned()
        .collect();
    let documented: BTreeSet<String> = first_cells(&readme(), "### `ferry status --json`")
        .iter()
        .flat_map(|c| code_words(c))
        .collect();
    let missing: Vec<_> = fields.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&fields).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "fields without a README row: {missing:?}; README rows without a field: {stale:?}"
    );
}

#[test]
fn a_missing_row_a_stale_row_and_an_unmarked_hidden_option_are_caught() {
    let mut table = String::from("### `ferry serve`\n| option | meaning |\n|---|---|\n");
    let cli = Cli::command();
    for arg in cli.find_subcommand("serve").expect("serve").get_arguments() {
        match arg.get_long() {
            Some("disk") | Some("help") | None => {}
            Some(long) => table.push_str(&format!("| `--{long} X` | x |\n")),
        }
    }
    table.push_str("| `--no-such-option N` | x |\n\nafter\n");
    let problems = option_problems(&table, "serve");
    assert!(
        problems.iter().any(|p| p.contains("--disk` has no row")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("--no-such-option")),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("is hidden")),
        "serve's hidden test hook listed without (hidden): {problems:#?}"
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
}
