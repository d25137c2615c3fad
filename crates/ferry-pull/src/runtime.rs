//! Runtime changes to the background copy (`ferry background
//! pause|resume|rate=`), kept across restarts: each is recorded in the
//! state file (durably) before it takes effect and is acknowledged, and a
//! restart applies what was recorded unless the command line changed since
//! (see [`at_start`] and `docs/decisions/runtime-settings-persist.md`).

use std::io;
use std::sync::Arc;

use ferry_store::{RuntimeSetting, RuntimeSettings, StateFile};

use crate::copier::CopierSettings;
use crate::disk::Disk;
use crate::fetcher::Fetcher;
use crate::lifecycle::{now_unix, utc};
use crate::shell::Shell;

/// The background copy's settings as this run's command line gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLine {
    /// `--hold-background`.
    pub hold_background: bool,
    /// `--rate` (0 when not given: unlimited).
    pub rate: u64,
}

/// What a start does with the recorded runtime settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtStart {
    /// Whether the background copy starts held back.
    pub paused: bool,
    /// The rate limit it starts with, bytes per second (0: none).
    pub rate: u64,
    /// The settings to keep recorded: without those the command line
    /// replaced. `Some` when they differ from what was recorded.
    pub record: Option<RuntimeSettings>,
    /// One line for the log per setting taken from the record, or replaced
    /// by the command line.
    pub notes: Vec<String>,
}

/// The rule at start: a setting changed at runtime stays in force while
/// the command line gives the same value as when it was changed (e.g. a
/// systemd unit restarted with its unchanged `--rate`); a command line
/// with another value is the operator's newer decision, and replaces it
/// (the record of it is dropped).
pub fn at_start(recorded: RuntimeSettings, cmd: CommandLine) -> AtStart {
    let mut out = AtStart {
        paused: cmd.hold_background,
        rate: cmd.rate,
        record: None,
        notes: Vec::new(),
    };
    let mut keep = recorded;
    if let Some(p) = recorded.paused {
        let what = if p.value { "paused" } else { "resumed" };
        if p.command_line == cmd.hold_background {
            out.paused = p.value;
            out.notes.push(format!(
                "background {} (set at runtime on {}; it stays so across restarts while \
                 --hold-background is {} as then; `ferry background {}` changes it)",
                if p.value { "paused" } else { "running" },
                utc(p.set_at_unix),
                if cmd.hold_background {
                    "given"
                } else {
                    "absent"
                },
                if p.value { "resume" } else { "pause" },
            ));
        } else {
            keep.paused = None;
            out.notes.push(format!(
                "background {} as --hold-background says: it changed since the background \
                 was {what} at runtime on {}, which no longer applies",
                if cmd.hold_background {
                    "paused"
                } else {
                    "running"
                },
                utc(p.set_at_unix)
            ));
        }
    }
    if let Some(r) = recorded.rate {
        if r.command_line == cmd.rate {
            out.rate = r.value;
            out.notes.push(format!(
                "background rate {} (set at runtime on {}; it stays so across restarts while \
                 --rate is {} as then; `ferry background rate=RATE` changes it)",
                shown_rate(r.value),
                utc(r.set_at_unix),
                shown_rate(cmd.rate)
            ));
        } else {
            keep.rate = None;
            out.notes.push(format!(
                "background rate {} as --rate says: it changed since the rate was set to {} at \
                 runtime on {}, which no longer applies",
                shown_rate(cmd.rate),
                shown_rate(r.value),
                utc(r.set_at_unix)
            ));
        }
    }
    if keep != recorded {
        out.record = Some(keep);
    }
    out
}

/// A rate for the log: `unlimited` for 0.
fn shown_rate(r: u64) -> String {
    if r == 0 {
        "unlimited".into()
    } else {
        ferry_core::units::Rate(r).to_string()
    }
}

/// A change asked for at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `pause` (true) or `resume` (false).
    Paused(bool),
    /// `rate=`: bytes per second, 0 unlimited.
    Rate(u64),
}

/// Records `change` durably in the state file (written and synced), then
/// applies it: when this returns `Ok` a restart keeps it. On error nothing
/// changed. Changes are serialised by the caller (one at a time), so the
/// record and what runs agree.
pub async fn change<F: Fetcher, D: Disk>(
    shell: &Arc<Shell<F, D, StateFile>>,
    settings: &CopierSettings,
    cmd: CommandLine,
    change: Change,
) -> io::Result<()> {
    let state = shell.state.clone();
    let now = now_unix();
    D::offload(move || {
        let mut state = state.lock().expect("state lock");
        let mut s = state.runtime_settings();
        match change {
            Change::Paused(value) => {
                s.paused = Some(RuntimeSetting {
                    value,
                    set_at_unix: now,
                    command_line: cmd.hold_background,
                })
            }
            Change::Rate(value) => {
                s.rate = Some(RuntimeSetting {
                    value,
                    set_at_unix: now,
                    command_line: cmd.rate,
                })
            }
        }
        state.record_runtime_settings(s).map_err(io::Error::other)
    })
    .await?;
    match change {
        Change::Paused(p) => crate::status::set_background_paused(shell, p),
        Change::Rate(r) => crate::status::set_rate_limit(settings, r),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 1_796_601_600; // 2026-12-07 00:00:00 UTC

    fn cmd(hold_background: bool, rate: u64) -> CommandLine {
        CommandLine {
            hold_background,
            rate,
        }
    }

    fn recorded(paused: bool, hold: bool, rate: u64, cmd_rate: u64) -> RuntimeSettings {
        RuntimeSettings {
            paused: Some(RuntimeSetting {
                value: paused,
                set_at_unix: AT,
                command_line: hold,
            }),
            rate: Some(RuntimeSetting {
                value: rate,
                set_at_unix: AT + 61,
                command_line: cmd_rate,
            }),
        }
    }

    #[test]
    fn nothing_recorded_is_the_command_line() {
        let s = at_start(RuntimeSettings::default(), cmd(true, 7));
        assert_eq!(
            s,
            AtStart {
                paused: true,
                rate: 7,
                record: None,
                notes: vec![]
            }
        );
    }

    #[test]
    fn the_record_wins_over_an_unchanged_command_line() {
        let r = recorded(true, false, 50_000_000, 16_000_000);
        let s = at_start(r, cmd(false, 16_000_000));
        assert!(s.paused);
        assert_eq!(s.rate, 50_000_000);
        assert_eq!(s.record, None);
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        assert!(
            s.notes[0].starts_with("background paused (set at runtime on 2026-12-07 00:00:00 UTC"),
            "{}",
            s.notes[0]
        );
        assert!(
            s.notes[1].starts_with(&format!(
                "background rate {} (set at runtime on 2026-12-07 00:01:01 UTC",
                ferry_core::units::Rate(50_000_000)
            )),
            "{}",
            s.notes[1]
        );
        // Resumed at runtime after a start with --hold-background, which the
        // unit still passes: running.
        let s = at_start(recorded(false, true, 0, 0), cmd(true, 0));
        assert!(!s.paused);
        assert_eq!(s.rate, 0);
    }

    #[test]
    fn a_changed_command_line_wins_and_the_record_of_it_goes() {
        let r = recorded(true, false, 50_000_000, 16_000_000);
        let s = at_start(r, cmd(true, 8_000_000));
        assert!(s.paused);
        assert_eq!(s.rate, 8_000_000);
        assert_eq!(s.record, Some(RuntimeSettings::default()));
        assert!(s.notes[1].contains("as --rate says"), "{}", s.notes[1]);
        // Only the rate changed: the pause stays recorded and in force.
        let s = at_start(r, cmd(false, 0));
        assert!(s.paused);
        assert_eq!(s.rate, 0);
        assert_eq!(s.record, Some(RuntimeSettings { rate: None, ..r }));
    }
}
