# Workload B ("index"): per iteration, archive the data tree with cpio and compress
# it with bzip2 and xz, checksum every file with md5sum and sha1sum, build a
# directory tree of word lists keyed by each word's first letter, and a size
# histogram with awk. Keeps the outputs of the last KEEP iterations.
set -e
mem_kb=$1
per_iter_kb=20000   # measured: one iteration retains ~20 MB (du, busybox on the host)
keep=$(( mem_kb / 4 / per_iter_kb ))
[ "$keep" -ge 1 ] || keep=1
phase() { echo "DWCP-PHASE B $i $1 uptime=$(cut -d' ' -f1 /proc/uptime)"; }
i=0
while true; do
    i=$((i + 1))
    d=/work/b$i
    mkdir -p "$d/index"
    phase cpio
    (cd / && find data -type f | sort | cpio -o -H newc 2>/dev/null) > "$d/data.cpio"
    phase bzip2
    bzip2 -9 -c "$d/data.cpio" > "$d/data.cpio.bz2"
    phase lzop
    lzop -c "$d/data.cpio" > "$d/data.cpio.lzo"
    phase checksum
    find /data -type f -exec md5sum {} + | sort -k2 > "$d/md5"
    find /data -type f -exec sha1sum {} + | sort -k2 > "$d/sha1"
    phase index
    find /data -type f -name '*.p[ym]' -exec cat {} + | tr -cs 'A-Za-z_' '\n' \
        | awk -v o="$d/index" 'length($0) > 2 { f = tolower(substr($0, 1, 1)); print > (o "/" f) }'
    for f in "$d"/index/*; do sort -u "$f" -o "$f"; done
    phase histogram
    find /data -type f -exec stat -c '%s' {} + \
        | awk '{ b = 1; while (b < $1) b *= 2; h[b]++ } END { for (k in h) print k, h[k] }' \
        | sort -n > "$d/histogram"
    bunzip2 -c "$d/data.cpio.bz2" | cmp - "$d/data.cpio"
    rm "$d/data.cpio"
    old=$((i - keep))
    [ "$old" -lt 1 ] || rm -rf "/work/b$old"
    echo "DWCP-ITER B $i uptime=$(cut -d' ' -f1 /proc/uptime) kept=$keep"
done
