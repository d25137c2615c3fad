//! Host CPU steal: time the hypervisor ran something else while one of
//! this machine's virtual CPUs wanted to run (`steal` in `/proc/stat`).
//!
//! The bench machine is itself a guest. Its host took both cores for
//! 60–250 ms at a time, a few times a minute; every process stalls then,
//! the forwarder and both ends alike, and a 4 KiB read in flight takes
//! that much longer whatever system serves it. The bench reads the
//! counter around every probe and every run so the report can say which
//! figures such a stall touched, instead of leaving it unexplained.

/// A probe during which the host stole at least this much CPU time
/// (summed over the CPUs) counts as disturbed by the host.
pub(super) const DISTURBED_MS: f64 = 20.0;

/// Stolen CPU time so far, summed over all CPUs, in ms; `None` where
/// `/proc/stat` has no steal field (not a guest, or not Linux).
pub(super) fn stolen_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal(&stat).map(|ticks| ticks as f64 * TICK_MS)
}

/// The `steal` field (in clock ticks) of the aggregate `cpu` line.
fn parse_steal(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    line.split_whitespace().nth(8)?.parse().ok()
}

/// One clock tick of `/proc/stat` in ms: 1/USER_HZ, which Linux fixes at
/// 100 for user space on x86-64 and arm64 whatever the kernel's own HZ.
const TICK_MS: f64 = 10.0;

/// Stolen ms between two readings; 0 when either is missing.
pub(super) fn between(before: Option<f64>, after: Option<f64>) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) => (a - b).max(0.0),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_steal_field_of_the_cpu_line() {
        let stat = "cpu  1787696 39604 1227423 9107530 37080 0 59766 90351 0 0\n\
                    cpu0 1 2 3 4 5 6 7 8 0 0\nintr 1 2\n";
        assert_eq!(parse_steal(stat), Some(90351));
        assert_eq!(parse_steal("cpu  1 2 3\n"), None);
        assert_eq!(parse_steal("intr 1\n"), None);
    }

    #[test]
    fn the_counter_of_this_machine_reads_and_never_goes_back() {
        // Linux has had the field since 2.6.11; a kernel without it would
        // fail here, and the report would show no steal at all.
        let a = stolen_ms().expect("/proc/stat has a steal field");
        let b = stolen_ms().expect("/proc/stat has a steal field");
        assert!(b >= a);
        assert_eq!(between(Some(a), Some(b)), b - a);
        assert_eq!(between(None, Some(b)), 0.0);
    }
}
