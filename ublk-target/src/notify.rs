//! systemd readiness and status notification (`sd_notify`): when run as a
//! `Type=notify` unit, `$NOTIFY_SOCKET` names a unix datagram socket that
//! takes `READY=1`, `STATUS=…` and `STOPPING=1` lines. Outside systemd this
//! does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to systemd if we run under it; errors are only logged.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    if path.as_os_str().as_encoded_bytes().first() == Some(&b'@') {
        // Abstract sockets need a platform extension; systemd uses paths
        // for services, so this is only logged.
        tracing::debug!("abstract NOTIFY_SOCKET not supported");
        return;
    }
    let r = UnixDatagram::unbound().and_then(|s| s.send_to(state.as_bytes(), &path));
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The `STATUS=` line of a pull's progress, in human units (the line
/// `ferry status --watch` prints).
pub(crate) fn progress(s: &ferry_pull::Status) -> String {
    format!("STATUS={}", crate::watch::progress_line(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        // This test is the only reader of NOTIFY_SOCKET in this binary.
        std::env::set_var("NOTIFY_SOCKET", &p);
        notify("READY=1\nSTATUS=serving");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn the_progress_status_is_in_human_units() {
        let s = ferry_pull::Status {
            phase: "copying".into(),
            total_bytes: 3 << 30,
            present_bytes: 3 << 29,
            rate_bytes_per_sec: 50 << 20,
            eta_seconds: Some(31),
            source_state: "connected".into(),
            background: "running".into(),
            verified: "pending".into(),
            ..Default::default()
        };
        assert_eq!(
            progress(&s),
            "STATUS=copying 50.0%: 1.5 GiB of 3.0 GiB, 50.0 MiB/s, ETA 31 s; source connected, \
             background running, verified pending"
        );
    }
}
