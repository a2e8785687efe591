#!/bin/busybox sh
# PID 1 of the self-checking guest (federation/demo/qemu_guest, docs/qemu.md). Loads the
# virtio disk driver, mounts a tmpfs for the workload's memory data, prints the t0 marker
# on the serial console, then runs the self-check workload with the kernel command line's
# dwcp.fill (percent of free RAM to fill, 0 = none) and dwcp.disk (1 = check /dev/vda).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# modules.dep order: each module after the ones it needs
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod "/lib/modules/$m.ko" || echo "DWCP-ERROR insmod $m failed"
done
mkdir -p /work
mount -t tmpfs -o size=95% work /work
fill=0
disk=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        dwcp.fill=*) fill="${arg#dwcp.fill=}" ;;
        dwcp.disk=*) disk="${arg#dwcp.disk=}" ;;
    esac
done
echo "DWCP-T0 fill=$fill disk=$disk uptime=$(cut -d' ' -f1 /proc/uptime)"
sh /selfcheck.sh "$fill" "$disk"
echo "DWCP-ERROR selfcheck exited with status $?"
poweroff -f
