#!/bin/sh
# vm-test checks for `ferry pull --ublk` on the real ublk driver, with the
# real `ferry` binary: `ferry serve` and `ferry pull` both run in the VM and
# talk QUIC over loopback. Run by /init inside the VM (see xtask/src/vm.rs).
#
# Source images are virtio disks that the harness prepares on the host and
# attaches with a serial number (found here through /sys/block/vd*/serial):
#   ferry-src-raw   32 MiB random data, zero at 8..24 MiB (raw scenarios)
#   ferry-src-ext4  an ext4 file system holding known files; their SHA-256
#                   list is /ferry/files/ext4.sha256 (paths relative to its root)
#
# Scenarios (issue 3's acceptance), each on /dev/ublkb0:
#   raw   background held back: O_DIRECT reads of untouched regions return
#         the source's bytes, patterned writes read back; after completion
#         the destination image is the source plus those writes.
#   ext4  mounted from /dev/ublkb0 during the copy: files checked, new files
#         written and synced; after completion e2fsck -fn is clean and the
#         new files are in the image. Served on the buffer path
#         (--ublk-no-user-copy); the other scenarios use UBLK_F_USER_COPY.
#   kill9 kill -9 of `ferry pull` under a writer that fsyncs every record,
#         then `ferry pull --ublk --ublk-id 0` again: the writer sees no I/O
#         error, every write acknowledged by fsync is in the final image.
#   pc    the backing file on ext4 on a ublk-mem disk that can hold its
#         reads, copied to the end, then dropped from the page cache: O_DIRECT
#         reads of present blocks go to the queue's io_uring and return the
#         source's bytes; a held read does not stall a read of a block in
#         the page cache.
. "$FERRY_LIB"

export NO_COLOR=1
MIB=1048576
# busybox may run its own applets first: name the GNU/util-linux tools.
DD=/usr/bin/dd
LOSETUP=/usr/sbin/losetup
T=/tmp/ferry
PORT=7700
mkdir -p "$T"
PULL=
SERVE=
WRITER=

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "ferry-checks [$(now)] $*"; }

# drive_with_serial SERIAL: prints /dev/vdX of the virtio disk with SERIAL.
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

# status: refreshes $T/status.json from the running pull's control socket
# (`ferry status` exits 2 when the pull reports phase error: still a status).
status() {
    timeout 20 ferry status --control "$CTL" --json >"$T/status.json" 2>"$T/status.err"
    rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ]
}

# wait_complete SECS: until the pull reports phase complete, verified ok.
wait_complete() {
    n=$1
    while [ "$n" -gt 0 ]; do
        if status; then
            phase=$(field phase)
            verified=$(field verified)
            [ "$phase" = complete ] && [ "$verified" = ok ] && return 0
            if [ "$phase" = error ] || [ "$verified" = failed ]; then
                echo "pull failed: $(cat "$T/status.json")"
                return 1
            fi
        fi
        if ! kill -0 "$PULL" 2>/dev/null; then
            echo "ferry pull exited: $(tail -n 3 "$POUT")"
            return 1
        fi
        sleep 1
        n=$((n - 1))
    done
    echo "not complete after $1 s: $(cat "$T/status.json")"
    return 1
}

# start_pull TAG ARGS...: `ferry pull --ublk --ublk-id 0 ARGS` in the
# background; waits until it prints `serving /dev/ublkbN`. Sets PULL (its
# pid), POUT (its output), DEV.
start_pull() {
    POUT=$T/pull-$1.log
    shift
    : >"$POUT"
    ferry pull --source "127.0.0.1:$PORT" --identity "$T/id-dst" --trust-peer "$FP_SRC" \
        --control "$CTL" --ublk --ublk-id 0 "$@" >>"$POUT" 2>&1 &
    PULL=$!
    DEV=
    n=0
    while ! grep -q '^ferry pull: serving /dev/ublkb' "$POUT"; do
        kill -0 "$PULL" 2>/dev/null || {
            echo "ferry pull exited: $(tail -n 5 "$POUT")"
            return 1
        }
        [ $n -lt 450 ] || {
            echo "no 'serving' line after 90 s: $(tail -n 5 "$POUT")"
            return 1
        }
        sleep 0.2
        n=$((n + 1))
    done
    DEV=$(sed -n 's/^ferry pull: serving \(\/dev\/ublkb[0-9]*\) .*/\1/p' "$POUT" | tail -n 1)
    [ "$DEV" = /dev/ublkb0 ] || {
        echo "serving $DEV, not /dev/ublkb0"
        return 1
    }
    wait_for 10 test -b "$DEV"
}

# stop_pull: SIGTERM; the pull must exit 0 and its device go away.
stop_pull() {
    kill -TERM "$PULL" || return 1
    n=0
    while kill -0 "$PULL" 2>/dev/null && [ $n -lt 300 ]; do
        sleep 0.2
        n=$((n + 1))
    done
    if kill -0 "$PULL" 2>/dev/null; then
        echo "ferry pull still running 60 s after SIGTERM"
        kill -9 "$PULL"
        return 1
    fi
    wait "$PULL"
    rc=$?
    PULL=
    [ $rc -eq 0 ] || {
        echo "ferry pull exited $rc: $(tail -n 3 "$POUT")"
        return 1
    }
    wait_for 10 sh -c '! test -e /dev/ublkb0 && ! test -e /dev/ublkc0'
}

# start_serve DISK: `ferry serve` of DISK on 127.0.0.1:$PORT. Sets SERVE.
start_serve() {
    SOUT=$T/serve-$PORT.log
    ferry serve --disk "$1" --listen "127.0.0.1:$PORT" --identity "$T/id-src" \
        --trust-peer "$FP_DST" --hash-cache none >"$SOUT" 2>&1 &
    SERVE=$!
    n=0
    while ! grep -q '^ferry serve: exporting' "$SOUT"; do
        kill -0 "$SERVE" 2>/dev/null || {
            echo "ferry serve exited: $(tail -n 5 "$SOUT")"
            return 1
        }
        [ $n -lt 300 ] || return 1
        sleep 0.2
        n=$((n + 1))
    done
}

stop_serve() {
    [ -n "$SERVE" ] && kill -TERM "$SERVE" 2>/dev/null && wait "$SERVE" 2>/dev/null
    SERVE=
}

# A scenario that cannot start leaves nothing running for the next one.
cleanup() {
    [ -n "$WRITER" ] && kill -9 "$WRITER" 2>/dev/null
    [ -n "$PULL" ] && kill -9 "$PULL" 2>/dev/null
    PULL=
    WRITER=
    stop_serve
    umount /mnt/ferry 2>/dev/null
    # A device a killed pull left behind would block /dev/ublkb0 for the
    # next scenario: recover and stop it.
    if [ -e /dev/ublkc0 ] && [ -n "$DISK" ] && [ -n "$SRC" ]; then
        start_serve "$SRC" >/dev/null 2>&1 &&
            start_pull cleanup --disk "$DISK" >/dev/null 2>&1 &&
            stop_pull >/dev/null 2>&1
        stop_serve
    fi
    PORT=$((PORT + 1))
}

# region DEV OFFSET LEN OUT: O_DIRECT read of LEN bytes at OFFSET (both
# multiples of 4 KiB) into OUT.
region() {
    timeout 60 "$DD" if="$1" of="$4" bs=1M skip="$2" count="$3" \
        iflag=direct,skip_bytes,count_bytes status=none
}

# same_region OFFSET LEN: /dev/ublkb0 and the source agree on the region.
same_region() {
    region "$DEV" "$1" "$2" "$T/got" && region "$SRC" "$1" "$2" "$T/want" &&
        cmp "$T/got" "$T/want"
}

# put PATTERN_OFFSET DEV_OFFSET LEN: O_DIRECT write of LEN bytes of the
# pattern file at PATTERN_OFFSET to DEV_OFFSET, and the same into the
# expected image $T/expected.
put() {
    timeout 60 "$DD" if="$T/pattern" of="$DEV" bs=4096 skip=$(($1 / 4096)) seek=$(($2 / 4096)) \
        count=$(($3 / 4096)) oflag=direct conv=notrunc status=none &&
        dd if="$T/pattern" of="$T/expected" bs=4096 skip=$(($1 / 4096)) seek=$(($2 / 4096)) \
            count=$(($3 / 4096)) conv=notrunc status=none
}

# got_expected OFFSET LEN: /dev/ublkb0 holds $T/expected's bytes there.
got_expected() {
    region "$DEV" "$1" "$2" "$T/got" &&
        dd if="$T/expected" of="$T/want" bs=4096 skip=$(($1 / 4096)) count=$(($2 / 4096)) \
            status=none &&
        cmp "$T/got" "$T/want"
}

# ---- driver and set-up -------------------------------------------------------
if [ -e /dev/ublk-control ]; then
    pass ferry-ublk-driver
else
    fail ferry-ublk-driver "/dev/ublk-control does not exist after insmod ublk_drv"
    exit 1
fi
if [ -e /dev/ublkc0 ]; then
    fail ferry-ublk0-free "/dev/ublkc0 exists before the ferry checks (left by an earlier script)"
    exit 1
fi

RAW=$(drive_with_serial ferry-src-raw)
EXT4=$(drive_with_serial ferry-src-ext4)
if [ -b "$RAW" ] && [ -b "$EXT4" ]; then
    pass ferry-source-drives
else
    fail ferry-source-drives "no virtio disks with serials ferry-src-raw/ferry-src-ext4 ($(grep -H . /sys/block/*/serial 2>&1))"
    exit 1
fi

keys() {
    ferry keygen --identity "$T/id-src" >/dev/null &&
        ferry keygen --identity "$T/id-dst" >/dev/null &&
        FP_SRC=$(ferry fingerprint --identity "$T/id-src") &&
        FP_DST=$(ferry fingerprint --identity "$T/id-dst") &&
        [ ${#FP_SRC} -eq 64 ] && [ ${#FP_DST} -eq 64 ]
}
check ferry-keygen keys || exit 1

# ---- raw: reads and writes during the copy, with the background held -------
log "raw scenario: source $RAW"
SRC=$RAW
DISK=$T/raw.img
CTL=$T/raw.ctl
SIZE=$(blockdev --getsize64 "$RAW")
head -c $((4 * MIB)) /dev/urandom >"$T/pattern"
# The expected final image: the source, plus every write made below.
dd if="$RAW" of="$T/expected" bs=1M status=none

if check ferry-serve start_serve "$RAW" &&
    check ferry-pull-ublk-live start_pull raw --disk "$DISK" --hold-background; then
    geometry() {
        [ "$(blockdev --getsize64 "$DEV")" = "$SIZE" ] &&
            [ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 4096 ]
    }
    check ferry-geometry geometry
    # The driver has UBLK_F_USER_COPY: reads of present blocks cost one copy.
    check ferry-ublk-user-copy user_copy "$POUT" yes
    held() {
        status && [ "$(field phase)" = copying ] && [ "$(field background)" = paused ] &&
            [ "$(field fetched_background_bytes)" = 0 ] && [ "$(field present_at_start_bytes)" = 0 ]
    }
    check ferry-background-held held

    # Untouched regions: the first chunk, one mid-data, inside the source's
    # zero hole (8..24 MiB), straddling the hole's end, the last 64 KiB.
    untouched() {
        same_region 0 65536 &&
            same_region $((5 * MIB + 12288)) $((300 * 1024)) &&
            same_region $((9 * MIB)) $((256 * 1024)) &&
            same_region $((24 * MIB - 131072)) 262144 &&
            same_region $((SIZE - 65536)) 65536
    }
    check ferry-odirect-reads-untouched untouched

    # Writes: one block inside an absent chunk; 1 MiB across chunk
    # boundaries at an odd block; into the zero hole; the last block.
    writes() {
        put 0 $((2 * MIB + 8192)) 4096 &&
            put 65536 $((3 * MIB + 20480)) $MIB &&
            put $((2 * MIB)) $((12 * MIB + 4096)) 8192 &&
            put $((3 * MIB)) $((SIZE - 4096)) 4096 &&
            got_expected $((2 * MIB + 8192)) 4096 &&
            got_expected $((3 * MIB + 20480)) $MIB &&
            got_expected $((12 * MIB + 4096)) 8192 &&
            got_expected $((SIZE - 4096)) 4096
    }
    check ferry-patterned-writes-read-back writes
    # The rest of each written chunk still comes from the source.
    neighbours() {
        got_expected $((2 * MIB)) 65536 &&
            got_expected $((3 * MIB)) $((2 * MIB)) &&
            got_expected $((12 * MIB)) 65536 &&
            got_expected $((SIZE - 65536)) 65536
    }
    check ferry-writes-keep-chunk-neighbours neighbours
    on_demand() {
        status && [ "$(field fetched_on_demand_bytes)" -gt 0 ] &&
            [ "$(field fetched_background_bytes)" = 0 ] && [ "$(field phase)" = copying ]
    }
    check ferry-on-demand-only-while-held on_demand

    release() {
        timeout 20 ferry background --control "$CTL" resume && wait_complete 150
    }
    check ferry-background-completes-verified release
    whole() {
        region "$DEV" 0 "$SIZE" "$T/got" && cmp "$T/got" "$T/expected"
    }
    check ferry-device-reads-source-plus-writes whole
    rm -f "$T/got" "$T/want"
    check ferry-graceful-stop stop_pull
    check ferry-image-is-source-plus-writes cmp "$DISK" "$T/expected"
else
    fail ferry-raw-scenario "did not start; see the logs below"
fi
cleanup
rm -f "$DISK" "$DISK.ferry-state" "$T/expected"

# ---- ext4: a real file system, mounted during the copy ----------------------
log "ext4 scenario: source $EXT4"
SRC=$EXT4
DISK=$T/ext4.img
CTL=$T/ext4.ctl
SIZE=$(blockdev --getsize64 "$EXT4")
MNT=/mnt/ferry
mkdir -p "$MNT"
if check ferry-ext4-serve start_serve "$EXT4" &&
    check ferry-ext4-pull-live start_pull ext4 --disk "$DISK" --hold-background --ublk-no-user-copy; then
    # This scenario runs on the buffer path (the fallback without user copy).
    check ferry-ext4-buffer-path user_copy "$POUT" no
    check ferry-ext4-mount-during-copy timeout 120 mount -t ext4 "$DEV" "$MNT"
    # No `timeout` inside a `cd $MNT`: busybox timeout leaves a watcher
    # process (cwd $MNT) for up to a second, which makes umount fail EBUSY.
    files_match() { (cd "$MNT" && sha256sum -c -s /ferry/files/ext4.sha256); }
    check ferry-ext4-files-match files_match
    write_new() {
        mkdir -p "$MNT/new/sub" &&
            head -c $((3 * MIB + 777)) /dev/urandom >"$MNT/new/sub/random.bin" &&
            echo "written through /dev/ublkb0 during the copy" >"$MNT/new/hello.txt" &&
            timeout 60 "$DD" if=/dev/urandom of="$MNT/new/direct.bin" bs=64k count=16 \
                oflag=direct status=none &&
            (cd "$MNT" && sha256sum ./new/sub/random.bin ./new/hello.txt ./new/direct.bin) \
                >"$T/new.sha256" &&
            timeout 60 sync
    }
    check ferry-ext4-write-new-files-sync write_new
    unmount() { wait_for 20 umount "$MNT" || umount "$MNT"; }
    check ferry-ext4-umount unmount
    fetched() { status && [ "$(field fetched_background_bytes)" = 0 ] && [ "$(field phase)" = copying ]; }
    check ferry-ext4-still-copying-on-demand fetched
    release() {
        timeout 20 ferry background --control "$CTL" resume && wait_complete 150
    }
    check ferry-ext4-background-completes-verified release
    check ferry-ext4-graceful-stop stop_pull
    check ferry-ext4-fsck-clean timeout 120 e2fsck -fn "$DISK"
    in_image() {
        loopdev=$("$LOSETUP" -r -f --show "$DISK") || return 1
        ok=1
        if timeout 60 mount -t ext4 -o ro "$loopdev" "$MNT"; then
            (cd "$MNT" && sha256sum -c -s /ferry/files/ext4.sha256 && sha256sum -c -s "$T/new.sha256") &&
                ok=0
            umount "$MNT"
        fi
        "$LOSETUP" -d "$loopdev"
        return $ok
    }
    check ferry-ext4-old-and-new-files-in-image in_image
else
    fail ferry-ext4-scenario "did not start; see the logs below"
fi
cleanup
rm -f "$DISK" "$DISK.ferry-state"

# ---- kill9: kill -9 under a fsyncing writer, then recovery ------------------
log "kill9 scenario: source $RAW"
SRC=$RAW
DISK=$T/kill9.img
CTL=$T/kill9.ctl
SIZE=$(blockdev --getsize64 "$RAW")
RECORDS=60
head -c $((RECORDS * 16384)) /dev/urandom >"$T/records"
# record I: 16 KiB at 20 MiB + 4 KiB + I * 164 KiB (crossing the source's
# zero hole into data, some records straddling chunk boundaries).
rec_block() { echo $((5120 + 1 + $1 * 41)); }
# The writer: one buffered 16 KiB write + fsync per record (GNU dd
# conv=fsync); a record is acknowledged (appended to $T/acked) only after
# its fsync returned. Any failure is recorded in $T/writer.err. It writes
# record positions 0..RECORDS-1 round and round until told to stop (the
# file $T/stop-writer; at most 5000 writes), so it is still running when
# the pull is killed and while it recovers, however slow the machine is.
writer() {
    i=0
    while [ ! -e "$T/stop-writer" ] && [ $i -lt 5000 ]; do
        j=$((i % RECORDS))
        start=$(now)
        if timeout 120 "$DD" if="$T/records" of="$DEV" bs=4096 skip=$((j * 4)) \
            seek="$(rec_block $j)" count=4 conv=notrunc,fsync status=none 2>>"$T/writer.err"; then
            echo $j >>"$T/acked"
            echo "$j $start $(now)" >>"$T/acked-times"
        else
            echo "record $j (write $i): dd failed at $(now)" >>"$T/writer.err"
            return 1
        fi
        i=$((i + 1))
        sleep 0.05
    done
}
rm -f "$T/stop-writer"
: >"$T/acked"
# Only this scenario's kernel messages count.
dmesg -c >/dev/null
: >"$T/acked-times"
: >"$T/writer.err"
acked() { wc -l <"$T/acked"; }

if check ferry-kill9-serve start_serve "$RAW" &&
    check ferry-kill9-pull-live start_pull kill9-first --disk "$DISK" --hold-background; then
    FIRST_PULL=$PULL
    writer &
    WRITER=$!
    # Let the background copy run, slowly, so the kill lands mid-copy.
    started() {
        wait_for 60 sh -c "[ \$(wc -l <$T/acked) -ge 12 ]" &&
            timeout 20 ferry background --control "$CTL" rate=1000000 &&
            timeout 20 ferry background --control "$CTL" resume &&
            wait_for 30 copying || {
            echo "the background copy did not start: $(cat "$T/status.json")"
            return 1
        }
    }
    copying() {
        status && [ "$(field phase)" = copying ] && [ "$(field fetched_background_bytes)" -gt 0 ]
    }
    check ferry-kill9-writer-and-copy-running started
    kill -9 "$FIRST_PULL"
    wait "$FIRST_PULL" 2>/dev/null
    PULL=
    cp "$T/acked" "$T/acked-at-kill"
    log "killed ferry pull with $(wc -l <"$T/acked-at-kill") records acknowledged"
    sleep 1
    survives() { test -b /dev/ublkb0 && test -c /dev/ublkc0 && kill -0 "$WRITER"; }
    check ferry-kill9-device-and-writer-survive survives
    # Recovery: the same command line, without holding the background.
    RECOVERY_STARTED=$(now)
    check ferry-kill9-recover start_pull kill9-recovered --disk "$DISK"
    check ferry-kill9-recovered-keeps-user-copy user_copy "$POUT" yes
    writer_ok() {
        # Let it write on through the recovered device: at least every
        # record position once, and 5 records after the recovery.
        at_recovery=$(acked)
        n=0
        while kill -0 "$WRITER" 2>/dev/null && [ $n -lt 600 ] &&
            { [ "$(acked)" -lt $RECORDS ] || [ "$(acked)" -lt $((at_recovery + 5)) ]; }; do
            sleep 0.2
            n=$((n + 1))
        done
        touch "$T/stop-writer"
        wait "$WRITER"
        rc=$?
        WRITER=
        [ $rc -eq 0 ] && [ ! -s "$T/writer.err" ] && [ "$(acked)" -ge $RECORDS ] &&
            [ "$(acked)" -ge $((at_recovery + 5)) ] || {
            echo "writer exit $rc, $(acked) acknowledged ($at_recovery at recovery): $(cat "$T/writer.err")"
            return 1
        }
        if dmesg | grep -i 'error' | grep -q ublkb0; then
            echo "kernel logged I/O errors: $(dmesg | grep -i error | grep ublkb0 | tail -n 2)"
            return 1
        fi
    }
    check ferry-kill9-writer-saw-no-io-error writer_ok
    # Some record was in flight while no server ran: it started before the
    # new pull was launched and completed after that (its fsync was held,
    # then answered by the new process).
    held_across() {
        awk -v s="$RECOVERY_STARTED" \
            '$2 < s && $3 > s { held++ } END { if (!held) { print "no record spanned " s; exit 1 } }' \
            "$T/acked-times" || {
            awk -v s="$RECOVERY_STARTED" '$3 > s - 4 && $2 < s + 4' "$T/acked-times" | tr '\n' ','
            return 1
        }
    }
    check ferry-kill9-writes-held-across-recovery held_across
    check ferry-kill9-background-completes-verified wait_complete 150
    check ferry-kill9-graceful-stop stop_pull
    # acked_in_image LIST: every record in LIST is in the destination image.
    acked_in_image() {
        [ -s "$1" ] || return 1
        while read -r i; do
            dd if="$DISK" of="$T/got" bs=4096 skip="$(rec_block "$i")" count=4 status=none &&
                dd if="$T/records" of="$T/want" bs=4096 skip=$((i * 4)) count=4 status=none &&
                cmp -s "$T/got" "$T/want" || {
                echo "record $i is not in the image"
                return 1
            }
        done <"$1"
    }
    check ferry-kill9-fsynced-before-kill-kept acked_in_image "$T/acked-at-kill"
    final() {
        dd if="$RAW" of="$T/expected" bs=1M status=none || return 1
        i=0
        while [ $i -lt $RECORDS ]; do
            dd if="$T/records" of="$T/expected" bs=4096 skip=$((i * 4)) seek="$(rec_block $i)" \
                count=4 conv=notrunc status=none || return 1
            i=$((i + 1))
        done
        cmp "$DISK" "$T/expected"
    }
    check ferry-kill9-image-is-source-plus-all-records final
else
    fail ferry-kill9-scenario "did not start; see the logs below"
fi
cleanup

# ---- pc: present blocks that are not in the page cache -----------------------
# The backing file lies on ext4 on a ublk-mem disk (/dev/ublkb1; tmpfs pages
# cannot be dropped) whose reads can be held (`--hold-reads-while`). After
# `drop_caches` the pull finds present blocks outside the page cache and
# reads them on its queue's io_uring: a held read of one block must not
# stall a read of a block in the page cache, and every read returns the
# source's bytes.
log "page-cache scenario: source $RAW"
SRC=$RAW
PCMNT=/mnt/ferry-pc
PCHOLD=$T/pc-hold-reads
PCMEM=
DISK=$PCMNT/raw.img
CTL=$T/pc.ctl
SIZE=$(blockdev --getsize64 "$RAW")
pc_fs() {
    ublk-mem --size-mib 48 --dev-id 1 --hold-reads-while "$PCHOLD" >"$T/pc-mem.out" 2>"$T/pc-mem.log" &
    PCMEM=$!
    wait_for 60 grep -q '^LIVE /dev/ublkb1' "$T/pc-mem.out" && wait_for 10 test -b /dev/ublkb1 &&
        mkfs.ext4 -q -F -b 4096 /dev/ublkb1 && mkdir -p "$PCMNT" && mount -t ext4 /dev/ublkb1 "$PCMNT"
}
if check ferry-pc-backing-on-ext4 pc_fs &&
    check ferry-pc-serve start_serve "$RAW" &&
    check ferry-pc-pull start_pull pc --disk "$DISK" &&
    check ferry-pc-complete wait_complete 150; then
    check ferry-pc-user-copy user_copy "$POUT" yes
    dropped() { sync && echo 3 >/proc/sys/vm/drop_caches; }
    check ferry-pc-drop-caches dropped
    # Block A is read once (into the page cache again); then, with the
    # disk's reads held, a READ of block B (never read since the drop)
    # waits on the ring while A is read again. Without the ring, B's copy
    # would block the queue thread and A with it, until the hold ends.
    A=$((2 * MIB + 8192))
    B=$((5 * MIB + 65536))
    one_stalls() {
        same_region "$A" 4096 || return 1
        touch "$PCHOLD"
        region "$DEV" "$B" 4096 "$T/got-b" &
        bpid=$!
        apid=
        rc=0
        inflight() { [ "$(awk '{print $1}' /sys/block/ublkb1/inflight)" -gt 0 ]; }
        gone() { ! kill -0 "$1" 2>/dev/null; }
        if ! wait_for 60 inflight; then
            echo "the read of B never reached the held disk"
            rc=1
        else
            # In the background: with B's copy on the queue thread, A's
            # read would wait until the hold ends; the check must say so,
            # not hang with it.
            region "$DEV" "$A" 4096 "$T/got-a" &
            apid=$!
            if ! wait_for 30 gone "$apid"; then
                echo "the read of A (in the page cache) did not complete in 30 s while B was held"
                rc=1
            elif gone "$bpid"; then
                echo "the read of B completed while the disk held its reads"
                rc=1
            fi
        fi
        rm -f "$PCHOLD"
        if [ -n "$apid" ] && ! wait "$apid"; then
            echo "the read of A failed"
            rc=1
        fi
        wait "$bpid" || {
            echo "the read of B failed"
            return 1
        }
        [ $rc -eq 0 ] && region "$SRC" "$B" 4096 "$T/want" && cmp "$T/got-b" "$T/want" &&
            region "$SRC" "$A" 4096 "$T/want" && cmp "$T/got-a" "$T/want"
    }
    check ferry-pc-a-miss-stalls-only-its-request one_stalls
    rm -f "$PCHOLD"
    # Cold reads: one unaligned region, one 1 MiB, the whole device;
    # dropped again, 4 KiB reads across a chunk.
    cold() {
        dropped &&
            same_region $((5 * MIB + 12288)) $((300 * 1024)) &&
            same_region $((20 * MIB)) $MIB &&
            region "$DEV" 0 "$SIZE" "$T/got" && cmp "$T/got" "$RAW" &&
            dropped &&
            for k in 0 1 2 15; do
                same_region $((7 * MIB + k * 4096)) 4096 || return 1
            done
    }
    check ferry-pc-cold-reads-are-the-source cold
    rm -f "$T/got" "$T/want" "$T/got-a" "$T/got-b"
    check ferry-pc-graceful-stop stop_pull
    # The pull's own count: READs that found their range outside the page
    # cache and were read on the ring.
    on_ring() {
        n=$(sed -n 's/.*reads_on_ring=\([0-9]*\).*/\1/p' "$POUT" | tail -n 1)
        [ -n "$n" ] && [ "$n" -gt 0 ] || {
            echo "reads_on_ring='$n': $(grep 'ublk device served' "$POUT")"
            return 1
        }
    }
    check ferry-pc-reads-went-to-the-ring on_ring
else
    fail ferry-pc-scenario "did not start; see the logs below"
fi
rm -f "$PCHOLD"
cleanup
umount "$PCMNT" 2>/dev/null
if [ -n "$PCMEM" ]; then
    kill -TERM "$PCMEM" 2>/dev/null
    wait "$PCMEM"
fi

for f in "$T"/serve-*.log "$T"/pull-*.log; do
    [ -e "$f" ] || continue
    echo "---- last lines of $f"
    tail -n 12 "$f"
done
