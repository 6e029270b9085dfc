#!/usr/bin/env python3
"""Forks while merging: the process fills 8 MiB of pages that repeat 64
contents and, for SECONDS (argv[1], default 3), turns merging on itself
(prctl(PR_SET_MEMORY_MERGE), as a prefork server would), forks children one
after another while merging starts, then turns it off (which unmerges
everything) and again; a thread breaks and restores pages all along. Each
child checks every byte of the buffer and exits. Prints "ok py-forks" when
every child and the final check agree (the counts go to stderr), exit
status 1 otherwise.

Under `samepage run --supervise` each fork meets the engine's scanner, its
sweeper and its copy-on-write breaker at work: a fork must neither wait for
ever on a lock one of them holds nor give a child a page being moved."""
import ctypes, hashlib, os, sys, threading, time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
PAGE = 4096
PR_SET_MEMORY_MERGE = 67

libc = ctypes.CDLL(None, use_errno=True)


def merge(on):
    U = ctypes.c_ulong
    if libc.prctl(PR_SET_MEMORY_MERGE, U(on), U(0), U(0), U(0)) != 0:
        print(f"prctl(PR_SET_MEMORY_MERGE, {on}): errno {ctypes.get_errno()}", file=sys.stderr)
        sys.exit(1)


pages = 2048
buf = bytearray(b"".join(bytes([i % 64 + 1]) * PAGE for i in range(pages)))
want = hashlib.sha256(buf).hexdigest()
stop = False


def writer():
    i = 0
    while not stop:
        # Break and restore one page: the content stays as it was.
        p = (i * 7919) % pages
        old = buf[p * PAGE + 7]
        buf[p * PAGE + 7] = (old + 1) & 0xFF
        buf[p * PAGE + 7] = old
        i += 1
        time.sleep(0.001)


t = threading.Thread(target=writer)
t.start()
forks, turns, bad, t0 = 0, 0, 0, time.monotonic()
while time.monotonic() - t0 < SECONDS:
    merge(1)
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if hashlib.sha256(buf).hexdigest() == want else 1)
        _, status = os.waitpid(pid, 0)
        forks += 1
        bad += status != 0
    merge(0)
    turns += 1
stop = True
t.join()
print(f"merging turned on {turns} times, forks {forks}, children that saw other bytes {bad}", file=sys.stderr)
ok = bad == 0 and hashlib.sha256(buf).hexdigest() == want
print("ok py-forks" if ok else "FAILED py-forks")
sys.exit(0 if ok else 1)
