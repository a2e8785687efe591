# The self-check workload. Two loops share the serial console:
# - the heartbeat: "DWCP-HB N" every 0.1 s of guest time, N counting up by one from 1.
#   N lives in this shell's memory, so after a live migration the target prints N+1
#   where the source stopped; a reboot would start again at 1.
# - the checker: SLOTS slots of 1 MiB of random data in memory (/work, a tmpfs) and, with
#   a disk, on /dev/vda; a slot's sha256 is kept beside it. Each round verifies one slot of
#   each, then rewrites it with new data (dirtying memory and disk), and every SLOTS rounds
#   verifies every slot; disk reads go to the device (the page cache is dropped first).
#   A round prints "DWCP-CHECK R ok", or "DWCP-ERROR check R ..." for each slot that differs.
# With fill > 0, ballast files take that percent of free memory before the loop starts:
# text made once with awk and varied per file by tr (compressible, no two pages equal)
# and random bytes, so that few guest pages stay zero (docs/qemu.md); each ballast file's
# sha256 is verified in turn, one per round.
fill=$1
disk=$2
SLOTS=8
MIB=1048576
cd /work
n=0
(while true; do n=$((n + 1)); echo "DWCP-HB $n"; sleep 0.1; done) &

newslot() {  # $1 = file to write 1 MiB of fresh random data to; prints its sha256
    dd if=/dev/urandom of="$1" bs=$MIB count=1 2>/dev/null
    sha256sum < "$1" | cut -d' ' -f1
}

verify_mem() {  # $1 = slot
    [ "$(sha256sum < "m$1" | cut -d' ' -f1)" = "$(cat "m$1.sum")" ] \
        || { bad=1; echo "DWCP-ERROR check $r memory slot $1 differs"; }
}

verify_disk() {  # $1 = slot
    [ "$(dd if=/dev/vda bs=$MIB skip="$1" count=1 2>/dev/null | sha256sum | cut -d' ' -f1)" \
        = "$(cat "d$1.sum")" ] || { bad=1; echo "DWCP-ERROR check $r disk slot $1 differs"; }
}

write_disk() {  # $1 = slot
    newslot tmp > "d$1.sum"
    dd if=tmp of=/dev/vda bs=$MIB seek="$1" count=1 conv=fsync 2>/dev/null
    rm tmp
}

s=0
while [ $s -lt $SLOTS ]; do
    newslot "m$s" > "m$s.sum"
    [ "$disk" = 1 ] && write_disk $s
    s=$((s + 1))
done

ballast=0
if [ "$fill" -gt 0 ]; then
    free_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    want=$((free_kb / 1024 * fill / 100))
    awk 'BEGIN { srand(7); for (i = 0; i < 16384; i++) {
        line = ""; for (w = 0; w < 8; w++) line = line sprintf("%x ", int(rand() * 1e9)) ":" i;
        print line } }' | head -c $MIB > text
    abc=abcdefghijklmnopqrstuvwxyz0123456789
    while [ $ballast -lt "$want" ]; do
        k=$((ballast % 36))
        if [ $((ballast % 4)) = 3 ]; then
            dd if=/dev/urandom of="b$ballast" bs=$MIB count=1 2>/dev/null
        else  # rotate the alphabet by k and prefix the file number: no page repeats
            { echo "ballast $ballast"; tr "$abc" "${abc:$k}${abc:0:$k}" < text; } \
                | head -c $MIB > "b$ballast"
        fi
        sha256sum < "b$ballast" | cut -d' ' -f1 > "b$ballast.sum"
        ballast=$((ballast + 1))
    done
    rm text
    echo "DWCP-FILL files=$ballast mib=$ballast"
fi

r=0
while true; do
    r=$((r + 1))
    bad=0
    s=$((r % SLOTS))
    if [ $s = 0 ]; then
        i=0
        while [ $i -lt $SLOTS ]; do
            verify_mem $i
            [ "$disk" = 1 ] && echo 1 > /proc/sys/vm/drop_caches && verify_disk $i
            i=$((i + 1))
        done
    else
        verify_mem $s
        [ "$disk" = 1 ] && echo 1 > /proc/sys/vm/drop_caches && verify_disk $s
    fi
    newslot "m$s" > "m$s.sum"
    [ "$disk" = 1 ] && write_disk $s
    if [ $ballast -gt 0 ]; then
        b=$((r % ballast))
        [ "$(sha256sum < "b$b" | cut -d' ' -f1)" = "$(cat "b$b.sum")" ] \
            || { bad=1; echo "DWCP-ERROR check $r ballast $b differs"; }
    fi
    [ $bad = 0 ] && echo "DWCP-CHECK $r ok"
done
