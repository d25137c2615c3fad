#!/bin/sh
# vm-test checks for `ferry pull --precopy --ublk` (issue 26): pre-copy from
# a live source onto /dev/ublkbN, which exists from the start but answers no
# I/O until `ferry switchover` (docs/decisions/ublk-precopy-device-dark.md).
# Run by /init inside the VM (see xtask/src/vm.rs); alone with
#   cargo xtask vm-test --checks scripts/vm/checks-precopy.sh
#
# The source VM is played by qemu-io: `ferry serve --present unix:SOCK`
# presents a writable copy of the ferry-src-raw image (32 MiB, random data
# with a zero hole at 8..24 MiB) over NBD, and a deterministic writer writes
# batches of 64 KiB blocks at random aligned offsets with random patterns
# through it while `ferry pull --precopy --ublk --ublk-id 0` copies (rate
# limited, so the writes land in chunks already copied too). During the
# pre-copy every read or write of /dev/ublkb0 must fail, and none may reach
# the source. The writer stops (the freeze), `ferry switchover`; then
# /dev/ublkb0 reads as the frozen source, byte for byte, and so does the
# backing file once verified.
. "$FERRY_LIB"

export NO_COLOR=1
MIB=1048576
DD=/usr/bin/dd
T=/tmp/ferry-precopy
PORT=7800
mkdir -p "$T"
PULL=
SERVE=
WRITER=
CTL=$T/pull.ctl
SOCK=$T/vm.sock
SRC=$T/src.img
DISK=$T/dst.img
DEV=/dev/ublkb0

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "ferry-precopy [$(now)] $*"; }

drive_with_serial() {
    for s in /sys/block/vd*/serial; do
        [ -e "$s" ] || continue
        if [ "$(cat "$s")" = "$1" ]; then
            d=${s%/serial}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

# field NAME: NAME's value in the last `ferry status --json` ($T/status.json).
field() {
    tr ',{}' '\n\n\n' <"$T/status.json" | sed -n "s/^\"$1\"://p" | tr -d '"'
}

status() {
    timeout 20 ferry status --control "$CTL" --json >"$T/status.json" 2>"$T/status.err"
    rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ]
}

# wait_line FILE PATTERN PID: until FILE has a line matching PATTERN (90 s),
# while PID runs.
wait_line() {
    n=0
    while ! grep -q "$2" "$1"; do
        kill -0 "$3" 2>/dev/null || {
            echo "exited: $(tail -n 5 "$1")"
            return 1
        }
        [ $n -lt 450 ] || {
            echo "no '$2' after 90 s: $(tail -n 5 "$1")"
            return 1
        }
        sleep 0.2
        n=$((n + 1))
    done
}

cleanup() {
    touch "$T/stop-writer"
    [ -n "$WRITER" ] && kill -9 "$WRITER" 2>/dev/null
    [ -n "$PULL" ] && kill -TERM "$PULL" 2>/dev/null && wait "$PULL" 2>/dev/null
    [ -n "$SERVE" ] && kill -TERM "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null
    PULL=
    SERVE=
    WRITER=
}

# ---- set-up ------------------------------------------------------------------
if [ ! -e /dev/ublk-control ]; then
    fail precopy-ublk-driver "/dev/ublk-control does not exist after insmod ublk_drv"
    exit 1
fi
if [ -e /dev/ublkc0 ]; then
    fail precopy-ublk0-free "/dev/ublkc0 exists before the pre-copy checks (left by an earlier script)"
    exit 1
fi
if ! command -v qemu-io >/dev/null; then
    fail precopy-qemu-io "no qemu-io in the VM (the writer playing the source VM)"
    exit 1
fi
RAW=$(drive_with_serial ferry-src-raw)
setup() {
    [ -b "$RAW" ] && "$DD" if="$RAW" of="$SRC" bs=1M status=none &&
        ferry keygen --identity "$T/id-src" >/dev/null &&
        ferry keygen --identity "$T/id-dst" >/dev/null &&
        FP_SRC=$(ferry fingerprint --identity "$T/id-src") &&
        FP_DST=$(ferry fingerprint --identity "$T/id-dst")
}
check precopy-setup setup || exit 1
SIZE=$(blockdev --getsize64 "$RAW")

# ---- the source: presented to its VM, the VM writing ------------------------
serve() {
    SOUT=$T/serve.log
    ferry serve --disk "$SRC" --listen "127.0.0.1:$PORT" --identity "$T/id-src" \
        --trust-peer "$FP_DST" --present "unix:$SOCK" >"$SOUT" 2>&1 &
    SERVE=$!
    wait_line "$SOUT" '^ferry serve: presenting' "$SERVE"
}
check precopy-serve-present serve || {
    cleanup
    exit 1
}

# writer: batches of 16 writes of 64 KiB at random 64 KiB-aligned offsets,
# random patterns (a fixed-seed LCG: the same run each time), one qemu-io
# per batch, until $T/stop-writer exists (at most 400 batches). Batches
# done: $T/batches. A failed batch is recorded in $T/writer.err.
writer() {
    seed=20261207
    b=0
    while [ ! -e "$T/stop-writer" ] && [ $b -lt 400 ]; do
        set --
        i=0
        while [ $i -lt 16 ]; do
            seed=$(((seed * 1103515245 + 12345) % 2147483648))
            off=$(((seed / 65536) % (SIZE / 65536) * 65536))
            seed=$(((seed * 1103515245 + 12345) % 2147483648))
            pat=$((1 + (seed / 65536) % 250))
            set -- "$@" -c "write -P $pat $off 65536"
            i=$((i + 1))
        done
        timeout 60 qemu-io --image-opts "driver=nbd,server.type=unix,server.path=$SOCK" "$@" \
            >/dev/null 2>>"$T/writer.err" || {
            echo "batch $b failed" >>"$T/writer.err"
            return 1
        }
        b=$((b + 1))
        echo $b >"$T/batches"
        sleep 0.1
    done
}
batches() { cat "$T/batches" 2>/dev/null || echo 0; }
rm -f "$T/stop-writer"
: >"$T/writer.err"
echo 0 >"$T/batches"

# ---- the destination: pre-copy onto /dev/ublkb0 -----------------------------
pull() {
    POUT=$T/pull.log
    ferry pull --source "127.0.0.1:$PORT" --identity "$T/id-dst" --trust-peer "$FP_SRC" \
        --control "$CTL" --disk "$DISK" --ublk --ublk-id 0 --precopy --rate 2M >"$POUT" 2>&1 &
    PULL=$!
    wait_line "$POUT" '^ferry pull: pre-copying' "$PULL" &&
        grep -q "^ferry pull: $DEV added" "$POUT" &&
        wait_for 10 test -b "$DEV" &&
        [ "$(blockdev --getsize64 "$DEV")" = "$SIZE" ]
}
if ! check precopy-ublk-device-added-before-the-switch pull; then
    cleanup
    exit 1
fi
writer &
WRITER=$!
log "writer started"

# Dark: every request fails (O_DIRECT and buffered reads, a write), none
# reaches the source, the pull says it pre-copies.
dark() {
    if "$DD" if="$DEV" of="$T/got" bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
        echo "an O_DIRECT read of $DEV succeeded during the pre-copy"
        return 1
    fi
    if "$DD" if="$DEV" of="$T/got" bs=65536 skip=100 count=1 status=none 2>/dev/null; then
        echo "a buffered read of $DEV succeeded during the pre-copy"
        return 1
    fi
    if "$DD" if=/dev/zero of="$DEV" bs=4096 seek=3 count=1 oflag=direct conv=notrunc \
        status=none 2>/dev/null; then
        echo "a write to $DEV succeeded during the pre-copy"
        return 1
    fi
    status && [ "$(field precopy)" = copying ] && [ "$(field fetched_on_demand_bytes)" = 0 ] || {
        echo "status: $(cat "$T/status.json")"
        return 1
    }
}
check precopy-ublk-dark-before-the-switch dark

# elapsed SINCE: whole seconds of uptime since SINCE (from `now`).
elapsed() { awk -v s="$1" -v t="$(now)" 'BEGIN { printf "%d", t - s }'; }

# Pre-copy under writes: change rounds applied while data is copied (at
# most 240 s of the VM's time; progress logged every few tries).
rounds() {
    t0=$(now)
    n=0
    while [ "$(elapsed "$t0")" -lt 240 ]; do
        if status; then
            [ $((n % 5)) -eq 0 ] &&
                log "batches $(batches), generation $(field precopy_generation), present $(field present_bytes)"
            if [ "$(batches)" -ge 5 ] && [ "$(field precopy_generation)" -ge 2 ] &&
                [ "$(field present_bytes)" -gt $((12 * MIB)) ]; then
                return 0
            fi
        else
            log "status failed: $(cat "$T/status.err")"
        fi
        [ -s "$T/writer.err" ] && break
        kill -0 "$PULL" 2>/dev/null || break
        sleep 1
        n=$((n + 1))
    done
    echo "batches $(batches), status $(cat "$T/status.json"), writer: $(tail -n 2 "$T/writer.err"), pull: $(tail -n 2 "$POUT")"
    return 1
}
check precopy-ublk-rounds-while-the-vm-writes rounds
# Still dark, the rounds applied or not.
check precopy-ublk-still-dark dark

# The freeze: the writer stops (its batch in flight completes).
freeze() {
    touch "$T/stop-writer"
    wait "$WRITER"
    rc=$?
    WRITER=
    [ $rc -eq 0 ] && [ ! -s "$T/writer.err" ] || {
        echo "writer exit $rc: $(cat "$T/writer.err")"
        return 1
    }
    log "the writer stopped after $(batches) batches"
}
check precopy-writer-stops freeze

switch() {
    timeout 30 ferry switchover --control "$CTL" >"$T/switch.json" 2>"$T/switch.err" || {
        echo "switchover failed: $(cat "$T/switch.json" "$T/switch.err")"
        return 1
    }
    grep -q '"ok":true' "$T/switch.json" && grep -q '"switchover_ms":[0-9]' "$T/switch.json" &&
        grep -q "^ferry pull: serving $DEV" "$POUT" || {
        echo "reply: $(cat "$T/switch.json"); pull: $(tail -n 3 "$POUT")"
        return 1
    }
    log "switchover: $(cat "$T/switch.json")"
}
check precopy-ublk-switchover switch

# The device is the frozen source: a buffered read of a block read (and
# refused) before the switch, then the whole device with O_DIRECT.
equal() {
    "$DD" if="$DEV" of="$T/got" bs=65536 skip=100 count=1 status=none &&
        "$DD" if="$SRC" of="$T/want" bs=65536 skip=100 count=1 status=none &&
        cmp "$T/got" "$T/want" &&
        timeout 120 "$DD" if="$DEV" of="$T/got" bs=1M iflag=direct status=none &&
        cmp "$T/got" "$SRC"
}
check precopy-ublk-device-equals-the-source equal
# The VM wrote into chunks already copied (made stale, fetched again): the
# check above covered the marking, not only chunks copied after the writes.
went_stale() {
    n=$(sed -n 's/.*changes applied.*stale_chunks=\([0-9]*\).*/\1/p' "$POUT" |
        awk '{ n += $1 } END { print n + 0 }')
    log "chunks made stale by the VM's writes: $n"
    [ "$n" -gt 0 ]
}
check precopy-ublk-copied-chunks-went-stale went_stale
rm -f "$T/got" "$T/want"

switched() {
    status && [ "$(field precopy)" = switched ] && [ -n "$(field switchover_ms)" ] &&
        [ "$(field switchover_ms)" != null ] || {
        echo "status: $(cat "$T/status.json")"
        return 1
    }
    timeout 20 ferry status --control "$CTL" | grep -q 'switched over in'
}
check precopy-ublk-status-switched switched

# wait_verified SECS: until the pull reports phase complete, verified ok.
wait_verified() {
    t0=$(now)
    while [ "$(elapsed "$t0")" -lt "$1" ]; do
        if status && [ "$(field phase)" = complete ] && [ "$(field verified)" = ok ]; then
            return 0
        fi
        [ "$(field phase)" = error ] && break
        sleep 1
    done
    echo "not verified: $(cat "$T/status.json")"
    return 1
}
check precopy-ublk-verified wait_verified 150

stop() {
    kill -TERM "$PULL" || return 1
    wait "$PULL"
    rc=$?
    PULL=
    [ $rc -eq 0 ] && wait_for 10 sh -c "! test -e $DEV" || {
        echo "ferry pull exited $rc: $(tail -n 3 "$POUT")"
        return 1
    }
}
check precopy-ublk-graceful-stop stop
check precopy-backing-file-equals-the-source cmp "$DISK" "$SRC"
cleanup

for f in "$T"/serve.log "$T"/pull.log; do
    [ -e "$f" ] || continue
    echo "---- last lines of $f"
    tail -n 12 "$f"
done
