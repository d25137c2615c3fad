//! The protocol `/init` speaks on the serial console, and its parser.
//!
//! Lines (anywhere in a console line, since kernel messages may interleave):
//! - `FERRY-BOOT <uptime>`: `/init` started.
//! - `FERRY-MODULE OK <name>` / `FERRY-MODULE FAIL <name>: <reason>`.
//! - `FERRY-SCRIPT <file>`: `/init` starts the next check script.
//! - `FERRY-CHECK PASS <name>` / `FERRY-CHECK FAIL <name>: <reason>`.
//! - `FERRY-BENCH key=value ...`: one measurement (`cargo xtask vm-bench`).
//! - `FERRY-DONE`: the check scripts finished; `/init` powers off next.

/// What one VM run reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// `/init` started.
    pub(crate) booted: bool,
    /// Names of modules that loaded.
    pub(crate) modules_loaded: Vec<String>,
    /// Modules that failed to load, with the reason.
    pub(crate) modules_failed: Vec<(String, String)>,
    /// Names of checks that passed.
    pub(crate) passed: Vec<String>,
    /// Checks that failed, with the reason.
    pub(crate) failed: Vec<(String, String)>,
    /// `FERRY-BENCH` lines, without the prefix.
    pub(crate) bench: Vec<String>,
    /// The check scripts ran to their end.
    pub(crate) done: bool,
}

/// An event on one console line, if it carries one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Boot,
    ModuleOk(String),
    ModuleFail(String, String),
    Pass(String),
    Fail(String, String),
    Script(String),
    Bench(String),
    Done,
}

/// Parses one console line.
pub(crate) fn parse_line(line: &str) -> Option<Event> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.find("FERRY-")?;
    let rest = &line[at..];
    let name_reason = |s: &str| -> (String, String) {
        match s.split_once(": ") {
            Some((name, reason)) => (name.trim().to_string(), reason.trim().to_string()),
            None => (s.trim().to_string(), String::new()),
        }
    };
    if rest.starts_with("FERRY-BOOT") {
        Some(Event::Boot)
    } else if rest.trim_end() == "FERRY-DONE" {
        Some(Event::Done)
    } else if let Some(s) = rest.strip_prefix("FERRY-CHECK PASS ") {
        Some(Event::Pass(s.trim().to_string()))
    } else if let Some(s) = rest.strip_prefix("FERRY-CHECK FAIL ") {
        let (name, reason) = name_reason(s);
        Some(Event::Fail(name, reason))
    } else if let Some(s) = rest.strip_prefix("FERRY-SCRIPT ") {
        Some(Event::Script(s.trim().to_string()))
    } else if let Some(s) = rest.strip_prefix("FERRY-BENCH ") {
        Some(Event::Bench(s.trim().to_string()))
    } else if let Some(s) = rest.strip_prefix("FERRY-MODULE OK ") {
        Some(Event::ModuleOk(s.trim().to_string()))
    } else if let Some(s) = rest.strip_prefix("FERRY-MODULE FAIL ") {
        let (name, reason) = name_reason(s);
        Some(Event::ModuleFail(name, reason))
    } else {
        None
    }
}

impl Report {
    /// Records one console line.
    pub(crate) fn feed(&mut self, line: &str) -> Option<Event> {
        let event = parse_line(line)?;
        match &event {
            Event::Boot => self.booted = true,
            Event::ModuleOk(name) => self.modules_loaded.push(name.clone()),
            Event::ModuleFail(name, reason) => {
                self.modules_failed.push((name.clone(), reason.clone()))
            }
            Event::Pass(name) => self.passed.push(name.clone()),
            Event::Fail(name, reason) => self.failed.push((name.clone(), reason.clone())),
            Event::Bench(line) => self.bench.push(line.clone()),
            Event::Script(_) => {}
            Event::Done => self.done = true,
        }
        Some(event)
    }

    /// Parses a whole console log.
    #[cfg(test)]
    pub(crate) fn parse(log: &str) -> Self {
        let mut report = Report::default();
        for line in log.lines() {
            report.feed(line);
        }
        report
    }

    /// Why this run failed, if it did: every reason, one per entry.
    pub(crate) fn problems(&self, required_modules: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.booted {
            problems.push("the VM did not boot to /init (no FERRY-BOOT line)".to_string());
            return problems;
        }
        for (name, reason) in &self.modules_failed {
            problems.push(format!("kernel module {name} failed to load: {reason}"));
        }
        for name in required_modules {
            let failed = self.modules_failed.iter().any(|(n, _)| n == name);
            if !failed && !self.modules_loaded.iter().any(|n| n == name) {
                problems.push(format!("kernel module {name} was never loaded"));
            }
        }
        for (name, reason) in &self.failed {
            problems.push(format!("check {name} failed: {reason}"));
        }
        if !self.done {
            problems.push(
                "the check script did not finish (no FERRY-DONE): crash, hang or timeout"
                    .to_string(),
            );
        }
        if self.done && self.passed.is_empty() && self.failed.is_empty() {
            problems.push("the check script ran no check".to_string());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
[    0.000000] Linux version 6.12\r
FERRY-BOOT 4.21\r
FERRY-MODULE OK ublk_drv\r
FERRY-CHECK PASS ublk-driver\r
[   12.1] ublkb0: detected capacity change\r
FERRY-CHECK PASS odirect-readback\r
FERRY-DONE\r
";

    #[test]
    fn a_clean_run_has_no_problems() {
        let r = Report::parse(GOOD);
        assert!(r.booted && r.done);
        assert_eq!(r.passed, ["ublk-driver", "odirect-readback"]);
        assert!(
            r.problems(&["ublk_drv"]).is_empty(),
            "{:?}",
            r.problems(&["ublk_drv"])
        );
    }

    #[test]
    fn failures_keep_their_reason() {
        let log = format!("{GOOD}FERRY-CHECK FAIL mkfs: exit 1: mkfs.ext4: no space\n");
        let r = Report::parse(&log);
        assert_eq!(
            r.failed,
            [(
                "mkfs".to_string(),
                "exit 1: mkfs.ext4: no space".to_string()
            )]
        );
        assert_eq!(r.problems(&[]).len(), 1);
    }

    #[test]
    fn interleaved_kernel_text_does_not_hide_a_line() {
        assert_eq!(
            parse_line("[ 3.2] random: crng initFERRY-CHECK PASS x\r"),
            Some(Event::Pass("x".into()))
        );
    }

    #[test]
    fn missing_done_boot_or_module_is_a_problem() {
        let r = Report::parse("FERRY-BOOT 1\nFERRY-CHECK PASS a\n");
        assert!(r.problems(&[])[0].contains("FERRY-DONE"));
        let r = Report::parse("Kernel panic\n");
        assert!(r.problems(&[])[0].contains("did not boot"));
        let r =
            Report::parse("FERRY-BOOT 1\nFERRY-MODULE FAIL ublk_drv: insmod: bad\nFERRY-DONE\n");
        let p = r.problems(&["ublk_drv"]);
        assert!(
            p.iter().any(|p| p.contains("ublk_drv failed to load")),
            "{p:?}"
        );
        let r = Report::parse("FERRY-BOOT 1\nFERRY-CHECK PASS a\nFERRY-DONE\n");
        assert!(r.problems(&["ublk_drv"])[0].contains("never loaded"));
    }

    #[test]
    fn scripts_and_bench_lines_are_recognised() {
        let r = Report::parse(
            "FERRY-BOOT 1\nFERRY-SCRIPT 01-checks-ublk.sh\r\nFERRY-BENCH dev=ublk iops=12\r\n",
        );
        assert_eq!(r.bench, ["dev=ublk iops=12"]);
        assert_eq!(
            parse_line("FERRY-SCRIPT 02-checks-ferry.sh\r"),
            Some(Event::Script("02-checks-ferry.sh".into()))
        );
    }

    #[test]
    fn a_script_that_checks_nothing_fails() {
        let r = Report::parse("FERRY-BOOT 1\nFERRY-DONE\n");
        assert!(r.problems(&[])[0].contains("no check"));
    }
}
