# Helpers for vm-test check scripts: `. "$FERRY_LIB"`.
#
# Each check prints exactly one line on the console:
#   FERRY-CHECK PASS <name>
#   FERRY-CHECK FAIL <name>: <reason>

pass() { echo "FERRY-CHECK PASS $1"; }

# info KEY VALUE: a `FERRY-BENCH info KEY=VALUE` line for the benchmarks
# (spaces in VALUE become underscores).
info() { echo "FERRY-BENCH info $1=$(echo "$2" | tr ' ' '_' | tr -s '_')"; }

# fail NAME REASON...
fail() {
    name=$1
    shift
    echo "FERRY-CHECK FAIL $name: $(echo "$*" | tr '\n' ' ')"
}

# check NAME CMD [ARG...]: runs CMD (a command or a shell function) in this
# shell; PASS when it exits 0, else FAIL with its exit code and last output
# lines. A hang is caught by the VM's timeout (no FERRY-DONE).
check() {
    name=$1
    shift
    "$@" >/tmp/check.out 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        pass "$name"
    else
        fail "$name" "exit $rc: $(tail -n 3 /tmp/check.out)"
    fi
    return $rc
}

# skip NAME REASON: a check that could not run counts as failed, so a
# missing tool cannot turn a run green.
skip() {
    fail "$1" "SKIPPED: $2"
}

# wait_for SECS CMD [ARG...]: retries CMD every 0.2 s until it succeeds.
wait_for() {
    secs=$1
    shift
    n=$((secs * 5))
    while [ $n -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
        n=$((n - 1))
    done
    return 1
}

# busybox sh runs its own applets before searching $PATH; where the real
# tool is in the initramfs, use it (GNU dd knows oflag=dsync, util-linux
# blkdiscard knows -z).
for tool in dd cmp blkdiscard; do
    for dir in /usr/sbin /usr/bin; do
        if [ -x "$dir/$tool" ]; then
            eval "$tool() { $dir/$tool \"\$@\"; }"
            break
        fi
    done
done

# ublk_flags LOG: the UBLK_F_* flags of the device the server logged last in
# LOG (its "ublk device set up ... flags=0x..." line: dev_info as the driver
# returned it), e.g. 0xfa.
ublk_flags() {
    grep 'ublk device set up' "$1" | tail -n 1 | sed -n 's/.* flags=\(0x[0-9a-f]*\).*/\1/p'
}

# user_copy LOG yes|no: the device logged last in LOG was (yes) or was not
# (no) created with UBLK_F_USER_COPY (0x80), and the server says it serves
# it that way (user_copy=true|false).
user_copy() {
    flags=$(ublk_flags "$1")
    [ -n "$flags" ] || {
        echo "no 'ublk device set up ... flags=' line in $1"
        return 1
    }
    line=$(grep 'ublk device set up' "$1" | tail -n 1)
    if [ "$2" = yes ]; then
        [ $((flags & 0x80)) -ne 0 ] && echo "$line" | grep -q 'user_copy=true'
    else
        [ $((flags & 0x80)) -eq 0 ] && echo "$line" | grep -q 'user_copy=false'
    fi || {
        echo "expected user copy $2, got flags $flags: $line"
        return 1
    }
}
