//! Log lines on stderr and the final error line: plain text (colour only
//! when stderr is a terminal, so journald and pipes get no escape codes)
//! or one JSON object per line (`--log-format json`), and an error's chain
//! printed with each cause once.

use std::io::IsTerminal;

/// How log lines are written (`ferry --log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Lines for people, colour only on a terminal.
    Text,
    /// One JSON object per line: timestamp, level, message, fields, the
    /// innermost span (`span`) and all of them from the outermost (`spans`).
    Json,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`),
/// lines to stderr in `format`.
pub(crate) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour_on_stderr()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            // Every span from the outermost: a line of an NBD connection
            // names its disk (the pull's span) as well as its client.
            .with_span_list(true)
            .init(),
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` is set
/// (<https://no-color.org>).
fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The error and its causes, `outer: inner: innermost`, leaving out a
/// cause whose text is already there: many errors print their source in
/// their own message, so `{:#}` would repeat e.g. `(os error 98)`.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Prints the error that ends the command: `ferry: error: …` on stderr,
/// or as a JSON log line with `--log-format json`.
pub(crate) fn report_error(format: LogFormat, e: &anyhow::Error) {
    let text = error_chain(e);
    match format {
        LogFormat::Text => eprintln!("ferry: error: {text}"),
        LogFormat::Json => tracing::error!("{text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that, like many, prints its source in its own message.
    #[derive(Debug)]
    struct Bind {
        addr: &'static str,
        source: std::io::Error,
    }

    impl std::fmt::Display for Bind {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot bind {}: {}", self.addr, self.source)
        }
    }

    impl std::error::Error for Bind {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(98);
        let e = anyhow::Error::new(Bind {
            addr: "127.0.0.1:7700",
            source: io,
        })
        .context("cannot start the server");
        let text = error_chain(&e);
        assert_eq!(text.matches("(os error 98)").count(), 1, "{text}");
        assert!(text.starts_with("cannot start the server: cannot bind 127.0.0.1:7700: "));
        // Causes that add something are all kept, in order.
        let e = anyhow::anyhow!("innermost")
            .context("middle")
            .context("outer");
        assert_eq!(error_chain(&e), "outer: middle: innermost");
    }
}
