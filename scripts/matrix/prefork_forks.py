#!/usr/bin/env python3
"""Prefork workers that fork in turn, merged across processes: a thread of
the master mallocs first (glibc gives it an arena of its own, whose heap
header page every worker then inherits identical), the master fills 4 MiB of
pages repeating 32 contents and forks WORKERS (argv[2], default 3) workers;
each waits SECONDS (argv[1], default 6) while a daemon merges them, then
forks 30 children one after another (each checks the buffer and exits).

fork() locks every malloc arena's mutex after the prepare handlers ran: with
the arena's header page merged across the workers, that write waits for the
copy-on-write breaker while the preload library's prepare handler holds its
locks. Before the sweep left arena header pages out, every run hung here.
Prints "ok prefork-forks" when every worker and child agreed."""
import hashlib, os, sys, threading, time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
PAGE = 4096


def allocate():
    kept = [bytes(1000) for _ in range(2000)]
    time.sleep(0.1)
    return kept


t = threading.Thread(target=allocate)
t.start()
t.join()
data = bytearray(b"".join(bytes([i % 32 + 1]) * PAGE for i in range(1024)))
want = hashlib.sha256(data).hexdigest()
workers = []
for w in range(WORKERS):
    pid = os.fork()
    if pid == 0:
        time.sleep(SECONDS)
        bad = 0
        for i in range(30):
            c = os.fork()
            if c == 0:
                os._exit(0 if hashlib.sha256(data).hexdigest() == want else 1)
            _, st = os.waitpid(c, 0)
            bad += st != 0
        os._exit(1 if bad or hashlib.sha256(data).hexdigest() != want else 0)
    workers.append(pid)
failed = 0
for w in workers:
    _, st = os.waitpid(w, 0)
    failed += st != 0
print("ok prefork-forks" if failed == 0 else f"FAILED prefork-forks: {failed} workers")
sys.exit(1 if failed else 0)
