//! Command-line interface: one struct per subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ferry moves a live virtual-machine disk from one host to another over a
/// WAN: the destination serves the disk at once and fetches what it lacks.
#[derive(Parser, Debug)]
#[command(name = "ferry", version)]
pub(crate) struct Cli {
    /// Log lines on stderr as `text` (colour only on a terminal) or `json`
    /// (one object per line, for log pipelines).
    #[arg(long, global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub(crate) log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

// Parsed once at start: the size of the largest variant (pull's) costs
// nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Make a self-signed identity (certificate and key) and print its fingerprint.
    Keygen(KeygenArgs),
    /// Print the fingerprint of an identity.
    Fingerprint(FingerprintArgs),
    /// Export a disk read-only over QUIC (run at the source).
    Serve(ServeArgs),
    /// Present a source's disk locally at once and copy it (run at the destination).
    Pull(PullArgs),
    /// Show a running pull's progress.
    Status(StatusArgs),
    /// Switch a pre-copying pull over (`ferry pull --precopy`), when the VM
    /// is paused at the source: the source freezes its disk and sends what
    /// changed last; the destination starts serving.
    Switchover(SwitchoverArgs),
    /// Hold back, release or rate-limit a running pull's background copy.
    Background(BackgroundArgs),
    /// Stop a migration: the source remains the truth; the guest's writes
    /// made at the destination are kept aside, to apply or discard.
    Abort(crate::verbs::AbortArgs),
    /// Record that a verified copy no longer needs its source.
    #[command(visible_alias = "release")]
    Commit(crate::verbs::CommitArgs),
    /// List the migrations running on this host and their phases.
    List(crate::verbs::ListArgs),
    /// Apply guest writes kept by `ferry abort` to an image (the source's).
    ApplyWrites(crate::verbs::ApplyWritesArgs),
    /// Build, update or inspect a content index of local images, for
    /// `ferry pull --index`.
    Index(crate::index::IndexArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs(GenerateDocsArgs),
}

#[derive(Args, Debug)]
pub(crate) struct GenerateDocsArgs {
    /// Directory to write man/ and completions/ into (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Identity directory to write cert.der and key.der into (created if
    /// missing; an existing identity is never overwritten).
    #[arg(long = "identity", alias = "dir", value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct FingerprintArgs {
    /// Identity directory made by `ferry keygen`.
    #[arg(long)]
    pub(crate) identity: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Disk image or block device to export (opened read-only). Several
    /// disks of one VM on one port: `--disk NAME=PATH` for each (NAME: 1
    /// to 63 lower-case letters, digits and '-'); a destination names
    /// the disk it pulls (`ferry pull --disk NAME=PATH`).
    #[arg(
        long = "disk",
        id = "disk",
        value_name = "[NAME=]PATH",
        required_unless_present = "nbd_source",
        conflicts_with = "nbd_source"
    )]
    pub(crate) disks: Vec<PathBuf>,
    /// The one disk (the only `--disk`), set by `serve::run`.
    #[arg(skip)]
    pub(crate) disk: Option<PathBuf>,
    /// Export a VM's disk read through its QEMU's (or
    /// qemu-storage-daemon's) NBD export instead of a file:
    /// nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT. Without
    /// --live the VM must be paused: with --qmp, ferry adds a dirty bitmap
    /// to the export's node before it maps the disk, and once the bitmap
    /// shows a write it sends nothing more (the pull fails with
    /// SourceChanged).
    #[arg(long, value_name = "URI", requires = "qmp")]
    pub(crate) nbd_source: Option<String>,
    /// With --nbd-source: the VM runs and keeps writing (a live source):
    /// ferry records its writes in dirty-bitmap generations (a pre-copy
    /// round every second) so a destination can pre-copy (`ferry pull
    /// --precopy`, then `ferry switchover` once the VM is paused; a pull
    /// without --precopy is refused until then). At the switchover the
    /// VM must be paused: a VM that QMP reports running is refused, and a
    /// write after the final round stops the source (SourceChanged).
    #[arg(long, requires = "nbd_source")]
    pub(crate) live: bool,
    /// The QMP monitor socket of the QEMU that serves --nbd-source.
    #[arg(long, value_name = "SOCKET", requires = "nbd_source")]
    pub(crate) qmp: Option<PathBuf>,
    /// The block node behind --nbd-source (its node-name). Default: the
    /// node of the block export whose id is the URI's export name.
    #[arg(long, value_name = "NODE", requires = "nbd_source")]
    pub(crate) nbd_node: Option<String>,
    /// UDP address to listen on, e.g. 0.0.0.0:7700, or HOST:PORT (the
    /// first address the name resolves to at start).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub(crate) listen: SocketAddr,
    /// Our identity directory (from `ferry keygen`).
    #[arg(long)]
    pub(crate) identity: PathBuf,
    /// Fingerprint of a destination allowed to connect (repeatable).
    #[arg(long = "trust-peer", required = true)]
    pub(crate) trust_peer: Vec<String>,
    /// Where to cache the manifest (chunk hashes); "none" to not cache.
    /// Default: beside the disk, as DISK.ferry-manifest.
    #[arg(long, conflicts_with = "nbd_source")]
    pub(crate) hash_cache: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) link: LinkArgs,
    /// Send chunks as they are, without zstd compression.
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// Background-copy reads at the source's disk at once (1 to 8). One
    /// keeps a guest's on-demand read behind at most one background read
    /// on a disk that serves its queue in turn; a source on flash with
    /// deep queues may read faster with more. On-demand reads are never
    /// bounded by it.
    #[arg(long, default_value_t = ferry_transport::server::BACKGROUND_DISK_READS,
          value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=8), usize::from))]
    pub(crate) background_disk_reads: usize,
    /// Largest background-copy read at the source's disk, in KiB (64 to
    /// 16384, rounded down to whole 64 KiB chunks): consecutive data
    /// chunks of a request are read in one go up to this size.
    #[arg(long, default_value_t = ferry_transport::server::BACKGROUND_READ_BYTES / 1024,
          value_parser = clap::value_parser!(u64).range(64..=16384))]
    pub(crate) background_read_kib: u64,
    /// Test hook: flip a byte in the first transmission of this chunk.
    #[arg(long, hide = true)]
    pub(crate) inject_corrupt_chunk: Vec<u64>,
    /// Also serve the disk read-write to the running source VM over NBD at
    /// unix:PATH (owner-only socket): ferry records every write, so a
    /// destination can pre-copy while the VM runs (`ferry pull
    /// --precopy`, then `ferry switchover`). The hash cache is not used.
    #[arg(long, value_name = "unix:PATH", conflicts_with = "nbd_source")]
    pub(crate) present: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct PullArgs {
    /// Source address (where `ferry serve` listens): IP:PORT, [IPV6]:PORT
    /// or HOST:PORT (looked up at each connection attempt, reconnects
    /// included). Needed unless the state file says the copy is complete
    /// and verified. A resumed pull serves its disk first and reaches the
    /// source in the background.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) source: Option<ferry_transport::ServerAddr>,
    /// Local backing file for the disk (created sparse, or resumed), or a
    /// block device at least the source's size (an LVM volume, a LUN:
    /// opened exclusively, never resized; taken fresh it is zeroed first).
    /// Several disks of one VM in one pull: `--disk NAME=PATH` for each,
    /// pulled from the source's disk NAME (`ferry serve --disk
    /// NAME=PATH`), sharing one background budget (--rate, --window);
    /// each is served at --nbd unix:DIR as DIR/NAME.sock.
    #[arg(
        long = "disk",
        id = "disk",
        value_name = "[NAME=]PATH",
        required = true
    )]
    pub(crate) disks: Vec<PathBuf>,
    /// The one disk (the only `--disk`), set by `pull::run`.
    #[arg(skip)]
    pub(crate) disk: PathBuf,
    /// Persistent block map; default DISK.ferry-state (needed when --disk
    /// is a block device).
    #[arg(long)]
    pub(crate) state: Option<PathBuf>,
    /// Serve the disk over NBD at unix:PATH (or at ADDR:PORT over TCP,
    /// which needs --nbd-tls-dir or --nbd-tcp-insecure).
    #[arg(long)]
    pub(crate) nbd: Option<String>,
    /// Require TLS of every NBD client (NBD_OPT_STARTTLS, X.509; on a unix
    /// socket too), with the credentials in DIR laid out as for qemu's
    /// tls-creds-x509,endpoint=server: ca-cert.pem, server-cert.pem and
    /// server-key.pem (not accessible to other users). Clients must present
    /// a certificate signed by ca-cert.pem (qemu: tls-creds-x509 with
    /// endpoint=client and client-cert.pem, client-key.pem).
    #[arg(
        long,
        value_name = "DIR",
        requires = "nbd",
        conflicts_with = "nbd_tcp_insecure"
    )]
    pub(crate) nbd_tls_dir: Option<PathBuf>,
    /// Allow --nbd ADDR:PORT without TLS: NBD over TCP then has no
    /// authentication and no encryption, so anyone who can reach the port
    /// can read and write the disk. Use a unix socket unless the hypervisor
    /// is on another host, and --nbd-tls-dir if it is.
    #[arg(long)]
    pub(crate) nbd_tcp_insecure: bool,
    /// Give this group (name or number, e.g. the hypervisor's libvirt-qemu)
    /// access: the NBD and control sockets become 0660 and the disk and
    /// state files 0660, all of that group. Default: owner only (0600).
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Present the disk as /dev/ublkbN through the kernel's ublk driver.
    #[arg(long)]
    pub(crate) ublk: bool,
    /// ublk device id (N in /dev/ublkbN). If that device exists, left by a
    /// crashed `ferry pull`, it is re-attached (user recovery) and the
    /// requests it had in flight are served again.
    #[arg(long)]
    pub(crate) ublk_id: Option<u32>,
    /// ublk queues (one thread each).
    #[arg(long, default_value_t = 1)]
    pub(crate) queues: u16,
    /// ublk queue depth.
    #[arg(long, default_value_t = 64)]
    pub(crate) depth: u16,
    /// Serve ublk requests through per-tag buffers (two copies per read)
    /// even when the driver has UBLK_F_USER_COPY; for tests of that path.
    #[arg(long, hide = true)]
    pub(crate) ublk_no_user_copy: bool,
    /// NBD export name.
    #[arg(long, default_value = "ferry")]
    pub(crate) export_name: String,
    /// Control socket (for `ferry status` and `ferry background`).
    #[arg(long)]
    pub(crate) control: PathBuf,
    /// Our identity directory (from `ferry keygen`).
    #[arg(long)]
    pub(crate) identity: PathBuf,
    /// Fingerprint of the source's certificate (needed with --source).
    #[arg(long = "trust-peer")]
    pub(crate) trust_peer: Option<String>,
    /// Start with the background copy held back (release it with
    /// `ferry background --control PATH resume`).
    #[arg(long)]
    pub(crate) hold_background: bool,
    /// Test hook: a fresh disk's creation fsyncs fail, this many ms after
    /// they begin.
    #[arg(long, hide = true)]
    pub(crate) inject_creation_sync_failure_ms: Option<u64>,
    /// Background copy rate limit in bytes per second, with or without a
    /// unit: 50M (10^6), 50MiB (2^20), 100Mbit (bits); 0: none; at most
    /// 1 TiB/s.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_rate)]
    pub(crate) rate: u64,
    /// Chunks per background request.
    #[arg(long, default_value_t = 16)]
    pub(crate) batch_chunks: u32,
    /// Background requests in flight, counted in bytes as that many full
    /// requests (smaller ones, between present chunks, fill the same
    /// bytes; at most 128 requests). Default: enough for four times the
    /// link's bandwidth-delay product (from --link-mbit and --link-rtt-ms)
    /// on the wire, by the compression seen so far (4 to 128 requests), so
    /// that compressible data still fills the link; QUIC's connection
    /// windows (8x BDP) leave room for on-demand reads.
    #[arg(long)]
    pub(crate) window: Option<usize>,
    /// Persist the block map once this many fetched bytes are unsynced
    /// (bytes, or with a unit: 32MiB, 64M).
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    pub(crate) sync_bytes: u64,
    /// Give up connecting to the source at start after this many seconds
    /// (a fresh pull, which learns the disk's geometry from the source;
    /// a resumed one keeps trying in the background).
    #[arg(
        long = "connect-timeout-secs",
        alias = "connect-timeout",
        value_name = "N",
        default_value_t = 10
    )]
    pub(crate) connect_timeout: u64,
    /// Fail a guest request (EIO) that has waited this many seconds for
    /// absent data, e.g. while the source is unreachable. Default: wait
    /// until the source answers.
    #[arg(long)]
    pub(crate) absent_timeout_secs: Option<u64>,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT (GET /metrics):
    /// bytes by kind, on-demand fetch times, guest stalls, the link, the
    /// phase and the verification. No authentication: keep it on loopback
    /// or a management network. Default: no listener.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<SocketAddr>,
    /// A content index of local images (`ferry index build`); repeatable.
    /// Chunks whose source hash is in one are filled from the local file
    /// (read, hash checked) instead of fetched; copies that changed since
    /// indexing are fetched.
    #[arg(long, value_name = "INDEX")]
    pub(crate) index: Vec<PathBuf>,
    /// Exit (status 0) once the copy is complete and verified and no NBD
    /// client is connected, instead of serving on; exit 2 if it stops on an
    /// error or fails verification. It does not commit: `ferry commit
    /// --disk` does, later. Not with --ublk.
    #[arg(long)]
    pub(crate) exit_when_complete: bool,
    /// If the migration of this disk was aborted (`ferry abort`), discard
    /// the disk and its state file and pull afresh (the guest's writes kept
    /// by the abort stay where they are). No effect otherwise.
    #[arg(long)]
    pub(crate) start_over: bool,
    /// Pre-copy from a live source (`ferry serve --present`, or
    /// `--nbd-source` with `--live`): copy while
    /// the source VM runs, fetching again what it writes, and serve
    /// nothing until `ferry switchover --control PATH`: the --nbd socket
    /// is bound then; a --ublk device is added at once but fails every
    /// request until then.
    #[arg(long)]
    pub(crate) precopy: bool,
    #[command(flatten)]
    pub(crate) link: LinkArgs,
}

#[derive(Args, Debug)]
pub(crate) struct SwitchoverArgs {
    /// Control socket of the pull.
    #[arg(long)]
    pub(crate) control: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Control socket of the pull.
    #[arg(long)]
    pub(crate) control: PathBuf,
    /// Print JSON (fields documented in the README).
    #[arg(long, conflicts_with = "watch")]
    pub(crate) json: bool,
    /// Wait until the pull is complete and verified (exit 0), stopped by
    /// an error or failed verification (exit 2), or --timeout-secs passed
    /// (exit 3); then print the status. Reconnects if the pull restarts.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Show progress until the pull ends, as --wait: a live bar on a
    /// terminal, a plain line every 2 s otherwise (pipes, journald).
    #[arg(long, conflicts_with = "wait")]
    pub(crate) watch: bool,
    /// Give up --wait or --watch after this many seconds (exit 3).
    #[arg(long, value_name = "N")]
    pub(crate) timeout_secs: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct BackgroundArgs {
    /// Control socket of the pull.
    #[arg(long)]
    pub(crate) control: PathBuf,
    /// pause, resume, or rate=RATE: bytes per second, or with a unit
    /// (rate=50M, rate=50MiB, rate=100Mbit; 0 = unlimited).
    pub(crate) action: String,
}

/// Several `--disk NAME=PATH` values as (NAME, PATH), each NAME valid
/// ([`ferry_transport::tls::valid_disk_name`]) and given once.
pub(crate) fn named_disks(disks: &[PathBuf]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for d in disks {
        let s = d.to_str().unwrap_or_default();
        let Some((name, path)) = s.split_once('=') else {
            anyhow::bail!(
                "--disk {}: with several disks, each is NAME=PATH",
                d.display()
            );
        };
        if !ferry_transport::tls::valid_disk_name(name) {
            anyhow::bail!(
                "--disk {s}: a disk's name is 1 to {} lower-case letters, digits and '-' (not \
                 at either end)",
                ferry_transport::tls::MAX_DISK_NAME
            );
        }
        if path.is_empty() {
            anyhow::bail!("--disk {s}: no path");
        }
        if out.iter().any(|(n, _)| n == name) {
            anyhow::bail!("--disk {s}: the name {name} is given twice");
        }
        out.push((name.to_string(), PathBuf::from(path)));
    }
    Ok(out)
}

/// Parses a background rate limit in bytes per second (0: unlimited, at
/// most [`ferry_core::MAX_RATE`]).
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    ferry_core::control::parse_rate(s).map_err(|e| e.to_string())
}

/// Parses `--listen`: an IP address and port, or a host name and port
/// resolved now (its first address).
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: ferry_transport::ServerAddr = s.parse().map_err(|e| format!("{e}"))?;
    let found = addr
        .resolve_blocking()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    found
        .first()
        .copied()
        .ok_or_else(|| format!("{addr} has no address"))
}

/// Parses a size in bytes, with or without a unit (`32MiB`, `64M`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    ferry_core::units::parse_size(s).map_err(|e| e.to_string())
}

/// The link and congestion options shared by `serve` and `pull`.
#[derive(Args, Debug)]
pub(crate) struct LinkArgs {
    /// Congestion control: `loss-tolerant` (ferry's delay-aware controller,
    /// which ignores random loss) or `cubic` (quinn's default).
    #[arg(long, default_value = "loss-tolerant", value_parser = ["loss-tolerant", "cubic"])]
    pub(crate) congestion: String,
    /// Link bandwidth in Mbit/s, used to size QUIC windows.
    #[arg(long, default_value_t = 1000)]
    pub(crate) link_mbit: u64,
    /// Link round-trip time in ms, used to size QUIC windows.
    #[arg(long, default_value_t = 100)]
    pub(crate) link_rtt_ms: u64,
    /// Link MTU in bytes: datagrams of up to this less 28 bytes of IP and
    /// UDP headers (MTU discovery falls back on a smaller path). 9000 on a
    /// link with jumbo frames cuts the headers' share of the wire bytes.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(1228..=65555))]
    pub(crate) link_mtu: u32,
}

impl LinkArgs {
    /// QUIC tuning for this link.
    pub(crate) fn tuning(&self) -> ferry_transport::Tuning {
        let mut t = ferry_transport::Tuning::for_link(
            self.link_mbit * 1_000_000,
            std::time::Duration::from_millis(self.link_rtt_ms),
        )
        .with_link_mtu(self.link_mtu);
        t.loss_tolerant = self.congestion == "loss-tolerant";
        t
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every long option of `cmd` and its subcommands, with the path of
    /// the subcommand that has it.
    pub(crate) fn longs(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String)>) {
        for a in cmd.get_arguments() {
            if let Some(l) = a.get_long() {
                out.push((path.to_string(), l.to_string()));
            }
        }
        for sub in cmd.get_subcommands() {
            longs(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// One spelling across the CLI: a timeout is `--…timeout-secs`, no
    /// option abbreviates seconds as `-s`, a file written is `--out`, and
    /// an identity directory is `--identity` (keygen's was `--dir`, pull's
    /// timeout `--connect-timeout`; both stay as hidden aliases).
    #[test]
    fn options_are_spelled_one_way() {
        let mut all = Vec::new();
        longs(&super::Cli::command(), "ferry", &mut all);
        let bad: Vec<String> = all
            .iter()
            .filter(|(_, l)| {
                (l.contains("timeout") && !l.ends_with("-secs"))
                    || l.ends_with("-s")
                    || l == "output"
                    || l == "dir"
            })
            .map(|(p, l)| format!("{p} --{l}"))
            .collect();
        assert!(bad.is_empty(), "options spelled another way: {bad:?}");
        let keygen: Vec<&str> = all
            .iter()
            .filter(|(p, _)| p == "ferry keygen")
            .map(|(_, l)| l.as_str())
            .collect();
        assert!(keygen.contains(&"identity"), "{keygen:?}");
    }

    /// The old spellings still parse.
    #[test]
    fn the_old_spellings_are_hidden_aliases() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["ferry", "keygen", "--dir", "/x"]).expect("--dir");
        assert!(matches!(cli.command, super::Command::Keygen(ref k) if k.dir.as_os_str() == "/x"));
        let cli = super::Cli::try_parse_from([
            "ferry",
            "pull",
            "--disk",
            "d",
            "--control",
            "c",
            "--identity",
            "i",
            "--connect-timeout",
            "3",
        ])
        .expect("--connect-timeout");
        assert!(matches!(cli.command, super::Command::Pull(ref p) if p.connect_timeout == 3));
    }
}
