#!/bin/busybox sh
# PID 1 of the corpus guest (docs/CORPUS.md). Mounts the kernel filesystems and a
# tmpfs for the workload's output, prints the t0 marker on the serial console, then
# runs the workload named by the kernel command line (dwcp.workload=A|B) forever.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /work
mount -t tmpfs -o size=90% work /work
workload=A
for arg in $(cat /proc/cmdline); do
    case "$arg" in dwcp.workload=*) workload="${arg#dwcp.workload=}" ;; esac
done
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
# The host takes the t0 snapshot the instant it reads this line.
echo "DWCP-T0 workload=$workload mem_kb=$mem_kb uptime=$(cut -d' ' -f1 /proc/uptime)"
sh "/workload_$workload.sh" "$mem_kb"
echo "DWCP-ERROR workload $workload exited with status $?"
poweroff -f
