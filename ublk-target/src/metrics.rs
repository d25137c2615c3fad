//! `ferry pull --metrics ADDR:PORT`: the pull's figures in the Prometheus
//! text format (version 0.0.4, which `promtool check metrics` reads) on
//! `GET /metrics`, from a minimal HTTP/1.1 responder on tokio. The figures
//! are those of `ferry status --json` ([`ferry_pull::status::snapshot`])
//! and the shell's own telemetry (on-demand fetch times, guest stalls and
//! writes), read at each scrape: nothing is counted twice. The encoding is
//! the `prometheus` crate's (docs/decisions/metrics.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_pull::{Status, TelemetrySnapshot};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read (request line and headers); a scraper's is
/// a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8192;

/// Scrapes served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// How long a client may take to send its request, and to read the reply.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The phases of `ferry status` (`phase`).
const PHASES: [&str; 3] = ["copying", "complete", "error"];

/// The source states of `ferry status` (`source_state`).
const SOURCE_STATES: [&str; 5] = [
    "connecting",
    "connected",
    "reconnecting",
    "stopped",
    "released",
];

/// The verification results of `ferry status` (`verified`; `failed: why`
/// counts as `failed`).
const VERIFICATION: [&str; 5] = ["pending", "running", "refetching", "ok", "failed"];

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

fn counter_metric(v: f64, pairs: &[(&str, &str)]) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge_metric(v: f64, pairs: &[(&str, &str)]) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

/// A counter `name` (ending in `_total`) without labels.
fn counter(name: &str, help: &str, v: f64) -> MetricFamily {
    family(
        name,
        help,
        MetricType::COUNTER,
        vec![counter_metric(v, &[])],
    )
}

/// A gauge `name` without labels.
fn gauge(name: &str, help: &str, v: f64) -> MetricFamily {
    family(name, help, MetricType::GAUGE, vec![gauge_metric(v, &[])])
}

/// A state set as a gauge: one series per state, labelled `label`, 1 for
/// the state `now` and 0 for the others.
fn state_set(name: &str, help: &str, label: &str, states: &[&str], now: &str) -> MetricFamily {
    let metrics = states
        .iter()
        .map(|s| gauge_metric(f64::from(u8::from(*s == now)), &[(label, s)]))
        .collect();
    family(name, help, MetricType::GAUGE, metrics)
}

/// The on-demand fetch histogram.
fn histogram(name: &str, help: &str, h: &ferry_pull::telemetry::HistogramSnapshot) -> MetricFamily {
    let buckets = h
        .bounds
        .iter()
        .zip(&h.cumulative)
        .map(|(bound, n)| {
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(*n);
            b
        })
        .collect();
    let mut hist = Histogram::default();
    hist.set_sample_count(h.count);
    hist.set_sample_sum(h.sum_seconds);
    hist.set_bucket(buckets);
    let mut m = Metric::default();
    m.set_histogram(hist);
    family(name, help, MetricType::HISTOGRAM, vec![m])
}

/// The metric families of a pull whose status is `s`, whose shell counted
/// `t`, of a disk of `chunks` chunks.
pub(crate) fn families(s: &Status, t: &TelemetrySnapshot, chunks: u64) -> Vec<MetricFamily> {
    let b = |v: u64| v as f64;
    let verification = if s.verified.starts_with("failed") {
        "failed"
    } else {
        s.verified.as_str()
    };
    let mut f = vec![
        state_set(
            "ferry_pull_phase",
            "The migration's phase (1 for the current one), as ferry status shows it.",
            "phase",
            &PHASES,
            &s.phase,
        ),
        state_set(
            "ferry_pull_verification",
            "The verification against the source's hashes (1 for the current result).",
            "result",
            &VERIFICATION,
            verification,
        ),
        state_set(
            "ferry_pull_source_state",
            "The connection to the source (1 for the current state).",
            "state",
            &SOURCE_STATES,
            &s.source_state,
        ),
        gauge("ferry_pull_disk_bytes", "The disk's size.", b(s.total_bytes)),
        gauge(
            "ferry_pull_disk_chunks",
            "The disk's chunks (units of fetching and verification).",
            b(chunks),
        ),
        gauge(
            "ferry_pull_present_bytes",
            "Bytes present at the destination, zero chunks included.",
            b(s.present_bytes),
        ),
        gauge(
            "ferry_pull_present_at_start_bytes",
            "Bytes present when this run started.",
            b(s.present_at_start_bytes),
        ),
        gauge(
            "ferry_pull_source_data_bytes",
            "Bytes of the source's data chunks (0 until its manifest is in).",
            b(s.source_data_bytes),
        ),
        gauge(
            "ferry_pull_zero_skipped_bytes",
            "Bytes of the source's zero chunks, never fetched (0 until its manifest is in).",
            b(s.skipped_zero_bytes),
        ),
        family(
            "ferry_pull_fetched_bytes_total",
            "Bytes fetched from the source, by why: for guest requests (on_demand) or by the background copier.",
            MetricType::COUNTER,
            vec![
                counter_metric(b(s.fetched_on_demand_bytes), &[("kind", "on_demand")]),
                counter_metric(b(s.fetched_background_bytes), &[("kind", "background")]),
            ],
        ),
        counter(
            "ferry_pull_filled_local_bytes_total",
            "Bytes filled from local copies found through --index instead of fetched.",
            b(s.filled_local_bytes),
        ),
        counter(
            "ferry_pull_duplicate_bytes_total",
            "Bytes fetched twice (a background fetch overtaken by an on-demand one).",
            b(s.duplicate_bytes),
        ),
        counter(
            "ferry_pull_rejected_corrupt_bytes_total",
            "Bytes fetched but dropped for a hash mismatch.",
            b(s.rejected_corrupt_bytes),
        ),
        counter(
            "ferry_pull_discarded_guest_won_bytes_total",
            "Fetched bytes not written because the guest had written them.",
            b(s.discarded_guest_won_bytes),
        ),
        counter(
            "ferry_pull_guest_written_bytes_total",
            "Bytes the guest wrote, trimmed or zeroed.",
            b(t.guest_written_bytes),
        ),
        gauge(
            "ferry_pull_guest_written_chunks",
            "Chunks the guest wrote into (never compared with the source).",
            b(s.guest_written_chunks),
        ),
        histogram(
            "ferry_pull_on_demand_fetch_seconds",
            "On-demand fetches, from the request to the source until its last chunk arrived.",
            &t.on_demand_fetch,
        ),
        counter(
            "ferry_pull_guest_stall_seconds_total",
            "Time guest requests spent waiting for absent data, all together.",
            t.guest_stall_seconds,
        ),
        counter(
            "ferry_pull_guest_stalled_requests_total",
            "Guest requests that had to wait for absent data.",
            b(t.stalled_guest_requests),
        ),
        gauge(
            "ferry_pull_progress_rate_bytes_per_second",
            "Bytes made present per second over the last ~5 s (0 once the copy is finished).",
            b(s.rate_bytes_per_sec),
        ),
        gauge(
            "ferry_pull_background_rate_limit_bytes_per_second",
            "The background copy's rate limit (0: none).",
            b(s.rate_limit_bytes_per_sec),
        ),
        gauge(
            "ferry_pull_background_paused",
            "Whether the background copy is paused (1) or running (0).",
            f64::from(u8::from(s.background == "paused")),
        ),
        counter(
            "ferry_pull_wire_received_bytes_total",
            "Bytes received from the source on the wire (headers and retransmissions included).",
            b(s.wire_rx_bytes),
        ),
        counter(
            "ferry_pull_wire_sent_bytes_total",
            "Bytes sent to the source on the wire.",
            b(s.wire_tx_bytes),
        ),
        gauge(
            "ferry_pull_source_loss_ratio",
            "The source's lost packets per packet sent on the link, as it last reported.",
            f64::from(s.source_lost_ppm) / 1e6,
        ),
        counter(
            "ferry_pull_source_retransmitted_bytes_total",
            "Bytes the source declared lost on the link and sent again (real and spurious losses).",
            b(s.source_retransmitted_bytes),
        ),
        gauge(
            "ferry_pull_source_sent_packets",
            "Packets the source had sent on the current connection at its last report.",
            f64::from(s.source_sent_packets),
        ),
        counter(
            "ferry_pull_reconnects_total",
            "Successful reconnects to the source.",
            b(s.reconnects),
        ),
        counter(
            "ferry_pull_hedged_reads_total",
            "On-demand reads sent more than once (the path was lossy or not yet known).",
            b(s.hedged_reads),
        ),
        gauge(
            "ferry_pull_verified_chunks",
            "Chunks checked against the source's hashes.",
            b(s.verified_chunks),
        ),
        gauge(
            "ferry_pull_verify_refetched_chunks",
            "Chunks a failed verification found differing from the source and fetched again.",
            b(s.verify_refetched_chunks),
        ),
    ];
    if let Some(eta) = s.eta_seconds {
        f.push(gauge(
            "ferry_pull_eta_seconds",
            "Seconds until every byte is present at the current rate (only while copying).",
            b(eta),
        ));
    }
    f
}

/// The text of `GET /metrics`.
pub(crate) fn encode(s: &Status, t: &TelemetrySnapshot, chunks: u64) -> Result<String> {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families(s, t, chunks), &mut out)
        .context("cannot encode the metrics")?;
    String::from_utf8(out).context("the metrics encoder wrote bytes that are not UTF-8")
}

/// One disk of a pull of several, for [`encode_disks`]: its name, status,
/// telemetry and number of chunks.
pub(crate) struct DiskFigures {
    pub(crate) name: String,
    pub(crate) status: Status,
    pub(crate) telemetry: TelemetrySnapshot,
    pub(crate) chunks: u64,
}

/// The families of several disks: each disk's series labelled
/// `disk="NAME"`, one family per metric name (in the order first seen),
/// so `sum by (…)` gives the pull's totals.
pub(crate) fn disk_families(disks: &[DiskFigures]) -> Vec<MetricFamily> {
    let mut merged: Vec<MetricFamily> = Vec::new();
    for d in disks {
        for mut f in families(&d.status, &d.telemetry, d.chunks) {
            let mut metrics = f.take_metric();
            for m in &mut metrics {
                let mut l = labels(&[("disk", d.name.as_str())]);
                l.extend(m.take_label());
                m.set_label(l);
            }
            match merged.iter_mut().find(|g| g.name() == f.name()) {
                Some(g) => g.mut_metric().extend(metrics),
                None => {
                    f.set_metric(metrics);
                    merged.push(f);
                }
            }
        }
    }
    merged
}

/// The text of `GET /metrics` for a pull of several disks.
pub(crate) fn encode_disks(disks: &[DiskFigures]) -> Result<String> {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&disk_families(disks), &mut out)
        .context("cannot encode the metrics")?;
    String::from_utf8(out).context("the metrics encoder wrote bytes that are not UTF-8")
}

/// Binds the metrics listener at `addr` (`--metrics`).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for --metrics on {addr}"))
}

/// A reply: status line, content type, body.
fn reply(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        r.push_str("Allow: GET, HEAD\r\n");
    }
    r.push_str("\r\n");
    if !head_only {
        r.push_str(body);
    }
    r.into_bytes()
}

/// Reads one request head and answers it with `render`'s text for
/// `GET /metrics` (or `HEAD`), 404 for another path, 405 for another
/// method, 400 for what is not an HTTP request.
async fn answer(stream: &mut TcpStream, render: &(dyn Fn() -> Result<String> + Send + Sync)) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let complete = loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST_BYTES {
            break false;
        }
    };
    let text = "text/plain; charset=utf-8";
    let line = String::from_utf8_lossy(&head);
    let mut words = line.lines().next().unwrap_or("").split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    let r = match (complete, method, target, version) {
        (true, Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
            let path = t.split('?').next().unwrap_or(t);
            match (m, path) {
                ("GET" | "HEAD", "/metrics") => match render() {
                    Ok(body) => reply("200 OK", prometheus::TEXT_FORMAT, &body, m == "HEAD"),
                    Err(e) => {
                        tracing::warn!(error = %crate::logging::error_chain(&e), "cannot render the metrics");
                        reply(
                            "500 Internal Server Error",
                            text,
                            &format!("{}\n", crate::logging::error_chain(&e)),
                            m == "HEAD",
                        )
                    }
                },
                ("GET" | "HEAD", _) => reply("404 Not Found", text, "try /metrics\n", m == "HEAD"),
                _ => reply("405 Method Not Allowed", text, "GET or HEAD only\n", false),
            }
        }
        _ => reply("400 Bad Request", text, "not an HTTP/1 request\n", false),
    };
    let _ = stream.write_all(&r).await;
    let _ = stream.shutdown().await;
}

/// Answers scrapes on `listener` until the process ends: one request per
/// connection, at most [`MAX_CONNECTIONS`] at once, each given
/// [`IDLE_TIMEOUT`].
pub(crate) async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> Result<String> + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: back off, do not spin.
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(IDLE_TIMEOUT, answer(&mut stream, &*render)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            phase: "copying".into(),
            total_bytes: 4 << 20,
            present_bytes: 1 << 20,
            fetched_on_demand_bytes: 65536,
            fetched_background_bytes: 3 * 65536,
            duplicate_bytes: 65536,
            filled_local_bytes: 2 * 65536,
            skipped_zero_bytes: 2 << 20,
            source_state: "connected".into(),
            background: "running".into(),
            verified: "failed: cannot read".into(),
            source_lost_ppm: 12_500,
            source_retransmitted_bytes: 3000,
            reconnects: 2,
            eta_seconds: Some(7),
            ..Status::default()
        }
    }

    fn telemetry() -> TelemetrySnapshot {
        TelemetrySnapshot {
            on_demand_fetch: ferry_pull::telemetry::HistogramSnapshot {
                bounds: &ferry_pull::telemetry::ON_DEMAND_BOUNDS_SECONDS,
                cumulative: vec![0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2],
                count: 3,
                sum_seconds: 20.1,
            },
            guest_stall_seconds: 1.5,
            stalled_guest_requests: 4,
            guest_written_bytes: 8192,
        }
    }

    /// The sample line of `series` (its name and labels as printed).
    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{series} ")))
            .unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
        line[series.len() + 1..].parse().expect("a number")
    }

    #[test]
    fn the_status_figures_are_encoded_with_their_types() {
        let text = encode(&status(), &telemetry(), 64).unwrap();
        assert!(text.contains("# TYPE ferry_pull_fetched_bytes_total counter\n"));
        assert!(text.contains("# TYPE ferry_pull_phase gauge\n"));
        assert!(text.contains("# TYPE ferry_pull_on_demand_fetch_seconds histogram\n"));
        assert_eq!(
            sample(&text, r#"ferry_pull_fetched_bytes_total{kind="on_demand"}"#),
            65536.0
        );
        assert_eq!(
            sample(
                &text,
                r#"ferry_pull_fetched_bytes_total{kind="background"}"#
            ),
            196608.0
        );
        assert_eq!(sample(&text, "ferry_pull_duplicate_bytes_total"), 65536.0);
        assert_eq!(
            sample(&text, "ferry_pull_source_retransmitted_bytes_total"),
            3000.0
        );
        assert_eq!(
            sample(&text, "ferry_pull_filled_local_bytes_total"),
            2.0 * 65536.0
        );
        assert_eq!(sample(&text, "ferry_pull_zero_skipped_bytes"), 2097152.0);
        assert_eq!(
            sample(&text, "ferry_pull_guest_written_bytes_total"),
            8192.0
        );
        assert_eq!(sample(&text, "ferry_pull_present_bytes"), 1048576.0);
        assert_eq!(sample(&text, "ferry_pull_disk_bytes"), 4194304.0);
        assert_eq!(sample(&text, "ferry_pull_disk_chunks"), 64.0);
        assert_eq!(sample(&text, "ferry_pull_source_loss_ratio"), 0.0125);
        assert_eq!(sample(&text, "ferry_pull_reconnects_total"), 2.0);
        assert_eq!(sample(&text, "ferry_pull_guest_stall_seconds_total"), 1.5);
        assert_eq!(
            sample(&text, "ferry_pull_guest_stalled_requests_total"),
            4.0
        );
        assert_eq!(sample(&text, "ferry_pull_eta_seconds"), 7.0);
        // One series per state, 1 for the current one.
        assert_eq!(sample(&text, r#"ferry_pull_phase{phase="copying"}"#), 1.0);
        assert_eq!(sample(&text, r#"ferry_pull_phase{phase="complete"}"#), 0.0);
        assert_eq!(sample(&text, r#"ferry_pull_phase{phase="error"}"#), 0.0);
        assert_eq!(
            sample(&text, r#"ferry_pull_source_state{state="connected"}"#),
            1.0
        );
        // "failed: why" is the state "failed".
        assert_eq!(
            sample(&text, r#"ferry_pull_verification{result="failed"}"#),
            1.0
        );
        assert_eq!(
            sample(&text, r#"ferry_pull_verification{result="ok"}"#),
            0.0
        );
        // The histogram: cumulative buckets, +Inf holds every observation.
        assert_eq!(
            sample(
                &text,
                r#"ferry_pull_on_demand_fetch_seconds_bucket{le="0.05"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                r#"ferry_pull_on_demand_fetch_seconds_bucket{le="+Inf"}"#
            ),
            3.0
        );
        assert_eq!(
            sample(&text, "ferry_pull_on_demand_fetch_seconds_count"),
            3.0
        );
        assert_eq!(
            sample(&text, "ferry_pull_on_demand_fetch_seconds_sum"),
            20.1
        );
    }

    #[test]
    fn a_finished_pull_has_no_eta_series() {
        let s = Status {
            phase: "complete".into(),
            eta_seconds: None,
            ..status()
        };
        let text = encode(&s, &telemetry(), 64).unwrap();
        assert!(!text.contains("ferry_pull_eta_seconds"), "{text}");
        assert_eq!(sample(&text, r#"ferry_pull_phase{phase="complete"}"#), 1.0);
    }

    /// Sends `request` to a responder serving "x 1\n" and returns the reply.
    async fn exchange(request: &[u8]) -> String {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(|| Ok("x 1\n".to_string()))));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(30), c.read_to_string(&mut out))
            .await
            .expect("a reply in time")
            .unwrap();
        server.abort();
        out
    }

    #[tokio::test]
    async fn the_responder_serves_metrics_and_refuses_the_rest() {
        let ok = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 4\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        let head = exchange(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let other = exchange(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        let post = exchange(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
        let junk = exchange(b"hello\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
    }
}
