//! The UDP relay: the same link model without root, for QUIC on loopback.
//! Datagrams sent to `--listen` go through the forward link to `--to`;
//! answers from `--to` go through the backward link to whoever sent to
//! `--listen` last (one client at a time, as a NAT would see one flow).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::forward::{Forwarder, UdpRx, UdpTx};
use super::{sys, LinkOpts};

/// Options of `cargo xtask wan relay`.
#[derive(clap::Args, Debug)]
pub(crate) struct RelayArgs {
    /// Loopback address the client sends to, e.g. 127.0.0.1:7701.
    #[arg(long)]
    listen: SocketAddr,
    /// Loopback address of the server, e.g. 127.0.0.1:7700.
    #[arg(long)]
    to: SocketAddr,
    #[command(flatten)]
    link: LinkOpts,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Print the counters every this many seconds.
    #[arg(long = "report-secs", alias = "report-s", default_value_t = 10)]
    report_s: u64,
}

/// A running relay; stops when dropped.
pub(crate) struct Relay {
    fwd: Forwarder,
    /// The address clients send to.
    pub(crate) listen: SocketAddr,
}

impl Relay {
    /// Starts a relay from `listen` to `to` (both must be loopback).
    pub(crate) fn start(listen: SocketAddr, to: SocketAddr, link: &LinkOpts) -> Result<Relay> {
        if !listen.ip().is_loopback() || !to.ip().is_loopback() {
            bail!("the relay only runs on loopback ({listen} -> {to})");
        }
        let front = UdpSocket::bind(listen).with_context(|| format!("cannot bind {listen}"))?;
        let back_addr: SocketAddr = if to.is_ipv4() {
            "127.0.0.1:0".parse()?
        } else {
            "[::1]:0".parse()?
        };
        let back = UdpSocket::bind(back_addr)?;
        back.connect(to)?;
        for s in [&front, &back] {
            s.set_nonblocking(true)?;
            // Best effort: the kernel caps it at net.core.rmem_max.
            let _ = sys::set_socket_buffers(s.as_raw_fd(), 8 << 20);
        }
        let client = Arc::new(Mutex::new(None));
        let (ab, ba) = link.link_configs();
        let fwd = Forwarder::start(
            ["to_server", "to_client"],
            ab,
            ba,
            (
                Box::new(UdpRx {
                    sock: front.try_clone()?,
                    peer: Some(client.clone()),
                }),
                Box::new(UdpTx {
                    sock: back.try_clone()?,
                    peer: None,
                }),
            ),
            (
                Box::new(UdpRx {
                    sock: back,
                    peer: None,
                }),
                Box::new(UdpTx {
                    sock: front,
                    peer: Some(client),
                }),
            ),
        )?;
        Ok(Relay {
            fwd,
            listen: listen_addr(listen)?,
        })
    }

    /// The counters, as JSON (directions `to_server` and `to_client`).
    pub(crate) fn stats(&self) -> Value {
        self.fwd.shared().stats()
    }

    /// Cuts the link for `dur`.
    pub(crate) fn cut(&self, dur: Duration) {
        self.fwd.shared().cut(dur);
    }
}

fn listen_addr(a: SocketAddr) -> Result<SocketAddr> {
    if a.port() == 0 {
        bail!("give the relay a fixed port to listen on");
    }
    Ok(a)
}

/// Runs `cargo xtask wan relay`.
pub(crate) fn run_relay(a: &RelayArgs) -> Result<()> {
    let relay = Relay::start(a.listen, a.to, &a.link)?;
    eprintln!(
        "wan relay: {} -> {}; {}",
        relay.listen,
        a.to,
        a.link.describe()
    );
    let t0 = Instant::now();
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if !relay.fwd.running() {
            bail!("a relay thread stopped");
        }
        if a.report_s > 0 && last.elapsed() >= Duration::from_secs(a.report_s) {
            println!("{}", relay.stats());
            last = Instant::now();
        }
        if a.seconds > 0 && t0.elapsed() >= Duration::from_secs(a.seconds) {
            println!("{}", relay.stats());
            return Ok(());
        }
    }
}
