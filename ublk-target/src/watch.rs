//! `ferry status --wait` and `ferry status --watch`: poll a pull's control
//! socket until the pull is complete and verified, stopped by an error, or
//! a timeout passes; `--watch` shows the progress meanwhile (a live bar on
//! a terminal, a plain line every 2 s otherwise). A pull that restarts
//! meanwhile (its control socket gone for a while) is reached again.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_core::units::{Bytes, Rate, Seconds};
use ferry_core::ControlRequest;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::StatusArgs;
use crate::control::{emit, human_status, request, PullStopped, Status};

/// Consecutive failed attempts to reach a pull that answered before (one
/// a second) before `--wait`/`--watch` give up: time for a restart under
/// systemd (`Restart=on-failure`, a few seconds) with margin.
const RECONNECT_ATTEMPTS: u32 = 60;

/// `ferry status --wait`/`--watch` gave up after `--timeout-secs`: exits
/// with [`TimedOut::EXIT_CODE`].
#[derive(Debug)]
pub(crate) struct TimedOut {
    secs: u64,
    last: Option<String>,
}

impl TimedOut {
    /// Exit code of `ferry status --wait`/`--watch` at the timeout.
    pub(crate) const EXIT_CODE: u8 = 3;
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timed out after {} s (--timeout-secs) before the pull was complete and verified",
            self.secs
        )?;
        if let Some(last) = &self.last {
            write!(f, "; last seen: {last}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TimedOut {}

/// Whether the pull has stopped moving data: complete (verifying or
/// verified) or stopped by an error. Its rate and ETA then mean nothing
/// and are not shown.
pub(crate) fn finished(s: &Status) -> bool {
    s.phase == "complete" || s.phase == "error"
}

/// How the wait ends, if `s` ends it: complete and verified, or stopped.
fn outcome(s: &Status) -> Option<Result<(), PullStopped>> {
    if s.phase == "error" {
        return Some(Err(PullStopped(s.error.clone().unwrap_or_default())));
    }
    // `failed`, or `failed: why` when the disk could not be read.
    if s.verified.starts_with("failed") {
        return Some(Err(PullStopped(format!(
            "the verification against the source {} ({} chunks fetched again)",
            s.verified, s.verify_refetched_chunks
        ))));
    }
    (s.phase == "complete" && s.verified == "ok").then_some(Ok(()))
}

/// One line of progress: phase, sizes, rate and ETA (while copying),
/// source and verification.
pub(crate) fn progress_line(s: &Status) -> String {
    let pct = if s.total_bytes == 0 {
        100.0
    } else {
        s.present_bytes as f64 * 100.0 / s.total_bytes as f64
    };
    let mut line = format!(
        "{} {pct:.1}%: {} of {}",
        s.phase,
        Bytes(s.present_bytes),
        Bytes(s.total_bytes)
    );
    if !finished(s) {
        line.push_str(&format!(", {}, ETA {}", Rate(s.rate_bytes_per_sec), eta(s)));
    }
    line.push_str(&format!(
        "; source {}, background {}, verified {}",
        s.source_state, s.background, s.verified
    ));
    if let Some(e) = &s.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// The ETA as people read it (`-` while unknown).
pub(crate) fn eta(s: &Status) -> String {
    s.eta_seconds
        .map(|e| Seconds(e).to_string())
        .unwrap_or_else(|| "-".into())
}

/// What shows the progress.
enum View {
    /// `--wait`: nothing until the end.
    Quiet,
    /// `--watch` on a terminal.
    Bar(ProgressBar),
    /// `--watch` into a pipe or journald: a line per poll.
    Lines,
}

impl View {
    fn new(watch: bool) -> Self {
        if !watch {
            return View::Quiet;
        }
        if !std::io::stdout().is_terminal() {
            return View::Lines;
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
        // The message is cut to the terminal's width, the bar is not.
        let style = ProgressStyle::with_template("[{bar:30.cyan/blue}] {percent:>3}% {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        View::Bar(bar)
    }

    /// How often the pull is asked.
    fn period(&self) -> Duration {
        match self {
            View::Bar(_) => Duration::from_millis(500),
            View::Quiet | View::Lines => Duration::from_secs(2),
        }
    }

    fn show(&self, s: &Status) -> Result<()> {
        match self {
            View::Quiet => Ok(()),
            View::Bar(bar) => {
                bar.set_length(s.total_bytes);
                bar.set_position(s.present_bytes);
                bar.set_message(bar_message(s));
                Ok(())
            }
            View::Lines => emit(&format!("{}\n", progress_line(s))),
        }
    }

    /// A message beside the progress (reconnecting), on stderr.
    fn note(&self, text: &str) {
        match self {
            View::Bar(bar) => bar.suspend(|| eprintln!("ferry: {text}")),
            View::Quiet | View::Lines => eprintln!("ferry: {text}"),
        }
    }

    /// Leaves the bar as it last was (ended or given up), and the cursor
    /// on the next line.
    fn end(&self) {
        if let View::Bar(bar) = self {
            bar.abandon();
            // Best effort: the bar is on a terminal, the lines after it
            // would only start beside it.
            let _ = emit("\n");
        }
    }
}

/// The bar's message, most wanted first (a narrow terminal cuts the
/// end): sizes, then rate and ETA while copying, the phase (or the
/// verification once complete) and the source.
fn bar_message(s: &Status) -> String {
    let mut m = format!("{}/{}", Bytes(s.present_bytes), Bytes(s.total_bytes));
    if !finished(s) {
        m.push_str(&format!(" {} ETA {}", Rate(s.rate_bytes_per_sec), eta(s)));
    }
    if s.phase == "complete" {
        m.push_str(&format!(", complete, verified {}", s.verified));
    } else {
        m.push_str(&format!(", {}", s.phase));
    }
    m.push_str(&format!(", source {}", s.source_state));
    m
}

/// Asks the pull at `a.control` for its status until the wait ends.
pub(crate) fn run(a: &StatusArgs) -> Result<()> {
    let t0 = Instant::now();
    let deadline = a.timeout_secs.map(|t| t0 + Duration::from_secs(t));
    let view = View::new(a.watch);
    let mut last: Option<Status> = None;
    let mut failures = 0u32;
    loop {
        match ask(a) {
            Ok((reply, s)) => {
                if failures > 0 {
                    view.note(&format!(
                        "reached the pull at {} again",
                        a.control.display()
                    ));
                    failures = 0;
                }
                view.show(&s)?;
                if let Some(end) = outcome(&s) {
                    view.end();
                    if !a.watch {
                        emit(&if a.json { reply } else { human_status(&s) })?;
                    }
                    return end.map_err(Into::into);
                }
                last = Some(s);
            }
            // Not there at all at the start: nothing to wait for.
            Err(e) if last.is_none() => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > RECONNECT_ATTEMPTS {
                    view.end();
                    return Err(e.context(format!(
                        "gave up reaching the pull again after {RECONNECT_ATTEMPTS} attempts \
                         (one a second)"
                    )));
                }
                view.note(&format!(
                    "the pull does not answer ({}); it may be restarting: trying again, \
                     attempt {failures} of {RECONNECT_ATTEMPTS}",
                    crate::logging::error_chain(&e)
                ));
            }
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d {
                view.end();
                return Err(TimedOut {
                    secs: a.timeout_secs.unwrap_or(0),
                    last: last.as_ref().map(progress_line),
                }
                .into());
            }
        }
        let period = if failures > 0 {
            Duration::from_secs(1)
        } else {
            view.period()
        };
        let nap = deadline.map_or(period, |d| period.min(d.saturating_duration_since(now)));
        std::thread::sleep(nap);
    }
}

/// One status request: the reply line and its parsed form.
fn ask(a: &StatusArgs) -> Result<(String, Status)> {
    let reply = request(&a.control, &ControlRequest::Status.to_string())?;
    let s = serde_json::from_str(&reply).context("malformed status reply")?;
    Ok((reply, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str, verified: &str) -> Status {
        Status {
            phase: phase.into(),
            verified: verified.into(),
            total_bytes: 4 << 20,
            present_bytes: 3 << 20,
            rate_bytes_per_sec: 5 << 20,
            eta_seconds: Some(1),
            source_state: "connected".into(),
            background: "running".into(),
            ..Status::default()
        }
    }

    #[test]
    fn the_wait_ends_on_verified_error_or_failed_verification() {
        assert!(outcome(&status("copying", "pending")).is_none());
        assert!(outcome(&status("complete", "running")).is_none());
        assert!(matches!(outcome(&status("complete", "ok")), Some(Ok(()))));
        assert!(matches!(outcome(&status("error", "pending")), Some(Err(_))));
        assert!(matches!(
            outcome(&status("complete", "failed")),
            Some(Err(_))
        ));
        let Some(Err(e)) = outcome(&status("complete", "failed: cannot read the disk")) else {
            panic!("a verification that could not read the disk ends the wait");
        };
        assert!(e.to_string().contains("cannot read the disk"), "{e}");
    }

    #[test]
    fn rate_and_eta_only_while_copying() {
        let copying = progress_line(&status("copying", "pending"));
        assert!(copying.contains("5.0 MiB/s, ETA 1 s"), "{copying}");
        assert!(copying.contains("3.0 MiB of 4.0 MiB"), "{copying}");
        for phase in ["complete", "error"] {
            let s = status(phase, "ok");
            for text in [progress_line(&s), bar_message(&s), human_status(&s)] {
                assert!(!text.contains("MiB/s"), "{phase}: {text}");
                assert!(!text.contains("ETA"), "{phase}: {text}");
            }
        }
    }
}
