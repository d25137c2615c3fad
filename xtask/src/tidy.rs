//! Tree checks run as ordinary tests (`cargo test -p xtask`, part of
//! `cargo xtask ci`): every Rust module says what it is for, every
//! `unsafe` block carries a SAFETY comment, crates without kernel
//! interfaces forbid unsafe code, nothing is left ignored or stubbed,
//! nothing refers to files outside the repository, and no library crate
//! depends on the transport or the binary.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    rust_files(&p, out);
                }
            } else if name.ends_with(".rs") {
                out.push(p);
            }
        }
    }

    fn sources() -> Vec<(PathBuf, String)> {
        let root = crate::setup::workspace_root();
        let mut files = Vec::new();
        for d in [
            "crates",
            "transport",
            "ublk-target",
            "xtask",
            "tests",
            "fuzz",
        ] {
            rust_files(&root.join(d), &mut files);
        }
        assert!(
            files.len() > 20,
            "tidy found too few files: {}",
            files.len()
        );
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("read source");
                (p, text)
            })
            .collect()
    }

    #[test]
    fn every_module_starts_with_a_doc_comment() {
        let bad: Vec<String> = sources()
            .into_iter()
            .filter(|(_, t)| !t.trim_start().starts_with("//!"))
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert!(bad.is_empty(), "modules without a //! line: {bad:?}");
    }

    #[test]
    fn every_unsafe_block_has_a_safety_comment() {
        let mut bad = Vec::new();
        for (p, t) in sources() {
            let lines: Vec<&str> = t.lines().collect();
            for (i, l) in lines.iter().enumerate() {
                let code = l.split("//").next().unwrap_or("");
                let block = concat!("unsafe", " {");
                let imp = concat!("unsafe", " impl");
                if code.contains(block) || code.trim_start().starts_with(imp) {
                    let window = &lines[i.saturating_sub(8)..i];
                    if !window.iter().any(|w| w.contains("SAFETY:")) {
                        bad.push(format!("{}:{}", p.display(), i + 1));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "unsafe without a SAFETY comment: {bad:?}");
    }

    /// Library crates forbid unsafe code, except the two that need a kernel
    /// interface: they deny it and allow it only in the one module named
    /// here.
    const UNSAFE_MODULES: [(&str, &str); 3] = [
        // borrowing libublk's /dev/ublkcN descriptor (user copy)
        (
            "crates/ferry-ublk/src/lib.rs",
            "crates/ferry-ublk/src/cdev.rs",
        ),
        // the device's file mapped for mincore (page-cache residency)
        (
            "crates/ferry-ublk/src/lib.rs",
            "crates/ferry-ublk/src/pagecache.rs",
        ),
        // the backing file's read-only mapping, a pwrite source
        (
            "crates/ferry-store/src/lib.rs",
            "crates/ferry-store/src/mapping.rs",
        ),
    ];

    #[test]
    fn library_crates_forbid_unsafe_code() {
        let root = crate::setup::workspace_root();
        for lib in [
            "crates/ferry-core/src/lib.rs",
            "crates/ferry-device/src/lib.rs",
            "crates/ferry-nbd/src/lib.rs",
            "crates/ferry-pull/src/lib.rs",
            "transport/src/lib.rs",
        ] {
            let t = std::fs::read_to_string(root.join(lib)).expect("read lib.rs");
            assert!(
                t.contains("#![forbid(unsafe_code)]"),
                "{lib} does not forbid unsafe code"
            );
        }
        for (lib, _) in UNSAFE_MODULES {
            let t = std::fs::read_to_string(root.join(lib)).expect("read lib.rs");
            assert!(
                t.contains("#![deny(unsafe_code)]"),
                "{lib} does not deny unsafe code"
            );
        }
    }

    #[test]
    fn unsafe_code_is_allowed_only_in_the_named_modules() {
        let root = crate::setup::workspace_root();
        let allowed: Vec<PathBuf> = UNSAFE_MODULES.iter().map(|(_, m)| root.join(m)).collect();
        let needle = concat!("allow(", "unsafe_code)");
        let mut bad = Vec::new();
        for (p, t) in sources() {
            if t.contains(needle) && !allowed.contains(&p) {
                bad.push(p.display().to_string());
            }
        }
        assert!(
            bad.is_empty(),
            "unsafe code allowed outside {UNSAFE_MODULES:?}: {bad:?}"
        );
        for m in &allowed {
            let t = std::fs::read_to_string(m).expect("read module");
            assert!(
                t.contains(needle),
                "{} no longer needs unsafe: drop it from the list",
                m.display()
            );
        }
    }

    #[test]
    fn no_ignored_tests_or_stubs() {
        let needles = [
            concat!("#[", "ignore]"),
            concat!("todo", "!("),
            concat!("unimplemented", "!("),
        ];
        let mut bad = Vec::new();
        for (p, t) in sources() {
            for n in needles {
                if t.contains(n) {
                    bad.push(format!("{}: {n}", p.display()));
                }
            }
        }
        assert!(bad.is_empty(), "placeholders: {bad:?}");
    }

    /// Text files of the repository a reader sees (docs, code, scripts,
    /// units), without build output, fuzz corpora and git's own files.
    fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if !matches!(name, "target" | "corpus" | "artifacts") && !name.starts_with('.') {
                    text_files(&p, out);
                }
            } else if [".rs", ".md", ".sh", ".toml", ".service", ".json", ".txt"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                out.push(p);
            }
        }
    }

    #[test]
    fn nothing_refers_to_files_outside_the_repository() {
        let root = crate::setup::workspace_root();
        let mut files = Vec::new();
        text_files(&root, &mut files);
        assert!(files.len() > 50, "too few files: {}", files.len());
        // Spelled in pieces so this file does not match itself.
        let needles = [
            concat!("../", "shared"),
            concat!("shared/", "notes"),
            concat!("shared/", "seeds"),
            concat!("/", "work/"),
        ];
        let mut bad = Vec::new();
        for p in files {
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            for n in needles {
                if text.contains(n) {
                    bad.push(format!("{}: {n}", p.display()));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "references outside the repository: {bad:#?}"
        );
    }

    #[test]
    fn library_crates_depend_on_neither_the_transport_nor_the_binary() {
        let root = crate::setup::workspace_root();
        let mut bad = Vec::new();
        let mut seen = 0;
        for e in std::fs::read_dir(root.join("crates"))
            .expect("crates/")
            .flatten()
        {
            let manifest = e.path().join("Cargo.toml");
            let Ok(text) = std::fs::read_to_string(&manifest) else {
                continue;
            };
            seen += 1;
            for line in text.lines().map(str::trim) {
                let dep = line.split(['=', ' ', '.']).next().unwrap_or("");
                if matches!(dep, "ferry-transport" | "ferry")
                    || line.contains("\"../../transport\"")
                {
                    bad.push(format!("{}: {line}", manifest.display()));
                }
            }
        }
        assert!(seen >= 5, "found {seen} crates under crates/");
        assert!(bad.is_empty(), "library crates reaching up: {bad:#?}");
    }
}
