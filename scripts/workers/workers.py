#!/usr/bin/env python3
"""Prefork-style Python workers with identical memory, for KSM.

The master optionally calls prctl(PR_SET_MEMORY_MERGE, 1) (--prctl: the
kernel's ksmd then merges every worker, as systemd's MemoryKSM=yes does),
forks --workers workers, and each builds the same "model" of --mib MiB
in one large buffer (pages of a deterministic generator, half of them
repeated inside the model, so a process alone has duplicates and the workers
share all of it), then serves "requests" (a checksum over its model,
recomputed and compared every round, and a byte written and restored) until
told to stop. The master samples the memory of itself and its workers
(together: a frame still shared since the fork, or a merged page, is split
among all of them) until it holds still (or --seconds pass), and prints one
JSON line: memory before/after, time to settle, and whether every worker's
model stayed byte-exact. Memory is Pss with samepage's pool counted in full
(scripts/poolmem.py: merged pages not touched since are in no Pss).
With --count-parent, the parent process (the supervisor of `samepage run
--merge-any`, which lives as long as the program) is counted too: its memory
with the others', and all its CPU with the merger's; --count-pid PID counts
another process's memory (the samepage daemon's) with theirs.
"""
import argparse, ctypes, hashlib, json, os, signal, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import poolmem  # noqa: E402

PAGE = 4096


def model(mib):
    """The worker's "model": one buffer of `mib` MiB, as a loaded weights
    array would be (one large allocation, so glibc maps it on its own and
    its pages line up the same way in every worker)."""
    pages = mib * 256
    distinct = pages // 2
    parts = []
    for i in range(pages):
        k = i if i < distinct else (i - distinct) % 97
        seed = hashlib.sha256(k.to_bytes(8, "little")).digest()
        parts.append(seed * (PAGE // 32))
    return bytearray(b"".join(parts))


def stat_cpu_s(path):
    """(comm, CPU seconds: utime + stime) from a /proc stat file, or None."""
    try:
        with open(path) as f:
            st = f.read()
    except OSError:
        return None
    fields = st[st.rindex(")") + 2:].split()
    return st[st.index("(") + 1:st.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merger_cpu_s(pid):
    """CPU seconds of samepage's threads (samepage-*) in process `pid`."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    stats = (stat_cpu_s(f"/proc/{pid}/task/{t}/stat") for t in tids)
    return sum(cpu for comm, cpu in filter(None, stats) if comm.startswith("samepage-"))


def process_cpu_s(pid):
    """CPU seconds of the whole process `pid` (every thread)."""
    s = stat_cpu_s(f"/proc/{pid}/stat")
    return s[1] if s else 0.0


def worker(mib, ready_w, stop_r, result_w):
    m = model(mib)
    want = hashlib.sha256(m).hexdigest()
    os.write(ready_w, b"r")
    rounds, ok = 0, True
    os.set_blocking(stop_r, False)
    pages = len(m) // PAGE
    while True:
        try:
            if os.read(stop_r, 1):
                break
        except BlockingIOError:
            pass
        # A request: read the whole model, and write and restore a byte of
        # one page (a copy-on-write break on merged memory).
        i = (rounds * 7919) % pages
        old = m[i * PAGE + 100]
        m[i * PAGE + 100] = (old + 1) & 0xFF
        m[i * PAGE + 100] = old
        if hashlib.sha256(m).hexdigest() != want:
            ok = False
        rounds += 1
        time.sleep(0.2)
    os.write(result_w, json.dumps({"ok": ok, "rounds": rounds}).encode() + b"\n")
    os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--prctl", action="store_true")
    ap.add_argument("--count-parent", action="store_true",
                    help="count the parent process (samepage run's supervisor) in the memory and merger CPU")
    ap.add_argument("--count-pid", type=int, action="append", default=[],
                    help="count this process's memory too (e.g. the samepage daemon's)")
    ap.add_argument("--at-settle", metavar="CMD",
                    help="a shell command run once the workers' Pss settled (or at the end), with "
                         "$WORKER_PIDS set (the master's and the workers'); its output (JSON) is reported "
                         "as at_settle")
    a = ap.parse_args()
    if a.prctl:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(67, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            sys.exit(f"prctl(PR_SET_MEMORY_MERGE): errno {ctypes.get_errno()}")
    pids, stops, results = [], [], []
    ready_r, ready_w = os.pipe()
    for _ in range(a.workers):
        stop_r, stop_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            worker(a.mib, ready_w, stop_r, res_w)
        pids.append(pid)
        stops.append(stop_w)
        results.append(res_r)
    for _ in range(a.workers):
        os.read(ready_r, 1)
    t0 = time.monotonic()
    everyone = [os.getpid()] + pids
    parent = [os.getppid()] if a.count_parent else []
    measured = everyone + parent + a.count_pid
    before = poolmem.memory_kib(measured)[0]
    last, still, settled = before, 0, None
    samples = []
    while time.monotonic() - t0 < a.seconds:
        time.sleep(0.5)
        now = poolmem.memory_kib(measured)[0]
        samples.append([round(time.monotonic() - t0, 1), now])
        # Settled: 5 s without a change of more than 256 KiB, after at least
        # a tenth of the memory was freed (until then merging may not have
        # begun; a run that never gets there runs --seconds).
        if abs(now - last) <= 256:
            still += 1
            if still >= 10 and now < before * 0.9:
                settled = time.monotonic() - t0 - 5.0
                break
        else:
            still = 0
        last = now
    after, pss_after, pool_pss_after, pools_after = poolmem.memory_kib(measured)
    parent_pss_after = sum(poolmem.rollup_kib(p)[0] for p in parent)
    counted_pss_after = {p: poolmem.rollup_kib(p)[0] for p in a.count_pid}
    library_pss_after = poolmem.library_pss_kib(everyone)
    at_settle = None
    if a.at_settle:
        import subprocess
        # The master too: it merges as well (prctl is inherited; merge-any covers it).
        env = dict(os.environ, WORKER_PIDS=" ".join(map(str, everyone)))
        out = subprocess.run(a.at_settle, shell=True, env=env, capture_output=True, text=True)
        try:
            at_settle = json.loads(out.stdout)
        except ValueError:
            at_settle = {"error": out.stdout[-500:] + out.stderr[-500:]}
    cpu = sum(merger_cpu_s(p) for p in everyone) + sum(process_cpu_s(p) for p in parent)
    # A few more rounds on merged memory, then stop.
    time.sleep(1.0)
    out = []
    for s in stops:
        os.write(s, b"x")
    for r in results:
        out.append(json.loads(os.read(r, 4096).decode()))
    for p in pids:
        os.waitpid(p, 0)
    print(json.dumps({
        "workers": a.workers, "mib_each": a.mib, "pids": everyone,
        "memory_before_mib": round(before / 1024, 1), "memory_after_mib": round(after / 1024, 1),
        "pss_after_mib": round(pss_after / 1024, 1), "pool_pss_after_mib": round(pool_pss_after / 1024, 1),
        "pools_after_mib": round(pools_after / 1024, 1),
        "parent_pss_after_mib": round(parent_pss_after / 1024, 1) if parent else None,
        "counted_pss_after_mib": {str(p): round(k / 1024, 1) for p, k in counted_pss_after.items()},
        "preload_library_pss_after_mib": round(library_pss_after / 1024, 1),
        "freed_mib": round((before - after) / 1024, 1),
        "settled_s": None if settled is None else round(settled, 1),
        "merger_cpu_s": round(cpu, 2),
        "at_settle": at_settle,
        "samples": [[t, round(k / 1024, 1)] for t, k in samples],
        "ok": all(o["ok"] for o in out), "rounds": [o["rounds"] for o in out],
    }))
    return 0 if all(o["ok"] for o in out) else 1


if __name__ == "__main__":
    sys.exit(main())
