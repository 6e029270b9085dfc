#!/bin/sh
# The behaviour matrix's long form: for SECONDS (default 600), under
# `samepage run --merge-any` (a daemon if one answers at the default socket,
# else each process merges its own memory), at once:
#   - behaviours mt-malloc: 4 threads malloc/realloc/free with duplicate content,
#   - py_threads.py: 4 Python threads building and dropping objects,
#   - a loop of behaviours fork-exec 3 / uffd / seccomp runs,
# every byte checked by the programs themselves. Prints one line per program
# and exits non-zero if any failed.
set -eu
SECONDS_=${1:-600}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SAMEPAGE=${SAMEPAGE:-$ROOT/target/release/samepage}
OUT=$(mktemp -d)
cc -O2 -pthread -o "$OUT/behaviours" "$HERE/behaviours.c"
RUN="$SAMEPAGE run --merge-any --pages-to-scan 4000 --sleep-ms 20 --"
$RUN "$OUT/behaviours" mt-malloc "$SECONDS_" >"$OUT/mt.out" 2>"$OUT/mt.err" &
MT=$!
$RUN /usr/bin/python3 "$HERE/py_threads.py" "$SECONDS_" >"$OUT/py.out" 2>"$OUT/py.err" &
PY=$!
END=$(( $(date +%s) + SECONDS_ ))
LOOPS=0 FAILS=0
while [ "$(date +%s)" -lt "$END" ]; do
    for m in "fork-exec 3" uffd seccomp; do
        # shellcheck disable=SC2086
        if ! $RUN "$OUT/behaviours" $m >>"$OUT/loop.out" 2>>"$OUT/loop.err"; then FAILS=$((FAILS + 1)); fi
    done
    LOOPS=$((LOOPS + 1))
done
RC=0
wait $MT || RC=1
wait $PY || RC=1
echo "mt-malloc: $(cat "$OUT/mt.out")"
echo "py-threads: $(cat "$OUT/py.out")"
echo "fork-exec/uffd/seccomp: $LOOPS rounds, $FAILS failed, $(grep -c '^ok' "$OUT/loop.out") ok lines"
grep -h FAILED "$OUT"/*.err || true
[ "$FAILS" -eq 0 ] || RC=1
grep -q '^ok' "$OUT/mt.out" || RC=1
grep -q '^ok' "$OUT/py.out" || RC=1
rm -rf "$OUT"
exit $RC
