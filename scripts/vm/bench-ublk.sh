#!/bin/sh
# `cargo xtask vm-bench` (xtask/src/vm/bench.rs), run by /init in the VM.
#
# `ferry serve` exports the benchmark image (virtio disk, serial
# ferry-bench-src) on loopback; `ferry pull --ublk` copies it into a backing
# file on tmpfs until every block is present and verified. Then fio reads
# /dev/ublkb0 and a loop device over the same backing file, alternating
# devices run by run, and prints one line per run:
#   FERRY-BENCH dev=ublk|loop|ublk-mem-file workload=W run=N iops=X bw_kib=Y
# (ublk-mem-file, a reference: the ublk-mem example serving a copy of the
# backing file on the same tmpfs as /dev/ublkb1, i.e. ferry's ublk frontend
# without ferry's engine; the pull holds the backing file's lock.)
# plus `FERRY-BENCH info KEY=VALUE` lines describing the guest.
# Environment (kernel command line): BENCH_RUNS, BENCH_RUNTIME (s per run),
# BENCH_QUEUES, BENCH_DEPTH.
. "$FERRY_LIB"

export NO_COLOR=1
RUNS=${BENCH_RUNS:-3}
RUNTIME=${BENCH_RUNTIME:-8}
QUEUES=${BENCH_QUEUES:-1}
DEPTH=${BENCH_DEPTH:-64}
T=/tmp/bench
mkdir -p "$T"
DISK=$T/disk.img
CTL=$T/ctl
LOSETUP=/usr/sbin/losetup


if [ ! -e /dev/ublk-control ]; then
    fail bench-ublk-driver "/dev/ublk-control does not exist after insmod ublk_drv"
    exit 1
fi
SRC=
for s in /sys/block/vd*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = ferry-bench-src ] && d=${s%/serial} && SRC=/dev/${d##*/}
done
[ -b "$SRC" ] || {
    fail bench-source "no virtio disk with serial ferry-bench-src"
    exit 1
}
SIZE=$(blockdev --getsize64 "$SRC")

info guest_cpu "$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n 1), $(grep -c ^processor /proc/cpuinfo) vCPUs"
info guest_kernel "$(uname -r)"
info fio "$(fio --version)"

setup() {
    ferry keygen --identity "$T/id-src" >/dev/null && ferry keygen --identity "$T/id-dst" >/dev/null || return 1
    FP_SRC=$(ferry fingerprint --identity "$T/id-src")
    FP_DST=$(ferry fingerprint --identity "$T/id-dst")
    ferry serve --disk "$SRC" --listen 127.0.0.1:7700 --identity "$T/id-src" \
        --trust-peer "$FP_DST" --hash-cache none >"$T/serve.log" 2>&1 &
    wait_for 120 grep -q '^ferry serve: exporting' "$T/serve.log" || return 1
    ferry pull --source 127.0.0.1:7700 --disk "$DISK" --control "$CTL" \
        --identity "$T/id-dst" --trust-peer "$FP_SRC" \
        --ublk --ublk-id 0 --queues "$QUEUES" --depth "$DEPTH" >"$T/pull.log" 2>&1 &
    PULL=$!
    wait_for 120 grep -q '^ferry pull: serving /dev/ublkb0' "$T/pull.log" || return 1
    wait_for 10 test -b /dev/ublkb0
}
if ! check bench-ferry-pull-live setup; then
    tail -n 20 "$T/serve.log" "$T/pull.log"
    exit 1
fi

complete() {
    n=0
    while [ $n -lt 600 ]; do
        timeout 20 ferry status --control "$CTL" --json >"$T/status.json" 2>/dev/null &&
            grep -q '"phase":"complete"' "$T/status.json" &&
            grep -q '"verified":"ok"' "$T/status.json" && return 0
        kill -0 "$PULL" || return 1
        sleep 1
        n=$((n + 1))
    done
    return 1
}
# How the device moves data: user_copy=true and flags with 0x80
# (UBLK_F_USER_COPY) mean one copy per read, else per-tag buffers.
info ublk_data_path "$(grep 'ublk device set up' "$T/pull.log" | tail -n 1 |
    sed -n 's/.*\(user_copy=[a-z]*\).* \(flags=0x[0-9a-f]*\).*/\1, \2/p')"
t0=$(cut -d' ' -f1 /proc/uptime)
if ! check bench-copy-complete-verified complete; then
    cat "$T/status.json"
    tail -n 20 "$T/pull.log"
    exit 1
fi
t1=$(cut -d' ' -f1 /proc/uptime)
info copy "$SIZE bytes copied and verified in $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}') s"

LOOP=$("$LOSETUP" -r -f --show "$DISK")
check bench-loop-device test -b "$LOOP" || exit 1
same() { cmp /dev/ublkb0 "$LOOP"; }
check bench-devices-hold-the-same-bytes same
DEVS="ublk loop"
if command -v ublk-mem >/dev/null; then
    # A copy of the backing file on the same tmpfs: the pull holds the
    # backing file's lock (a second opener is refused), and the copy's
    # bytes are the same.
    cp "$DISK" "$T/mem.img"
    ublk-mem --size-mib $((SIZE / 1048576)) --dev-id 1 --file "$T/mem.img" >"$T/mem.out" 2>"$T/mem.log" &
    MEM=$!
    if check bench-ublk-mem-file-live wait_for 60 grep -q '^LIVE /dev/ublkb1' "$T/mem.out"; then
        DEVS="ublk loop ublk-mem-file"
    fi
fi

# fio_run DEV NAME RUN ARGS...: one fio run; prints its FERRY-BENCH line.
# Terse output: field 7 is the read bandwidth in KiB/s, field 8 read IOPS.
fio_run() {
    dev=$1
    name=$2
    run=$3
    shift 3
    path=/dev/ublkb0
    [ "$dev" = loop ] && path=$LOOP
    [ "$dev" = ublk-mem-file ] && path=/dev/ublkb1
    out=$(timeout $((RUNTIME + 60)) fio --name="$name" --filename="$path" --readonly \
        --ioengine=libaio --direct=1 --numjobs=1 --time_based --ramp_time=1 \
        --runtime="$RUNTIME" --minimal "$@" 2>"$T/fio.err") || {
        fail "bench-fio-$dev-$name-$run" "fio failed: $(tail -n 2 "$T/fio.err")"
        return 1
    }
    bw=$(echo "$out" | cut -d';' -f7)
    iops=$(echo "$out" | cut -d';' -f8)
    echo "FERRY-BENCH dev=$dev workload=$name run=$run iops=$iops bw_kib=$bw"
}

ok=0
r=1
while [ $r -le "$RUNS" ]; do
    # Alternate which device goes first, so drift does not favour one.
    if [ $((r % 2)) -eq 1 ]; then
        order=$DEVS
    else
        order=$(echo "$DEVS" | tr ' ' '\n' | tac | tr '\n' ' ')
    fi
    for dev in $order; do
        fio_run "$dev" randread-4k-qd32 $r --rw=randread --bs=4k --iodepth=32 || ok=1
    done
    for dev in $order; do
        fio_run "$dev" seqread-1m-qd8 $r --rw=read --bs=1M --iodepth=8 || ok=1
    done
    r=$((r + 1))
done
[ $ok -eq 0 ] && pass bench-fio-runs

still() {
    timeout 20 ferry status --control "$CTL" --json >"$T/status.json" &&
        grep -q '"phase":"complete"' "$T/status.json" && ! grep -q '"error":"' "$T/status.json"
}
check bench-pull-healthy-after still
"$LOSETUP" -d "$LOOP"
if [ -n "$MEM" ]; then
    kill -TERM "$MEM"
    wait "$MEM"
fi
stop() {
    kill -TERM "$PULL" && wait "$PULL"
}
check bench-ferry-pull-stops stop
