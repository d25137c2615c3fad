#!/bin/sh
# vm-test checks for the ublk frontend, driven through the ublk-mem example
# (crates/ferry-ublk/examples/ublk-mem.rs). Run by /init inside the VM.
. "$FERRY_LIB"

MIB=1048576
LOG=/tmp/ublk-mem.log

# start_server NAME ARGS...: starts ublk-mem ARGS in the background and waits
# until it reports its device live; sets PID and DEV.
# OUT is the server's stdout.
start_server() {
    OUT=/tmp/ublk-mem.$1.out
    shift
    : >"$OUT"
    ublk-mem "$@" >"$OUT" 2>>"$LOG" &
    PID=$!
    DEV=
    wait_for 60 grep -q '^LIVE ' "$OUT" || return 1
    DEV=$(sed -n 's/^LIVE //p' "$OUT")
    wait_for 10 test -b "$DEV"
}

# count FIELD: how many requests of kind FIELD (read write fua flush trim
# zeroes) reached the device; ublk-mem prints a STATS line on SIGUSR1.
count() {
    seen=$(grep -c '^STATS ' "$OUT")
    kill -USR1 "$PID"
    wait_for 5 sh -c "[ \$(grep -c '^STATS ' $OUT) -gt $seen ]" || {
        echo "no STATS line from ublk-mem"
        return 1
    }
    grep '^STATS ' "$OUT" | tail -n 1 | tr ' ' '\n' | sed -n "s/^$1=//p"
}

# reaches FIELD CMD...: runs CMD and fails unless it made at least one
# request of kind FIELD reach the device.
reaches() {
    field=$1
    shift
    before=$(count "$field") || return 1
    "$@" || return 1
    after=$(count "$field") || return 1
    [ "$after" -gt "$before" ] 2>/dev/null || {
        echo "no $field request reached the device ($before before, $after after)"
        return 1
    }
}

# stop_server: SIGTERM, wait; fails unless it exits 0 and the device goes.
stop_server() {
    kill -TERM "$PID" || return 1
    wait "$PID" || return 1
    wait_for 10 sh -c "! test -e $DEV"
}

server_log() { tail -n 5 "$LOG" | tr '\n' ' '; }

# is_zero FILE: FILE holds only zero bytes.
is_zero() { cmp -s -n "$(stat -c %s "$1")" "$1" /dev/zero; }

if [ -e /dev/ublk-control ]; then
    pass ublk-driver
else
    fail ublk-driver "/dev/ublk-control does not exist after insmod ublk_drv"
    exit 1
fi

# ---- a 64 MiB memory device ------------------------------------------------
if start_server mem --size-mib 64 --dev-id 0 --queues 2 --depth 32; then
    pass ublk-live
else
    fail ublk-live "ublk-mem did not report a live device: $(server_log)"
    exit 1
fi
NAME=${DEV#/dev/}
# The driver has UBLK_F_USER_COPY (6.12): the device must be created with it.
check ublk-user-copy-in-use user_copy "$LOG" yes

geometry() {
    [ "$(cat /sys/block/$NAME/size)" = $((64 * 2048)) ] &&
        [ "$(cat /sys/block/$NAME/queue/logical_block_size)" = 4096 ]
}
check geometry-64MiB-4k geometry

cache_fua() {
    [ "$(cat /sys/block/$NAME/queue/write_cache)" = "write back" ] &&
        [ "$(cat /sys/block/$NAME/queue/fua)" = 1 ]
}
check write-cache-and-fua cache_fua
check two-queues test -d /sys/block/$NAME/mq/1

head -c $((16 * MIB)) /dev/urandom >/tmp/pattern
check odirect-write dd if=/tmp/pattern of="$DEV" bs=1M count=16 oflag=direct
readback() {
    dd if="$DEV" of=/tmp/readback bs=1M count=16 iflag=direct &&
        cmp /tmp/pattern /tmp/readback
}
check odirect-readback readback

offset_rw() {
    dd if=/tmp/pattern of="$DEV" bs=4k count=100 seek=5000 oflag=direct &&
        dd if="$DEV" of=/tmp/offset bs=4k count=100 skip=5000 iflag=direct &&
        cmp -n $((100 * 4096)) /tmp/pattern /tmp/offset
}
check odirect-offset-4k offset_rw

# Buffered writes, then fsync: the kernel sends FLUSH (start_sector all ones).
check flush-fsync reaches flush dd if=/tmp/pattern of="$DEV" bs=64k count=16 seek=256 conv=fsync
# O_DSYNC direct writes carry FUA on a device that advertises it.
check fua-dsync reaches fua dd if=/tmp/pattern of="$DEV" bs=4k count=16 seek=9000 oflag=direct,dsync

discard() {
    blkdiscard -o $((MIB)) -l $((MIB)) "$DEV" &&
        dd if="$DEV" of=/tmp/discarded bs=1M count=1 skip=1 iflag=direct &&
        is_zero /tmp/discarded
}
check discard reaches trim discard

zeroout() {
    blkdiscard -z -o $((2 * MIB)) -l $((MIB)) "$DEV" &&
        dd if="$DEV" of=/tmp/zeroed bs=1M count=1 skip=2 iflag=direct &&
        is_zero /tmp/zeroed
}
check write-zeroes reaches zeroes zeroout

if command -v fio >/dev/null; then
    CHECK_TIMEOUT=120 check fio-verify-2jobs-qd16 fio --name=verify --filename="$DEV" \
        --rw=randwrite --bs=4k --offset=32M --size=8M --direct=1 --ioengine=libaio \
        --iodepth=16 --numjobs=2 --offset_increment=8M --verify=crc32c --do_verify=1 --verify_fatal=1
else
    skip fio-verify-2jobs-qd16 "fio is not in the initramfs"
fi

ext4() {
    mkdir -p /mnt/ublk &&
        mkfs.ext4 -q -F "$DEV" &&
        mount -t ext4 "$DEV" /mnt/ublk &&
        cp /tmp/pattern /mnt/ublk/file &&
        sync &&
        umount /mnt/ublk &&
        e2fsck -fn "$DEV" &&
        mount -t ext4 -o ro "$DEV" /mnt/ublk &&
        cmp /tmp/pattern /mnt/ublk/file &&
        umount /mnt/ublk
}
CHECK_TIMEOUT=120 check mkfs-mount-fsck ext4

check graceful-stop stop_server

# ---- stopping while a file system is still mounted --------------------------
# The server must exit at once (the file system sees I/O errors), not wait
# in DEL_DEV for the unmount; the id is free again after the unmount.
if start_server mounted --size-mib 32 --dev-id 3; then
    mounted_stop() {
        mkdir -p /mnt/busy && mkfs.ext4 -q -F "$DEV" && mount -t ext4 "$DEV" /mnt/busy &&
            echo data >/mnt/busy/f && sync || return 1
        kill -TERM "$PID"
        n=0
        while kill -0 "$PID" 2>/dev/null && [ $n -lt 75 ]; do
            sleep 0.2
            n=$((n + 1))
        done
        if kill -0 "$PID" 2>/dev/null; then
            echo "ublk-mem still running 15 s after SIGTERM with $DEV mounted"
            umount /mnt/busy
            wait "$PID"
            return 1
        fi
        wait "$PID"
    }
    check stop-while-mounted-exits mounted_stop
    umount /mnt/busy 2>/dev/null
    reuse() {
        start_server reused --size-mib 32 --dev-id 3 && stop_server
    }
    check stop-while-mounted-id-reusable reuse
else
    fail stop-while-mounted-setup "ublk-mem did not come up: $(server_log)"
fi

# ---- device errors reach the reader as EIO; the server keeps serving --------
if start_server faulty --size-mib 16 --dev-id 2 --bad-block 100; then
    read_bad() { ! dd if="$DEV" of=/dev/null bs=4k skip=100 count=1 iflag=direct; }
    check device-error-fails-read read_bad
    read_good() { dd if="$DEV" of=/dev/null bs=4k skip=101 count=1 iflag=direct; }
    check device-error-spares-the-rest read_good
    check device-error-graceful-stop stop_server
else
    fail device-error-setup "ublk-mem --bad-block did not come up: $(server_log)"
fi

# ---- crash and recovery on a file-backed device ----------------------------
# The backing file outlives the server, so data written before the crash must
# read back after recovery.
BACKING=/tmp/backing.img
if ! start_server file --size-mib 64 --dev-id 1 --file "$BACKING"; then
    fail recovery-setup "ublk-mem --file did not come up: $(server_log)"
    exit 0
fi
dd if=/tmp/pattern of="$DEV" bs=1M count=16 oflag=direct 2>/dev/null
kill -9 "$PID"
wait "$PID" 2>/dev/null
# The device stays (quiesced), its I/O held until a new server recovers it.
check crash-keeps-device test -b "$DEV"
dd if="$DEV" of=/tmp/during bs=1M count=4 iflag=direct 2>/dev/null &
HELD=$!

if start_server recovered --size-mib 64 --dev-id 1 --file "$BACKING" --recover --no-user-copy; then
    pass recover
else
    fail recover "ublk-mem --recover did not come up: $(server_log)"
    kill -9 "$PID" "$HELD" 2>/dev/null
    exit 0
fi
held_io() {
    i=0
    while kill -0 "$HELD" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
    wait "$HELD" && cmp -n $((4 * MIB)) /tmp/pattern /tmp/during
}
check io-held-across-crash held_io
# Created with user copy, recovered by a server asked for buffers: the
# device's mode wins.
check recover-keeps-user-copy user_copy "$LOG" yes
check recover-keeps-data readback
check recover-serves-io offset_rw
check recover-graceful-stop stop_server


# ---- the buffer path (no user copy), and recovery keeping the device's mode --
# A device created with --no-user-copy serves through per-tag buffers; a
# server recovering it without the flag must keep that mode (the driver
# refuses the other), and vice versa.
BUFFERED=/tmp/buffered.img
if start_server buffered --size-mib 64 --dev-id 4 --file "$BUFFERED" --no-user-copy; then
    check ublk-buffers-no-user-copy user_copy "$LOG" no
    turned_off() { grep -q 'UBLK_F_USER_COPY turned off' "$LOG"; }
    check ublk-buffers-reason-logged turned_off
    check ublk-buffers-odirect-write dd if=/tmp/pattern of="$DEV" bs=1M count=16 oflag=direct
    check ublk-buffers-readback readback
    check ublk-buffers-offset-4k offset_rw
    if command -v fio >/dev/null; then
        CHECK_TIMEOUT=120 check ublk-buffers-fio-verify fio --name=verify --filename="$DEV" \
            --rw=randwrite --bs=64k --size=16M --direct=1 --ioengine=libaio --iodepth=8 \
            --verify=crc32c --do_verify=1 --verify_fatal=1
    else
        skip ublk-buffers-fio-verify "fio is not in the initramfs"
    fi
    dd if=/tmp/pattern of="$DEV" bs=1M count=16 oflag=direct 2>/dev/null
    kill -9 "$PID"
    wait "$PID" 2>/dev/null
    if start_server buffered-recovered --size-mib 64 --dev-id 4 --file "$BUFFERED" --recover; then
        check ublk-buffers-recovered-keeps-mode user_copy "$LOG" no
        check ublk-buffers-recovered-data readback
        check ublk-buffers-recovered-stop stop_server
    else
        fail ublk-buffers-recover "ublk-mem --recover of a buffered device did not come up: $(server_log)"
        kill -9 "$PID" 2>/dev/null
    fi
else
    fail ublk-buffers-setup "ublk-mem --no-user-copy did not come up: $(server_log)"
fi

echo "---- last lines of the ublk-mem log ($LOG)"
tail -n 30 "$LOG"
