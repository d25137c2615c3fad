#!/bin/bash
# CPU cost of one ferry transfer over the emulated WAN, end to end.
#
#   scripts/wan-cpu.sh FERRY_BINARY IMAGE [stat|record]
#
# Brings up its own emulated link (`cargo xtask wan up --name cpu`:
# 200 Mbit/s, 50 ms RTT), runs `ferry serve` in the source namespace and
# `ferry pull` (NBD export on a unix socket, no client) in the destination
# namespace until the pull reports `phase: complete`, and prints the
# elapsed time and each side's user+system CPU seconds (from
# /proc/PID/stat). `stat` adds `perf stat` (task clock, context switches)
# of both processes for 10 s from 5 s in; `record` a `perf record -g` of
# the pull for the same 10 s (pull.perf in the work directory). PERF_AT
# and PERF_FOR change the 5 and 10 s; PERF_OF=serve records the serve
# instead (serve.perf). Needs root
# and, for stat/record, perf. Removes the link and its files at the end,
# also after a failure; stops only the processes it started.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 FERRY_BINARY IMAGE [stat|record]" >&2
    exit 2
fi
F=$(realpath "$1")
IMG=$(realpath "$2")
MODE=${3:-}
# When perf starts and for how long (seconds after the pull starts), and
# which side `record` records.
AT=${PERF_AT:-5}
FOR=${PERF_FOR:-10}
OF=${PERF_OF:-pull}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/ferry-wan-cpu.XXXXXX)
S="ip netns exec ferry-wan-cpu-src"
D="ip netns exec ferry-wan-cpu-dst"
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    (cd "$ROOT" && cargo xtask wan down --name cpu >/dev/null 2>&1) || true
    rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$ROOT" && cargo xtask wan up --name cpu --rate-mbit 200 --rtt-ms 50 >/dev/null)
cd "$WORK"
"$F" keygen --identity s >/dev/null
"$F" keygen --identity d >/dev/null
SF=$("$F" fingerprint --identity s | tail -1)
DF=$("$F" fingerprint --identity d | tail -1)

$S "$F" serve --disk "$IMG" --listen 198.18.0.1:7799 --identity s --trust-peer "$DF" \
    --link-mbit 200 --link-rtt-ms 50 --hash-cache none >serve.log 2>&1 &
SP=$!
PIDS+=("$SP")
# Up once it listens (it hashes the image first).
for _ in $(seq 1 600); do
    grep -q "exporting" serve.log && break
    kill -0 "$SP" 2>/dev/null || { cat serve.log >&2; exit 1; }
    sleep 0.1
done

T0=$(date +%s.%N)
$D "$F" pull --source 198.18.0.1:7799 --disk dst.img --nbd unix:nbd.sock --control ctl.sock \
    --identity d --trust-peer "$SF" --link-mbit 200 --link-rtt-ms 50 >pull.log 2>&1 &
PP=$!
PIDS+=("$PP")
case "$MODE" in
    stat)
        (sleep "$AT"; perf stat -e task-clock,context-switches -p "$PP" -- sleep "$FOR" 2>pull.stat) &
        (sleep "$AT"; perf stat -e task-clock,context-switches -p "$SP" -- sleep "$FOR" 2>serve.stat) &
        ;;
    record)
        if [ "$OF" = serve ]; then RP=$SP; else RP=$PP; fi
        (sleep "$AT"; perf record -F 499 -g -p "$RP" -o "$OLDPWD/$OF.perf" -- sleep "$FOR" >/dev/null 2>&1) &
        ;;
esac

done=no
for _ in $(seq 1 1200); do
    sleep 0.5
    kill -0 "$PP" 2>/dev/null || break
    if "$F" status --control ctl.sock 2>/dev/null | grep -q "phase:.*complete"; then
        done=yes
        break
    fi
done
T1=$(date +%s.%N)
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
if [ "$done" != yes ]; then
    echo "the pull did not complete within 600 s" >&2
    tail -5 pull.log >&2
    exit 1
fi
echo "elapsed $(echo "$T1 - $T0" | bc) s; CPU seconds: serve $(cpu "$SP"), pull $(cpu "$PP")"
wait_perf() { for _ in $(seq 1 100); do [ -s "$1" ] && grep -q elapsed "$1" && return; sleep 0.2; done; }
if [ "$MODE" = stat ]; then
    wait_perf pull.stat
    wait_perf serve.stat
    echo "pull ($FOR s):";  grep -E "task-clock|context-switches" pull.stat || true
    echo "serve ($FOR s):"; grep -E "task-clock|context-switches" serve.stat || true
fi
