//! `cargo xtask wan`: an emulated WAN on this machine, and the library the
//! benchmarks and the smoke test use to drive it.
//!
//! Two network namespaces, `ferry-wan[-NAME]-src` (198.18.0.1) and
//! `ferry-wan[-NAME]-dst` (198.18.0.2, RFC 2544's benchmarking range; the
//! traffic never leaves the two namespaces), each with a TUN device `wan0`.
//! A forwarder process (`cargo xtask wan-forward`, hidden) holds both TUN
//! descriptors and moves every IP packet between them through the link
//! model of [`link`]: one-way delay, a rate limit with a queue bounded in
//! milliseconds, random and Gilbert-Elliott loss, jitter with or without
//! reordering, and a cut switch. TCP (qemu-nbd, nbdkit, nbdcopy) and QUIC
//! (ferry) then cross the very same link. The forwarder counts what it
//! forwarded and dropped and answers on a unix socket (`wan status`).
//!
//! [`Wan`] is the guard: dropping it kills the forwarder by its PID and
//! deletes the namespaces, also after a failure. `wan up` detaches the
//! guard and leaves the link running until `wan down`.
//!
//! Without root, [`relay`] runs the same link model as a UDP relay on
//! loopback (QUIC only).

pub(crate) mod forward;
pub(crate) mod link;
pub(crate) mod procs;
pub(crate) mod relay;
mod smoke;
mod sys;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub(crate) use smoke::wan_smoke;

use forward::Forwarder;
use link::LinkConfig;

/// Address of the source namespace's end of the link.
pub(crate) const SRC_ADDR: &str = "198.18.0.1";
/// Address of the destination namespace's end of the link.
pub(crate) const DST_ADDR: &str = "198.18.0.2";
/// Name of the TUN device in each namespace.
const TUN_NAME: &str = "wan0";
/// Where the running instances keep their state (PID, control socket).
const STATE_ROOT: &str = "/run/ferry-wan";

/// The link's parameters, as given on the command line.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct LinkOpts {
    /// Bottleneck rate in Mbit/s, each direction (0: unlimited).
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate_mbit: f64,
    /// Round-trip time in ms (half of it is added in each direction).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) rtt_ms: f64,
    /// Random loss, fraction of packets, each direction.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) loss: f64,
    /// Bursty (Gilbert-Elliott) loss: long-run fraction, each direction.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) burst_loss: f64,
    /// Mean length of a loss burst, in packets.
    #[arg(long, default_value_t = 4.0)]
    pub(crate) burst_len: f64,
    /// Jitter: each packet's one-way delay varies by up to ± this (no
    /// reordering).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) jitter_ms: f64,
    /// Jitter reorders packets: each keeps its own delay, so packets
    /// closer together than the jitter overtake each other (netem's jitter).
    #[arg(long)]
    pub(crate) jitter_reorders: bool,
    /// Bottleneck queue, in ms of serialisation time (tail drop beyond).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) queue_ms: f64,
    /// Seed of the loss and jitter random numbers.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// MTU of the two TUN ends, in bytes (9000: a link with jumbo frames).
    /// The UDP relay carries whatever datagram it gets.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    pub(crate) mtu: u32,
}

impl Default for LinkOpts {
    fn default() -> Self {
        Self {
            rate_mbit: 200.0,
            rtt_ms: 50.0,
            loss: 0.0,
            burst_loss: 0.0,
            burst_len: 4.0,
            jitter_ms: 0.0,
            jitter_reorders: false,
            queue_ms: 50.0,
            seed: 1,
            mtu: 1500,
        }
    }
}

fn dur_ms(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1e3)
}

impl LinkOpts {
    /// The model's configuration for each direction (forward, backward).
    pub(crate) fn link_configs(&self) -> (LinkConfig, LinkConfig) {
        let one = LinkConfig {
            rate_bps: (self.rate_mbit.max(0.0) * 1e6) as u64,
            delay: dur_ms(self.rtt_ms / 2.0),
            queue: dur_ms(self.queue_ms),
            loss: self.loss.clamp(0.0, 1.0),
            burst_loss: self.burst_loss.clamp(0.0, 0.99),
            burst_len: self.burst_len.max(1.0),
            jitter: dur_ms(self.jitter_ms),
            reorder: self.jitter_reorders,
            seed: self.seed,
        };
        let mut other = one.clone();
        other.seed = self.seed.wrapping_add(0x9e37_79b9);
        (one, other)
    }

    /// The same options as command-line arguments.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--rate-mbit={}", self.rate_mbit),
            format!("--rtt-ms={}", self.rtt_ms),
            format!("--loss={}", self.loss),
            format!("--burst-loss={}", self.burst_loss),
            format!("--burst-len={}", self.burst_len),
            format!("--jitter-ms={}", self.jitter_ms),
            format!("--queue-ms={}", self.queue_ms),
            format!("--seed={}", self.seed),
            format!("--mtu={}", self.mtu),
        ];
        if self.jitter_reorders {
            args.push("--jitter-reorders".into());
        }
        args
    }

    /// A one-line description, e.g. for reports.
    pub(crate) fn describe(&self) -> String {
        let mut s = format!(
            "{} Mbit/s, {} ms RTT, queue {} ms",
            self.rate_mbit, self.rtt_ms, self.queue_ms
        );
        if self.loss > 0.0 {
            s += &format!(", {}% random loss", self.loss * 100.0);
        }
        if self.burst_loss > 0.0 {
            s += &format!(
                ", {}% bursty loss (mean burst {} packets)",
                self.burst_loss * 100.0,
                self.burst_len
            );
        }
        if self.jitter_ms > 0.0 {
            s += &format!(", jitter ±{} ms", self.jitter_ms);
            if self.jitter_reorders {
                s += " (reordering)";
            }
        }
        if self.mtu != 1500 {
            s += &format!(", MTU {}", self.mtu);
        }
        s
    }
}

/// `cargo xtask wan ...`.
#[derive(clap::Args, Debug)]
pub(crate) struct WanArgs {
    #[command(subcommand)]
    cmd: WanCmd,
}

#[derive(clap::Subcommand, Debug)]
enum WanCmd {
    /// Create the two namespaces and start the forwarder (needs root).
    Up {
        /// Instance name (namespaces ferry-wan-NAME-src/-dst); default none.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        link: LinkOpts,
        /// TCP congestion control to pin inside both namespaces.
        #[arg(long, default_value = "bbr")]
        tcp_cc: String,
    },
    /// Stop the forwarder and delete the namespaces.
    Down {
        /// Instance name.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Show the link and the forwarder's counters.
    Status {
        /// Instance name.
        #[arg(long, default_value = "")]
        name: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cut the link (both directions) for a while.
    Cut {
        /// Instance name.
        #[arg(long, default_value = "")]
        name: String,
        /// How long, in ms.
        #[arg(long)]
        ms: u64,
    },
    /// A UDP relay on loopback with the same link model (no root; QUIC).
    Relay(relay::RelayArgs),
}

/// Options of the hidden `wan-forward` subcommand (the forwarder process).
#[derive(clap::Args, Debug)]
pub(crate) struct ForwardArgs {
    /// Source-side namespace.
    #[arg(long)]
    src_ns: String,
    /// Destination-side namespace.
    #[arg(long)]
    dst_ns: String,
    /// Control socket path.
    #[arg(long)]
    ctl: PathBuf,
    /// Exit when this process is no longer our parent (0: never).
    #[arg(long, default_value_t = 0)]
    parent_pid: u32,
    #[command(flatten)]
    link: LinkOpts,
}

/// Runs `cargo xtask wan ...`.
pub(crate) fn run_wan(a: &WanArgs) -> Result<()> {
    match &a.cmd {
        WanCmd::Up { name, link, tcp_cc } => {
            let wan = Wan::up(name, link, tcp_cc, false)?;
            println!(
                "wan up: {} ({SRC_ADDR}) <-> {} ({DST_ADDR}); {}; TCP {}; forwarder PID {}",
                wan.src_ns,
                wan.dst_ns,
                link.describe(),
                tcp_cc,
                wan.pid
            );
            println!(
                "  run e.g.: ip netns exec {} <command>   (see `cargo xtask wan status`)",
                wan.dst_ns
            );
            wan.detach();
            Ok(())
        }
        WanCmd::Down { name } => {
            let n = Names::new(name);
            teardown(&n)?;
            println!("wan down: {} and {} removed", n.src_ns, n.dst_ns);
            Ok(())
        }
        WanCmd::Status { name, json } => {
            let n = Names::new(name);
            let st = read_state(&n)?;
            let stats: Value = serde_json::from_str(&forward::control(&n.ctl(), "stats")?)?;
            if *json {
                println!("{}", json!({"instance": st, "stats": stats}));
            } else {
                print_status(&n, &st, &stats);
            }
            Ok(())
        }
        WanCmd::Cut { name, ms } => {
            let n = Names::new(name);
            forward::control(&n.ctl(), &format!("cut {ms}"))?;
            println!("wan: link cut for {ms} ms");
            Ok(())
        }
        WanCmd::Relay(r) => relay::run_relay(r),
    }
}

fn print_status(n: &Names, st: &Value, stats: &Value) {
    println!(
        "wan {}: {} ({SRC_ADDR}) <-> {} ({DST_ADDR}), forwarder PID {}, up {:.0} s",
        if n.name.is_empty() {
            "(default)"
        } else {
            &n.name
        },
        n.src_ns,
        n.dst_ns,
        st["pid"],
        stats["uptime_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  link: {}; TCP {}",
        st["link"].as_str().unwrap_or("?"),
        st["tcp_cc"].as_str().unwrap_or("?")
    );
    for dir in ["src_to_dst", "dst_to_src"] {
        let d = &stats[dir];
        let g = |k: &str| d[k].as_u64().unwrap_or(0);
        println!(
            "  {dir}: forwarded {} pkts / {:.1} MiB; dropped by queue {} pkts, by loss {} (random {}, burst {}), while cut {}, overflow {}; write errors {}; max queue {:.1} ms, max lateness {:.2} ms{}",
            g("forwarded_pkts"),
            g("forwarded_bytes") as f64 / 1048576.0,
            g("dropped_queue_pkts"),
            g("dropped_loss_pkts"),
            g("dropped_random_loss_pkts"),
            g("dropped_burst_loss_pkts"),
            g("dropped_cut_pkts"),
            g("dropped_overflow_pkts"),
            g("write_errors"),
            d["max_queue_ms"].as_f64().unwrap_or(0.0),
            d["max_late_ms"].as_f64().unwrap_or(0.0),
            if d["cut"] == true { " [CUT]" } else { "" }
        );
    }
}

/// The forwarder process: opens the TUN device in each namespace and pumps.
pub(crate) fn run_forward(a: &ForwardArgs) -> Result<()> {
    let src = sys::in_netns(&a.src_ns, || sys::open_tun(TUN_NAME))?;
    let dst = sys::in_netns(&a.dst_ns, || sys::open_tun(TUN_NAME))?;
    let (ab, ba) = a.link.link_configs();
    let fwd = Forwarder::start(
        ["src_to_dst", "dst_to_src"],
        ab,
        ba,
        (Box::new(src.try_clone()?), Box::new(dst.try_clone()?)),
        (Box::new(dst), Box::new(src)),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let parent = a.parent_pid;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let orphaned = parent != 0 && std::os::unix::process::parent_id() != parent;
            if orphaned {
                eprintln!("wan-forward: parent {parent} gone; exiting");
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        });
    }
    eprintln!(
        "wan-forward: {} <-> {} via {TUN_NAME}; {}",
        a.src_ns,
        a.dst_ns,
        a.link.describe()
    );
    let shared = fwd.shared().clone();
    let res = forward::serve_control(&a.ctl, shared, &stop);
    if !fwd.running() {
        bail!("a pump thread stopped");
    }
    drop(fwd);
    let _ = std::fs::remove_file(&a.ctl);
    res
}

/// The names of one instance.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    /// Instance name ("" for the default one).
    pub(crate) name: String,
    /// Source-side namespace.
    pub(crate) src_ns: String,
    /// Destination-side namespace.
    pub(crate) dst_ns: String,
    /// State directory.
    pub(crate) dir: PathBuf,
}

impl Names {
    fn new(name: &str) -> Self {
        let base = if name.is_empty() {
            "ferry-wan".to_string()
        } else {
            format!("ferry-wan-{name}")
        };
        let dir = Path::new(STATE_ROOT).join(if name.is_empty() { "default" } else { name });
        Self {
            name: name.to_string(),
            src_ns: format!("{base}-src"),
            dst_ns: format!("{base}-dst"),
            dir,
        }
    }

    fn ctl(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
}

fn read_state(n: &Names) -> Result<Value> {
    let s = std::fs::read_to_string(n.dir.join("state.json")).with_context(|| {
        format!(
            "no running wan instance {:?} (no {}); run `cargo xtask wan up`",
            n.name,
            n.dir.display()
        )
    })?;
    Ok(serde_json::from_str(&s)?)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// The command line of a process, NUL-separated args joined by spaces.
fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

/// Stops a process by PID: SIGTERM, then SIGKILL after `grace`.
fn stop_pid(pid: u32, grace: Duration) {
    if sys::signal(pid, libc::SIGTERM).unwrap_or(false) {
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = sys::signal(pid, libc::SIGKILL);
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Tears an instance down: processes left inside its namespaces, the
/// forwarder (by the PID it recorded, after checking that PID still runs
/// our forwarder), the namespaces, the state directory. Idempotent.
fn teardown(n: &Names) -> Result<()> {
    for ns in [&n.src_ns, &n.dst_ns] {
        if !netns_exists(ns) {
            continue;
        }
        // Processes still inside a namespace we made: started by a bench or
        // by hand for this link. Stop them by PID.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                eprintln!(
                    "wan: stopping PID {pid} left in {ns}: {}",
                    cmdline(pid).unwrap_or_default().trim()
                );
                stop_pid(pid, Duration::from_secs(2));
            }
        }
    }
    if let Ok(pid) = std::fs::read_to_string(n.dir.join("forwarder.pid")) {
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let ctl = n.ctl();
            let ours = cmdline(pid)
                .is_some_and(|c| c.contains("wan-forward") && c.contains(&*ctl.to_string_lossy()));
            if ours {
                stop_pid(pid, Duration::from_secs(3));
            }
        }
    }
    let mut errs = Vec::new();
    for ns in [&n.src_ns, &n.dst_ns] {
        if netns_exists(ns) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                errs.push(e.to_string());
            }
        }
    }
    if n.dir.exists() {
        let _ = std::fs::remove_dir_all(&n.dir);
    }
    if !errs.is_empty() {
        bail!("teardown: {}", errs.join("; "));
    }
    Ok(())
}

/// A running emulated WAN: two namespaces and the forwarder between them.
/// Dropping it tears everything down (unless [`Wan::detach`]ed).
pub(crate) struct Wan {
    names: Names,
    /// Source-side namespace.
    pub(crate) src_ns: String,
    /// Destination-side namespace.
    pub(crate) dst_ns: String,
    /// The forwarder's PID.
    pub(crate) pid: u32,
    child: Option<Child>,
    detached: bool,
}

impl Wan {
    /// Brings the link up. With `die_with_us`, the forwarder exits when
    /// this process does (for benchmarks and tests); otherwise it stays up
    /// until `wan down`.
    pub(crate) fn up(name: &str, link: &LinkOpts, tcp_cc: &str, die_with_us: bool) -> Result<Wan> {
        if !is_root() {
            bail!("the emulated WAN needs root (namespaces, TUN); without root use `cargo xtask wan relay` (UDP on loopback)");
        }
        if !Path::new("/dev/net/tun").exists() {
            bail!("/dev/net/tun is missing");
        }
        let n = Names::new(name);
        if netns_exists(&n.src_ns) || netns_exists(&n.dst_ns) || n.dir.exists() {
            eprintln!("wan: removing a leftover instance {:?}", n.src_ns);
            teardown(&n)?;
        }
        std::fs::create_dir_all(&n.dir)?;
        let mut wan = Wan {
            src_ns: n.src_ns.clone(),
            dst_ns: n.dst_ns.clone(),
            names: n.clone(),
            pid: 0,
            child: None,
            detached: false,
        };
        // From here on, a failure drops `wan`, which tears down.
        for ns in [&n.src_ns, &n.dst_ns] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // /proc/self/exe, not current_exe(): it still works when the binary
        // was rebuilt (replaced) while a long benchmark runs.
        let exe = PathBuf::from("/proc/self/exe");
        let log = n.dir.join("forwarder.log");
        let mut cmd = Command::new(exe);
        cmd.arg("wan-forward")
            .args(["--src-ns", &n.src_ns, "--dst-ns", &n.dst_ns, "--ctl"])
            .arg(n.ctl())
            .args(link.to_args())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?);
        if die_with_us {
            cmd.arg(format!("--parent-pid={}", std::process::id()));
        } else {
            // Detached: not in our terminal's process group, so ^C on a
            // later command does not reach it.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().context("cannot start the forwarder")?;
        wan.pid = child.id();
        wan.child = Some(child);
        std::fs::write(n.dir.join("forwarder.pid"), format!("{}\n", wan.pid))?;

        // Wait for its control socket.
        let t0 = Instant::now();
        loop {
            if forward::control(&n.ctl(), "stats").is_ok() {
                break;
            }
            if let Some(c) = wan.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "the forwarder exited ({st}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the forwarder did not come up in 10 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        for (ns, me, peer) in [
            (&n.src_ns, SRC_ADDR, DST_ADDR),
            (&n.dst_ns, DST_ADDR, SRC_ADDR),
        ] {
            wan.sysctls(ns, tcp_cc)?;
            ip(&["-n", ns, "addr", "add", me, "peer", peer, "dev", TUN_NAME])?;
            ip(&[
                "-n",
                ns,
                "link",
                "set",
                TUN_NAME,
                "mtu",
                &link.mtu.to_string(),
                "txqueuelen",
                "10000",
                "up",
            ])?;
        }
        std::fs::write(
            n.dir.join("state.json"),
            json!({
                "name": n.name,
                "src_ns": n.src_ns,
                "dst_ns": n.dst_ns,
                "src_addr": SRC_ADDR,
                "dst_addr": DST_ADDR,
                "pid": wan.pid,
                "ctl": n.ctl(),
                "link": link.describe(),
                "link_args": link.to_args(),
                "tcp_cc": tcp_cc,
            })
            .to_string(),
        )?;
        Ok(wan)
    }

    fn sysctls(&self, ns: &str, tcp_cc: &str) -> Result<()> {
        allow_congestion_control(tcp_cc)?;
        // Per-namespace settings. TCP gets buffers that cover the largest
        // bandwidth-delay product benchmarked, so it is not window-bound.
        let required = [format!("net.ipv4.tcp_congestion_control={tcp_cc}")];
        let wanted = [
            "net.ipv4.tcp_rmem=4096 131072 33554432".to_string(),
            "net.ipv4.tcp_wmem=4096 16384 33554432".to_string(),
            "net.ipv4.tcp_no_metrics_save=1".to_string(),
            // No IPv6 chatter (router solicitations) in the counters.
            "net.ipv6.conf.all.disable_ipv6=1".to_string(),
            "net.ipv6.conf.default.disable_ipv6=1".to_string(),
        ];
        for (kv, must) in required
            .iter()
            .map(|s| (s, true))
            .chain(wanted.iter().map(|s| (s, false)))
        {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-q", "-w", kv])
                .output()
                .context("cannot run sysctl")?;
            if !out.status.success() {
                let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if must {
                    bail!("sysctl {kv} in {ns} failed: {msg}");
                }
                eprintln!("wan: warning: sysctl {kv} in {ns} failed: {msg}");
            }
        }
        Ok(())
    }

    /// The forwarder's counters (see `forward::Shared::stats`).
    pub(crate) fn stats(&self) -> Result<Value> {
        self.stats_handle().stats()
    }

    /// A handle that reads the same counters and can move to another
    /// thread (a sampler running while the guard stays here).
    pub(crate) fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            ctl: self.names.ctl(),
        }
    }

    /// Cuts the link for `dur`.
    pub(crate) fn cut(&self, dur: Duration) -> Result<()> {
        forward::control(&self.names.ctl(), &format!("cut {}", dur.as_millis()))?;
        Ok(())
    }

    /// A command that runs `prog` inside the source namespace.
    pub(crate) fn in_src(&self, prog: impl AsRef<OsStr>) -> Command {
        in_ns(&self.src_ns, prog)
    }

    /// A command that runs `prog` inside the destination namespace.
    pub(crate) fn in_dst(&self, prog: impl AsRef<OsStr>) -> Command {
        in_ns(&self.dst_ns, prog)
    }

    /// Leaves the link running after this guard is gone (`wan up`).
    pub(crate) fn detach(mut self) {
        self.detached = true;
    }

    /// Tears the link down now, reporting failures.
    pub(crate) fn down(mut self) -> Result<()> {
        self.detached = true;
        self.teardown_now()
    }

    fn teardown_now(&mut self) -> Result<()> {
        let r = teardown(&self.names);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        r
    }
}

/// Reads a forwarder's counters through its control socket; a cheap
/// clone of the socket's path, independent of the [`Wan`] guard.
#[derive(Clone, Debug)]
pub(crate) struct StatsHandle {
    ctl: PathBuf,
}

impl StatsHandle {
    /// A handle on the control socket at `ctl` (tests: a fake forwarder).
    #[cfg(test)]
    pub(crate) fn at(ctl: PathBuf) -> Self {
        Self { ctl }
    }

    /// The forwarder's counters (see `forward::Shared::stats`).
    pub(crate) fn stats(&self) -> Result<Value> {
        let s = forward::control(&self.ctl, "stats")?;
        Ok(serde_json::from_str(&s)?)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if !self.detached {
            if let Err(e) = self.teardown_now() {
                eprintln!("wan: teardown failed: {e:#}");
            }
        }
    }
}

/// A namespace other than the host's may only pick a TCP congestion
/// control listed in the host's `tcp_allowed_congestion_control`; add
/// `cc` there if it is missing (it only widens what may be chosen).
fn allow_congestion_control(cc: &str) -> Result<()> {
    let path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    let allowed = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    if allowed.split_whitespace().any(|c| c == cc) {
        return Ok(());
    }
    let avail = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    if !avail.split_whitespace().any(|c| c == cc) {
        // Loading the module happens when it is first chosen; try that.
        let _ = Command::new("modprobe").arg(format!("tcp_{cc}")).status();
    }
    let new = format!("{} {cc}", allowed.trim());
    eprintln!(
        "wan: adding {cc} to the host's {path} (was: {})",
        allowed.trim()
    );
    std::fs::write(path, &new).with_context(|| format!("cannot write {new:?} to {path}"))?;
    Ok(())
}

/// `ip netns exec NS prog`: `ip` execs `prog`, so the child's PID is
/// `prog`'s own (for /proc/PID/stat and kill).
pub(crate) fn in_ns(ns: &str, prog: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(prog);
    c
}

/// A counter of one direction from a stats object.
pub(crate) fn counter(stats: &Value, dir: &str, key: &str) -> u64 {
    stats[dir][key].as_u64().unwrap_or(0)
}
