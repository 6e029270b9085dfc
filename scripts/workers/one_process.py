#!/usr/bin/env python3
"""One Python process with 64 MiB of duplicate pages (1 MiB bytearrays of one
repeated page) and 20,000 small objects, for `samepage run --merge-any`: it
reads PR_GET_MEMORY_MERGE, prints its Pss before and after $WAIT seconds
(default 6), writes and restores bytes, frees and allocates, and prints
"ok" if the 64 MiB still hash the same."""
import os, time, hashlib, ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("get", libc.prctl(68, 0, 0, 0, 0))
page = bytes(range(256)) * 16
data = [bytearray(page * 256) for _ in range(64)]   # 64 MiB, 1 MiB objects (mmap'd chunks)
small = [bytes(page[:1000]) + i.to_bytes(4, 'little') for i in range(20000)]
want = hashlib.sha256(b"".join(data)).hexdigest()
def rollup():
    d = {}
    for l in open("/proc/self/smaps_rollup"):
        p = l.split()
        if len(p) >= 2 and p[1].isdigit(): d[p[0].rstrip(':')] = int(p[1])
    return d
print("before", rollup()["Pss"])
time.sleep(float(os.environ.get("WAIT", "6")))
print("after", rollup()["Pss"])
for i in range(0, 64, 3):
    data[i][5] = 7
    data[i][5] = page[5]
del small
big = [bytearray(2 << 20) for _ in range(8)]
for b in big: assert not any(b[::4096])
got = hashlib.sha256(b"".join(data)).hexdigest()
print("ok" if got == want else "CORRUPT")
