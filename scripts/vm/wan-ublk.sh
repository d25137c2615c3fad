#!/bin/sh
# `cargo xtask vm-wan-bench` (xtask/src/vm/wan_bench.rs), run by /init in the VM.
#
# The source stays on the host: `ferry serve` behind xtask's UDP relay (the
# emulated WAN link), reached over QEMU user networking at $WAN_SOURCE
# (10.0.2.2:PORT). Each run starts `ferry pull --ublk` with an empty backing
# file on tmpfs and measures through the kernel's block layer
# (/dev/ublkb0, O_DIRECT 4 KiB reads with GNU dd, whose own timing excludes
# starting the process):
#   FERRY-BENCH wan run=N first_read_ms=X read_ms=Y
#       X: launching `ferry pull` to the first read of an absent block
#          returning (/proc/uptime, 10 ms resolution; it includes starting
#          dd under TCG); Y: that read alone (dd's timing);
#   FERRY-BENCH wan run=N probe_ms=X
#       each further read of an absent block while the copy runs;
#   FERRY-BENCH wan run=N local_ms=X
#       a read of a present block once the copy is done (the guest's own
#       floor under TCG: block layer, ublk driver, ferry, no network);
#   FERRY-BENCH wan run=N whole_disk_s=X wire_rx_bytes=B on_demand_bytes=C
#       until every block is present and verified; ferry's own counters.
# Environment (kernel command line): WAN_SOURCE, WAN_FP_SRC, WAN_RUNS,
# WAN_PROBES, WAN_MBIT, WAN_RTT_MS.
. "$FERRY_LIB"

export NO_COLOR=1
RUNS=${WAN_RUNS:-3}
PROBES=${WAN_PROBES:-20}
T=/tmp/wan
mkdir -p "$T/id-dst"
DISK=$T/disk.img
CTL=$T/ctl

now() { cut -d' ' -f1 /proc/uptime; }

if [ ! -e /dev/ublk-control ]; then
    fail wan-ublk-driver "/dev/ublk-control does not exist after insmod ublk_drv"
    exit 1
fi
cp /ferry/files/cert.der /ferry/files/key.der "$T/id-dst/" || {
    fail wan-identity "the destination identity is not in /ferry/files"
    exit 1
}
info guest_cpu "$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1), $(grep -c ^processor /proc/cpuinfo) vCPUs"
info guest_kernel "$(uname -r)"

# read_4k BLOCK: one O_DIRECT 4 KiB read of /dev/ublkb0; prints dd's own
# time in ms, fails if the read fails.
read_4k() {
    out=$(dd if=/dev/ublkb0 of=/dev/null bs=4096 count=1 skip="$1" iflag=direct 2>&1) || return 1
    echo "$out" | sed -n 's/.* copied, \([0-9.e+-]*\) s.*/\1/p' | awk '{ printf "%.2f\n", $1 * 1000 }'
}

one_run() {
    run=$1
    rm -f "$DISK" "$DISK.ferry-state"
    ms=
    t0=$(now)
    ferry pull --source "$WAN_SOURCE" --disk "$DISK" --control "$CTL" \
        --identity "$T/id-dst" --trust-peer "$WAN_FP_SRC" \
        --link-mbit "$WAN_MBIT" --link-rtt-ms "$WAN_RTT_MS" \
        --ublk --ublk-id 0 >"$T/pull-$run.log" 2>&1 &
    PULL=$!
    size=
    n=0
    # The first read: the last block of the disk, which the copier reaches
    # last. Retried until the device exists and answers.
    while [ $n -lt 3000 ]; do
        if [ -b /dev/ublkb0 ]; then
            size=$(blockdev --getsize64 /dev/ublkb0 2>/dev/null)
            if [ -n "$size" ] && [ "$size" -gt 0 ] && ms=$(read_4k $((size / 4096 - 1))) && [ -n "$ms" ]; then
                break
            fi
        fi
        kill -0 "$PULL" 2>/dev/null || {
            tail -n 20 "$T/pull-$run.log"
            return 1
        }
        sleep 0.01
        n=$((n + 1))
    done
    [ -n "$ms" ] || return 1
    t1=$(now)
    # `check` keeps a check's output; the lines go to a file, printed after.
    echo "FERRY-BENCH wan run=$run first_read_ms=$(echo "$t0 $t1" | awk '{printf "%.0f", ($2 - $1) * 1000}') read_ms=$ms" >>"$T/bench.txt"
    # Probes: distinct 1 MiB regions in the far 40% of the disk (the copier
    # goes in order, so they are absent), 150 ms apart.
    blocks=$((size / 4096))
    i=0
    while [ $i -lt "$PROBES" ]; do
        b=$((blocks * 6 / 10 + i * (blocks * 4 / 10 - 256) / PROBES))
        ms=$(read_4k "$b") || return 1
        echo "FERRY-BENCH wan run=$run probe_ms=$ms" >>"$T/bench.txt"
        sleep 0.15
        i=$((i + 1))
    done
    n=0
    while [ $n -lt 1800 ]; do
        if timeout 20 ferry status --control "$CTL" --json >"$T/status.json" 2>/dev/null &&
            grep -q '"phase":"complete"' "$T/status.json" &&
            grep -q '"verified":"ok"' "$T/status.json"; then
            t2=$(now)
            wire=$(sed -n 's/.*"wire_rx_bytes":\([0-9]*\).*/\1/p' "$T/status.json")
            od=$(sed -n 's/.*"fetched_on_demand_bytes":\([0-9]*\).*/\1/p' "$T/status.json")
            # The floor under TCG: a read of a present block, which never
            # leaves the guest (the first read's block, now local).
            local_ms=$(read_4k $((size / 4096 - 1))) || return 1
            echo "FERRY-BENCH wan run=$run local_ms=$local_ms" >>"$T/bench.txt"
            echo "FERRY-BENCH wan run=$run whole_disk_s=$(echo "$t0 $t2" | awk '{printf "%.2f", $2 - $1}') wire_rx_bytes=$wire on_demand_bytes=$od size_bytes=$size" >>"$T/bench.txt"
            kill "$PULL"
            wait "$PULL"
            return 0
        fi
        kill -0 "$PULL" 2>/dev/null || return 1
        sleep 0.2
        n=$((n + 1))
    done
    cat "$T/status.json"
    return 1
}

r=1
while [ $r -le "$RUNS" ]; do
    : >"$T/bench.txt"
    if ! check "wan-ublk-run-$r" one_run "$r"; then
        tail -n 20 "$T/pull-$r.log"
        exit 1
    fi
    cat "$T/bench.txt"
    # The device of this run is gone before the next one takes id 0.
    wait_for 20 test ! -e /dev/ublkb0 || {
        fail wan-ublk-cleanup "/dev/ublkb0 still exists after ferry pull stopped"
        exit 1
    }
    r=$((r + 1))
done
