#!/usr/bin/env bash
# Compares two samepage binaries on the same workloads, samepage side only,
# alternating old and new runs so drift on the machine hits both alike.
#
#   scripts/ab-bench.sh OLD_BINARY NEW_BINARY OUT_DIR [REPEATS] [WORKLOADS...]
#
# Writes OUT_DIR/<workload>-<old|new>-<n>.json (the `samepage bench --json`
# output) and prints the median CPU to converge of each side.
set -euo pipefail
old=$1 new=$2 out=$3 repeats=${4:-3}
shift $(( $# < 4 ? $# : 4 ))
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(unique files-scattered mix files)
mkdir -p "$out"
for w in "${workloads[@]}"; do
  for r in $(seq "$repeats"); do
    for v in old new; do
      bin=$old; [ "$v" = new ] && bin=$new
      "$bin" bench --workload "$w" --samepage-only --json > "$out/$w-$v-$r.json" 2> "$out/$w-$v-$r.err"
    done
  done
done
python3 - "$out" "$repeats" "${workloads[@]}" <<'PY'
import json, statistics, sys
out, repeats, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for w in workloads:
    med = {}
    for v in ("old", "new"):
        cpu = []
        for r in range(1, repeats + 1):
            d = json.load(open(f"{out}/{w}-{v}-{r}.json"))
            d = d[0] if isinstance(d, list) else d
            cpu.append(d["samepage"]["converge_cpu_seconds"])
        med[v] = statistics.median(cpu)
    print(f"{w}: CPU to converge {med['old']:.3f} s -> {med['new']:.3f} s ({med['new'] / med['old']:.2f})")
PY
