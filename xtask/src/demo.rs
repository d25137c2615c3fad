//! `cargo xtask demo`: a whole migration on this machine, over an emulated
//! WAN. A source image holding a real ext4 filesystem is served by
//! `ferry serve`; between it and `ferry pull` runs the emulated link (a UDP
//! relay on loopback with the WAN link model of `cargo xtask wan`: 200 Mbit/s,
//! 50 ms RTT by default; no root needed); `ferry pull` presents the disk over
//! NBD at once; qemu-io reads and writes through the export while the
//! background copy runs; when the copy is complete the result is proven with
//! `qemu-img compare` and `e2fsck`, and a short report is printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{cargo, ensure, run, target_dir, tool, workspace_root, Need, LIBCLANG};

/// What the demo needs: the NBD clients and mkfs it drives, and libclang
/// to build ferry.
pub(crate) const NEEDS: &[Need] = &[
    tool("qemu-io", "qemu-utils"),
    tool("qemu-img", "qemu-utils"),
    tool("mkfs.ext4", "e2fsprogs"),
    tool("e2fsck", "e2fsprogs"),
    LIBCLANG,
];

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Size of the demo disk in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Background copy rate limit in MiB/s (0 = unlimited: the link is the
    /// limit).
    #[arg(long, default_value_t = 0)]
    rate_mib: u64,
    /// Emulated link rate in Mbit/s.
    #[arg(long, default_value_t = 200.0)]
    link_mbit: f64,
    /// Emulated link round-trip time in ms.
    #[arg(long, default_value_t = 50.0)]
    rtt_ms: f64,
    /// Random loss on the emulated link (fraction of packets).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Where to put the demo's files.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Kills and reaps a child on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry(bin: &Path) -> Command {
    Command::new(bin)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(bin: &Path, ctl: &Path) -> Result<serde_json::Value> {
    let s = output(ferry(bin).args(["status", "--json", "--control"]).arg(ctl))?;
    serde_json::from_str(&s).context("status is not JSON")
}

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "timed out waiting for {needle:?} in {}: {}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    )
}

fn qemu_io(sock: &Path, cmds: &[String]) -> Result<(String, Duration)> {
    let mut c = Command::new("timeout");
    c.args(["120", "qemu-io", "--image-opts"]).arg(format!(
        "driver=nbd,server.type=unix,server.path={},export=ferry",
        sock.display()
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let t0 = Instant::now();
    let out = output(&mut c)?;
    if out.contains("failed") {
        bail!("qemu-io reported a failure: {out}");
    }
    Ok((out, t0.elapsed()))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs the demo.
pub(crate) fn run_demo(a: &DemoArgs) -> Result<()> {
    ensure(NEEDS)?;
    let root = workspace_root();
    eprintln!("demo: building ferry (release)");
    run(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "ferry",
        "--bin",
        "ferry",
    ]))?;
    let bin = target_dir().join("release").join("ferry");
    let dir = a.dir.clone().unwrap_or_else(|| target_dir().join("demo"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("source.img");
    let dst = dir.join("destination.img");
    let ctl = dir.join("ctl.sock");
    let sock = dir.join("nbd.sock");

    // A real filesystem: ext4 populated with this machine's documentation.
    eprintln!(
        "demo: making a {} MiB ext4 image from /usr/share/doc",
        a.size_mib
    );
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            "/usr/share/doc",
        ])
        .arg(&src)
        .arg(format!("{}M", a.size_mib)))?;

    let src_fp = output(
        ferry(&bin)
            .args(["keygen", "--identity"])
            .arg(dir.join("src-id")),
    )?;
    let dst_fp = output(
        ferry(&bin)
            .args(["keygen", "--identity"])
            .arg(dir.join("dst-id")),
    )?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let serve_log = dir.join("serve.log");
    let _serve = Guard(
        ferry(&bin)
            .args(["serve", "--disk"])
            .arg(&src)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--identity"])
            .arg(dir.join("src-id"))
            .args(["--trust-peer", dst_fp.trim()])
            .args(["--link-mbit", &(a.link_mbit as u64).to_string()])
            .args(["--link-rtt-ms", &(a.rtt_ms as u64).to_string()])
            .stdout(std::fs::File::create(&serve_log)?)
            .stderr(std::fs::File::options().append(true).open(&serve_log)?)
            .spawn()?,
    );
    wait_for_log(
        &serve_log,
        "ferry serve: exporting",
        Duration::from_secs(120),
    )?;

    // The emulated WAN between the two.
    let relay_port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let relay_addr: std::net::SocketAddr = format!("127.0.0.1:{relay_port}").parse()?;
    let link = crate::wan::LinkOpts {
        rate_mbit: a.link_mbit,
        rtt_ms: a.rtt_ms,
        loss: a.loss,
        ..crate::wan::LinkOpts::default()
    };
    let relay =
        crate::wan::relay::Relay::start(relay_addr, format!("127.0.0.1:{port}").parse()?, &link)?;
    eprintln!(
        "demo: emulated WAN {} Mbit/s, {} ms RTT, {}% loss (UDP relay {relay_addr} -> source)",
        a.link_mbit,
        a.rtt_ms,
        a.loss * 100.0
    );
    let pull_log = dir.join("pull.log");
    let t_start = Instant::now();
    let _pull = Guard(
        ferry(&bin)
            .args(["pull", "--source", &relay_addr.to_string(), "--disk"])
            .arg(&dst)
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display()))
            .arg("--control")
            .arg(&ctl)
            .arg("--identity")
            .arg(dir.join("dst-id"))
            .args(["--trust-peer", src_fp.trim()])
            .args(["--rate", &(a.rate_mib << 20).to_string()])
            .args(["--link-mbit", &(a.link_mbit as u64).to_string()])
            .args(["--link-rtt-ms", &(a.rtt_ms as u64).to_string()])
            .stdout(std::fs::File::create(&pull_log)?)
            .stderr(std::fs::File::options().append(true).open(&pull_log)?)
            .stdin(Stdio::null())
            .spawn()?,
    );
    wait_for_log(&pull_log, "ferry pull: serving", Duration::from_secs(60))?;
    let t_serving = t_start.elapsed();

    // The guest's first read: the superblock, fetched on demand.
    let (_, first_read) = qemu_io(&sock, &["read -P 0 0 1024".into(), "read 1024 4096".into()])?;
    let t_first = t_start.elapsed();
    // Reads and writes while the copy runs: the last MiB of the disk is
    // not used by the filesystem at this fill level.
    let size = a.size_mib << 20;
    let woff = size - (1 << 20);
    let (_, rw) = qemu_io(
        &sock,
        &[
            format!("read {} 65536", size / 2),
            format!("write -P 0x5a {woff} 65536"),
            format!("write -P 0xa5 {} 1000", woff + 70000),
            "flush".into(),
            format!("read -P 0x5a {woff} 65536"),
        ],
    )?;
    let mid = status(&bin, &ctl)?;
    eprintln!(
        "demo: during the copy: {:.1} of {:.1} MiB present, {:.1} MiB/s",
        mib(mid["present_bytes"].as_u64().unwrap_or(0)),
        mib(size),
        mib(mid["rate_bytes_per_sec"].as_u64().unwrap_or(0))
    );

    // Wait for completion and verification, showing progress.
    let t0 = Instant::now();
    let fin = loop {
        let s = status(&bin, &ctl)?;
        if s["phase"] == "complete" && s["verified"] != "pending" && s["verified"] != "running" {
            break s;
        }
        if s["phase"] == "error" {
            bail!("the pull failed: {}", s["error"]);
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the copy did not complete in 10 minutes: {s}");
        }
        eprint!(
            "\rdemo: {:5.1}% present, ETA {} s   ",
            s["present_bytes"].as_u64().unwrap_or(0) as f64 * 100.0 / size as f64,
            s["eta_seconds"]
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!();
    let t_complete = t_start.elapsed();
    if fin["verified"] != "ok" {
        bail!("verification failed: {fin}");
    }

    // Prove it: the expected image is the source plus the demo's writes.
    let expect = dir.join("expected.img");
    std::fs::copy(&src, &expect)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&expect)?;
        f.write_all_at(&[0x5a; 65536], woff)?;
        f.write_all_at(&[0xa5; 1000], woff + 70000)?;
        f.sync_all()?;
    }
    drop(_pull);
    output(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&expect)
            .arg(&dst),
    )
    .context("qemu-img compare: the destination differs from source + writes")?;
    output(Command::new("e2fsck").args(["-fn"]).arg(&dst))
        .context("e2fsck found the destination's filesystem damaged")?;

    let relay_stats = relay.stats();
    drop(relay);
    let data = fin["source_data_bytes"].as_u64().unwrap_or(0);
    let wire = fin["wire_rx_bytes"].as_u64().unwrap_or(0);
    println!("ferry demo report ({})", dir.display());
    println!(
        "  disk:              {:.0} MiB ext4, {:.1} MiB of data, {:.1} MiB zero/unallocated",
        mib(size),
        mib(data),
        mib(fin["skipped_zero_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "  export serving:    {:.0} ms after `ferry pull` started",
        t_serving.as_secs_f64() * 1e3
    );
    println!(
        "  first guest read:  {:.0} ms after start (qemu-io run {:.0} ms incl. its own start-up)",
        t_first.as_secs_f64() * 1e3,
        first_read.as_secs_f64() * 1e3
    );
    println!(
        "  reads+writes during copy: qemu-io run {:.0} ms",
        rw.as_secs_f64() * 1e3
    );
    println!(
        "  link:              {} Mbit/s, {} ms RTT, {}% loss (emulated)",
        a.link_mbit,
        a.rtt_ms,
        a.loss * 100.0
    );
    println!(
        "  whole disk local:  {:.1} s after start",
        t_complete.as_secs_f64()
    );
    println!(
        "  fetched:           {:.1} MiB on demand, {:.1} MiB in background",
        mib(fin["fetched_on_demand_bytes"].as_u64().unwrap_or(0)),
        mib(fin["fetched_background_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "  on the wire:       {:.1} MiB ({:.3}x the data)",
        mib(wire),
        wire as f64 / data.max(1) as f64
    );
    println!(
        "  verified:          {} ({} chunks against source hashes; disk blake3 {})",
        fin["verified"], fin["verified_chunks"], fin["disk_blake3"]
    );
    println!("  qemu-img compare:  identical to source + the demo's writes");
    let c = &relay_stats["to_client"];
    println!(
        "  link counters:     {} B forwarded to the destination, {} packets dropped by the bottleneck queue (max {:.0} ms queued), {} by random loss",
        c["forwarded_bytes"], c["dropped_queue_pkts"], c["max_queue_ms"].as_f64().unwrap_or(0.0), c["dropped_random_loss_pkts"]
    );
    println!("  e2fsck -fn:        clean");
    Ok(())
}
