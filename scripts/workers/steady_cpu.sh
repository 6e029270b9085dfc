#!/bin/sh
# CPU of the samepage-* threads of $WORKER_PIDS over 20 s once the memory
# held still, for `workers.py --at-settle`: utime+stime in clock ticks
# (1/100 s), by thread name, before and after, and those of the kernel's
# ksmd thread (for a run under ksmd).
#
#   samepage run --merge-any -- python3 scripts/workers/workers.py --workers 4 --mib 64 \
#       --at-settle scripts/workers/steady_cpu.sh
#   python3 scripts/workers/workers.py --workers 4 --mib 64 --prctl --at-settle scripts/workers/steady_cpu.sh
snap() {
	for p in $WORKER_PIDS; do
		for t in /proc/$p/task/*; do
			c=$(cat "$t/comm" 2>/dev/null)
			case $c in samepage-*) echo "$c $(cut -d')' -f2 "$t/stat" | awk '{print $12+$13}')" ;; esac
		done
	done
	k=$(pgrep -x ksmd) && echo "ksmd $(cut -d')' -f2 /proc/$k/stat | awk '{print $12+$13}')"
}
sum() { awk '{s[$1]+=$2} END {for (k in s) printf "%s=%d ", k, s[k]}'; }
a=$(snap | sum)
sleep 20
b=$(snap | sum)
echo "{\"before\": \"$a\", \"after\": \"$b\"}"
