# Workload A ("build"): per iteration, copy the data tree, list and checksum it,
# build a content-addressed object tree keyed by sha256, gzip every file and verify
# the round trip, tar+gzip the object tree, and build a word-frequency index with awk.
# Keeps the outputs of the last KEEP iterations (about a quarter of guest RAM).
set -e
mem_kb=$1
per_iter_kb=34000   # measured: one iteration retains ~34 MB (du, busybox on the host)
keep=$(( mem_kb / 4 / per_iter_kb ))
[ "$keep" -ge 1 ] || keep=1
phase() { echo "DWCP-PHASE A $i $1 uptime=$(cut -d' ' -f1 /proc/uptime)"; }
i=0
while true; do
    i=$((i + 1))
    d=/work/a$i
    mkdir -p "$d/objects"
    phase copy
    cp -a /data "$d/tree"
    find "$d/tree" -type f | sort > "$d/files"
    phase checksum
    find "$d/tree" -type f -exec sha256sum {} + | sort -k2 > "$d/sha256"
    phase objects
    # content-addressed object tree: objects/<first 2 hex>/<rest>, like git's
    awk -v o="$d/objects" '{ printf "mkdir -p %s/%s && cp %s %s/%s/%s\n", o, substr($1,1,2), $2, o, substr($1,1,2), substr($1,3) }' "$d/sha256" | sh
    phase gzip
    # files already ending in .gz (Debian changelogs) are left as they are
    find "$d/tree" -type f ! -name '*.gz' -exec gzip -6 {} +
    while read -r sum f; do
        case "$f" in
            *.gz) h=$(sha256sum < "$f") ;;
            *) h=$(gunzip -c "$f.gz" | sha256sum) ;;
        esac
        printf '%s  %s\n' "${h%% *}" "$f"
    done < "$d/sha256" > "$d/verify"
    cmp "$d/sha256" "$d/verify"
    phase tar
    tar -C "$d" -cf - objects | gzip -6 > "$d/objects.tar.gz"
    sha256sum "$d/objects.tar.gz" > "$d/objects.tar.gz.sha256"
    rm -rf "$d/objects"
    phase words
    find /data -type f \( -name '*.py' -o -name '*.pm' -o -name '*.pl' \) -exec cat {} + \
        | awk '{ for (w = 1; w <= NF; w++) n[$w]++ } END { for (k in n) print n[k], k }' \
        | sort -k1,1nr -k2 > "$d/words"
    old=$((i - keep))
    [ "$old" -lt 1 ] || rm -rf "/work/a$old"
    echo "DWCP-ITER A $i uptime=$(cut -d' ' -f1 /proc/uptime) kept=$keep"
done
