#!/usr/bin/env python3
"""Malloc-heavy multithreaded Python: 4 threads build and drop dicts, lists,
bytes and bytearrays with deterministic content (many duplicates), check
every live object again and again, and print "ok py-threads <digest>" (the
same with and without samepage). Exit status 1 if any check failed."""
import hashlib, sys, threading, time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
failed = []


def obj(k):
    k %= 50
    return {"k": k, "blob": bytes([k]) * (4096 * (1 + k % 4)), "list": [k] * 1000,
            "arr": bytearray(hashlib.sha256(str(k).encode()).digest() * 512)}


def ok(o, k):
    return o == obj(k)


def work(tid):
    live = {}
    r, t0 = tid * 7919 + 1, time.monotonic()
    while time.monotonic() - t0 < SECONDS:
        r = (r * 1103515245 + 12345) % (1 << 31)
        slot = r % 64
        if slot in live and not ok(live[slot][0], live[slot][1]):
            failed.append(f"thread {tid} slot {slot}")
            return
        if r % 3 == 0:
            live.pop(slot, None)
        else:
            live[slot] = (obj(r), r)
    for slot, (o, k) in live.items():
        if not ok(o, k):
            failed.append(f"thread {tid} final {slot}")


threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# A duplicate-rich structure that lives long enough to merge, checked after.
keep = [obj(i) for i in range(200)]
time.sleep(1.5)
if any(not ok(keep[i], i) for i in range(200)):
    failed.append("kept objects")
h = hashlib.sha256(b"".join(o["arr"] + o["blob"] for o in keep)).hexdigest()[:16]
if failed:
    print("FAILED:", failed, file=sys.stderr)
    sys.exit(1)
print("ok py-threads", h)
