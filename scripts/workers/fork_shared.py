#!/usr/bin/env python3
"""For workers.py --at-settle: per process in $WORKER_PIDS, the present pages
of its private anonymous read-write memory (anonymous and [heap]) and how
many of them are not exclusively mapped (/proc/PID/pagemap bit 56 clear:
after fork, still the same frame as the parent's or a sibling's). Prints
{"PID": [present, not_exclusive], ...}."""
import os, sys, struct, json
res = {}
for pid in os.environ["WORKER_PIDS"].split():
    shared = present = 0
    pm = open(f"/proc/{pid}/pagemap", "rb")
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        if (len(f) > 5 and f[5] != "[heap]") or f[1] != "rw-p":
            continue
        a, b = [int(x, 16) for x in f[0].split("-")]
        pm.seek(a // 4096 * 8)
        data = pm.read((b - a) // 4096 * 8)
        for (e,) in struct.iter_unpack("<Q", data):
            if e >> 63 & 1:
                present += 1
                if not (e >> 56 & 1):
                    shared += 1
    res[pid] = [present, shared]
print(json.dumps(res))
