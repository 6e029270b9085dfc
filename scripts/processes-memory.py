#!/usr/bin/env python3
"""Where the memory of merging across processes goes, as /proc reports it.

Starts `samepage daemon` and four `samepage worker` processes of 256 MiB each
(the content of `samepage bench --workload processes`), lets them merge for
25 s, and prints the change of /proc/meminfo fields, the slab caches that
grew most (/proc/slabinfo), and per worker its mappings, page tables and
anonymous memory. Root (slabinfo, vm.max_map_count). Usage:

    scripts/processes-memory.py [target/release/samepage]
"""
import os
import re
import subprocess
import sys
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/samepage"
SOCK = f"/tmp/samepage-processes-memory-{os.getpid()}.sock"


def meminfo():
    return {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/meminfo")}


def slab():
    out = {}
    for l in open("/proc/slabinfo").readlines()[2:]:
        f = l.split()
        out[f[0]] = int(f[2]) * int(f[3])  # objects x object size
    return out


def field(text, name):
    return int(re.search(name + r":\s+(\d+)", text).group(1))


old_max = open("/proc/sys/vm/max_map_count").read().strip()
subprocess.run(["sysctl", "-qw", "vm.max_map_count=262144"], check=True)
daemon = subprocess.Popen([BIN, "daemon", "--socket", SOCK, "--pages-to-scan", "20000", "--sleep-ms", "0"],
                          stderr=subprocess.DEVNULL)
try:
    time.sleep(0.5)
    workers = [subprocess.Popen([BIN, "worker", "--socket", SOCK, "--index", str(i), "--size", str(256 << 20),
                                 "--distinct", "1000", "--seed", "1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(4)]
    for w in workers:
        assert w.stdout.readline().strip() == "ready"
    time.sleep(1)
    m0, s0 = meminfo(), slab()
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    time.sleep(25)
    m1, s1 = meminfo(), slab()
    for k in ["AnonPages", "Shmem", "SUnreclaim", "PageTables"]:
        print(f"{k:<12} {m1[k] - m0[k]:>+10} kB")
    grown = sorted(((s1.get(k, 0) - s0.get(k, 0), k) for k in set(s1) | set(s0)), reverse=True)[:6]
    print("slab grown:", ", ".join(f"{k} {v / 2**20:.1f} MiB" for v, k in grown))
    for w in workers:
        status = open(f"/proc/{w.pid}/status").read()
        rollup = open(f"/proc/{w.pid}/smaps_rollup").read()
        maps = sum(1 for _ in open(f"/proc/{w.pid}/maps"))
        print(f"worker {w.pid}: {maps} mappings, VmPTE {field(status, 'VmPTE')} kB, "
              f"Anonymous {field(rollup, 'Anonymous')} kB")
    print(subprocess.run([BIN, "status", "--socket", SOCK], capture_output=True, text=True).stdout)
    for w in workers:
        w.stdin.close()
    for w in workers:
        print(w.stdout.readline().strip())
        w.wait()
finally:
    daemon.kill()
    daemon.wait()
    subprocess.run(["sysctl", "-qw", f"vm.max_map_count={old_max}"])
    try:
        os.unlink(SOCK)
    except FileNotFoundError:
        pass
