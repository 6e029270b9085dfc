#!/bin/sh
# The README's `samepage top --once` frame: a daemon on a socket of its own,
# three Python processes that mark 64, 32 and 16 MiB of 7 distinct pages
# MADV_MERGEABLE themselves (the last in trust domain 1), one frame 15 s
# after they started. Needs a release build (cargo build --release).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SP=${SAMEPAGE:-$ROOT/target/release/samepage}
SOCK=$(mktemp -u /tmp/samepage-top-XXXXXX.sock)
"$SP" daemon --socket "$SOCK" --pages-to-scan 1000 >/dev/null 2>&1 &
DAEMON=$!
P1= P2= P3=
trap 'kill $DAEMON $P1 $P2 $P3 2>/dev/null' EXIT
sleep 0.5
hold() { # MiB
    printf 'import mmap, time\nm = mmap.mmap(-1, %d << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\nfor i in range(%d * 256):\n    m[i * 4096:(i + 1) * 4096] = bytes([i %% 7 + 1]) * 4096\nm.madvise(mmap.MADV_MERGEABLE)\ntime.sleep(60)\n' "$1" "$1"
}
"$SP" run --socket "$SOCK" -- /usr/bin/python3 -c "$(hold 64)" & P1=$!
"$SP" run --socket "$SOCK" -- /usr/bin/python3 -c "$(hold 32)" & P2=$!
"$SP" run --socket "$SOCK" --domain 1 -- /usr/bin/python3 -c "$(hold 16)" & P3=$!
sleep 15
"$SP" top --once --socket "$SOCK"
