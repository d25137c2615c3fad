//! The control socket of a running pull: `ferry status` and
//! `ferry background` talk to it. One request line in, one JSON line out.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_core::ControlRequest;
pub(crate) use ferry_pull::Status;

use crate::cli::{BackgroundArgs, StatusArgs};

/// Sends one request line and returns the reply line.
pub(crate) fn request(control: &Path, line: &str) -> Result<String> {
    let mut s = UnixStream::connect(control).with_context(|| {
        format!(
            "cannot reach a running `ferry pull` at control socket {}",
            control.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.is_empty() {
        bail!("the pull closed the control connection without a reply");
    }
    Ok(reply)
}

fn human(b: u64) -> String {
    ferry_core::units::Bytes(b).to_string()
}

/// Appends one formatted line to a `String`.
macro_rules! outln {
    ($o:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = writeln!($o, $($arg)*);
    }};
}

/// Writes `text` to stdout. A reader that went away (`ferry status |
/// head`) is no error: the output was not wanted any more.
pub(crate) fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// `ferry status` found the pull stopped by an error (its reason): the
/// command exits with [`PullStopped::EXIT_CODE`] after printing the status,
/// so scripts notice.
#[derive(Debug)]
pub(crate) struct PullStopped(pub(crate) String);

impl PullStopped {
    /// Exit code of `ferry status` for a pull in phase `error` (1 is any
    /// other failure, e.g. no pull at the control socket).
    pub(crate) const EXIT_CODE: u8 = 2;
}

impl std::fmt::Display for PullStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the pull stopped with an error: {}", self.0)
    }
}

impl std::error::Error for PullStopped {}

pub(crate) fn status_command(a: &StatusArgs) -> Result<()> {
    if a.wait || a.watch {
        return crate::watch::run(a);
    }
    if a.timeout_secs.is_some() {
        bail!("--timeout-secs is for --wait or --watch");
    }
    let reply = request(&a.control, &ControlRequest::Status.to_string())?;
    let s: Status = serde_json::from_str(&reply).context("malformed status reply")?;
    if a.json {
        emit(&reply)?;
    } else {
        emit(&human_status(&s))?;
    }
    if s.phase == "error" {
        return Err(PullStopped(s.error.unwrap_or_default()).into());
    }
    Ok(())
}

/// `ferry status` without `--json`.
pub(crate) fn human_status(s: &Status) -> String {
    let mut o = String::new();
    let pct = if s.total_bytes == 0 {
        100.0
    } else {
        s.present_bytes as f64 * 100.0 / s.total_bytes as f64
    };
    outln!(o, "phase:       {}", s.phase);
    if let Some(e) = &s.error {
        outln!(o, "error:       {e}");
    }
    match (s.precopy.as_deref(), s.switchover_ms) {
        (Some("switched"), Some(ms)) => outln!(
            o,
            "pre-copy:    switched over in {ms:.1} ms (generation {})",
            s.precopy_generation.unwrap_or(0)
        ),
        (Some(p), _) => outln!(
            o,
            "pre-copy:    {p}, the source's changes applied up to generation {}{}",
            s.precopy_generation.unwrap_or(0),
            if p == "copying" {
                "; nothing served until `ferry switchover`"
            } else {
                ""
            }
        ),
        (None, _) => {}
    }
    outln!(
        o,
        "present:     {} of {} ({pct:.1}%)",
        human(s.present_bytes),
        human(s.total_bytes)
    );
    outln!(
        o,
        "fetched:     {} on demand, {} in background; {} skipped as zero",
        human(s.fetched_on_demand_bytes),
        human(s.fetched_background_bytes),
        human(s.skipped_zero_bytes)
    );
    if s.filled_local_bytes > 0 || s.local_stale_chunks > 0 {
        outln!(
            o,
            "local:       {} filled from local copies (--index); {} stale chunks fetched",
            human(s.filled_local_bytes),
            s.local_stale_chunks
        );
    }
    outln!(o, "on the wire: {} received", human(s.wire_rx_bytes));
    // A finished or failed pull moves no data: no rate, no ETA.
    if !crate::watch::finished(s) {
        outln!(
            o,
            "rate:        {}, ETA {}",
            ferry_core::units::Rate(s.rate_bytes_per_sec),
            crate::watch::eta(s)
        );
    }
    let limit = match s.rate_limit_bytes_per_sec {
        0 => String::new(),
        r => format!(", limited to {}", ferry_core::units::Rate(r)),
    };
    outln!(o,
        "source:      {} ({} reconnects; it reports {:.3}% of its packets lost, {} on-demand reads hedged); background {}{limit}",
        s.source_state,
        s.reconnects,
        f64::from(s.source_lost_ppm) / 1e4,
        s.hedged_reads,
        s.background
    );
    if let Some(uri) = &s.nbd_uri {
        let how = if s.nbd_tls {
            "TLS, client certificates required"
        } else {
            "no TLS"
        };
        outln!(o, "nbd:         {uri} ({how})");
    }
    outln!(
        o,
        "verified:    {} ({} chunks; {} fetched again after a mismatch)",
        s.verified,
        s.verified_chunks,
        s.verify_refetched_chunks
    );
    if s.committed {
        outln!(o, "committed:   yes: the source is no longer needed");
    }
    o
}

/// `ferry switchover`: one control call; prints the pull's answer (with
/// `switchover_ms`, freeze to serving) and fails if it refused.
pub(crate) fn switchover_command(a: &crate::cli::SwitchoverArgs) -> Result<()> {
    let reply = request(&a.control, &ControlRequest::Switchover.to_string())?;
    emit(&reply)?;
    let answer: serde_json::Value =
        serde_json::from_str(&reply).context("malformed control reply")?;
    if answer["ok"] == false {
        bail!(
            "the pull refused the switchover: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}

pub(crate) fn background_command(a: &BackgroundArgs) -> Result<()> {
    let req = match a.action.as_str() {
        "pause" => ControlRequest::Pause,
        "resume" => ControlRequest::Resume,
        r if r.starts_with("rate=") => {
            let v = crate::cli::parse_rate(&r[5..]).map_err(anyhow::Error::msg)?;
            ControlRequest::Rate(v)
        }
        other => bail!(
            "unknown action {other:?}: use pause, resume or rate=RATE (bytes per second, \
             or e.g. 50M, 50MiB, 100Mbit)"
        ),
    };
    let line = req.to_string();
    let reply = request(&a.control, &line)?;
    emit(&reply)?;
    // A refusal (e.g. an absurd rate) fails the command.
    let answer: serde_json::Value =
        serde_json::from_str(&reply).context("malformed control reply")?;
    if answer["ok"] == false {
        bail!(
            "the pull refused {line:?}: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}
