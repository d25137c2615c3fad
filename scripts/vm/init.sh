#!/bin/sh
# /init of the vm-test initramfs (see xtask/src/vm.rs).
#
# Mounts the pseudo file systems, inserts the kernel modules listed in
# /ferry/modules/order, brings up the network when ferry_net=1, runs each
# check script in /ferry/checks/ (in name order, each in its own shell) and
# powers off. Speaks the FERRY-* line protocol on the
# serial console: FERRY-BOOT, FERRY-MODULE OK|FAIL, FERRY-CHECK PASS|FAIL
# (printed by the check script), FERRY-DONE.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export FERRY_LIB=/ferry/lib.sh
export FERRY_FILES=/ferry/files

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /mnt
ln -sf /proc/self/fd /dev/fd 2>/dev/null

echo "FERRY-BOOT $(cut -d' ' -f1 /proc/uptime)"

while read -r module; do
    [ -n "$module" ] || continue
    name=${module%.ko}
    if out=$(insmod "/ferry/modules/$module" 2>&1); then
        echo "FERRY-MODULE OK $name"
    else
        echo "FERRY-MODULE FAIL $name: $(echo "$out" | tr '\n' ' ')"
    fi
done < /ferry/modules/order

ip link set lo up 2>/dev/null
if [ "$ferry_net" = 1 ]; then
    # QEMU user networking: the guest is 10.0.2.15, the host 10.0.2.2.
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    echo "nameserver 10.0.2.3" > /etc/resolv.conf
fi

# A failing or crashing check script must not take /init down with it, nor
# keep the next script from running.
for script in /ferry/checks/*.sh; do
    echo "FERRY-SCRIPT ${script##*/}"
    sh "$script"
    echo "FERRY-CHECKS-EXIT $? ${script##*/}"
done
echo "FERRY-DONE"
sync
poweroff -f
