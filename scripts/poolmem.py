"""Memory of processes merged by samepage, counted so that nothing hides.

samepage's merged pages are pages of its pool, a memfd that every client
maps `MAP_PRIVATE` over its own memory. A page of the pool counts in a
process's Pss only once the process has touched it since it was mapped
there: a merged page the program never reads again is in no page table, so
it is in nobody's Pss, yet it takes memory. Measured on three prefork
Python workers (scripts/workers/compare.py, its JSON line): the pool memfd
held 28.8 MiB (`st_blocks`) while the workers' mappings of it added up to
10.3 MiB of Pss.

So the memory of a set of processes is their Pss, less the Pss of their
pool mappings (their shared memory, `Pss_Shmem`), plus the pool itself in
full (the allocated size of each distinct pool memfd any of them holds
open). For processes that samepage does not merge (or ksmd merges) this is
their Pss.
"""
import glob, os

POOL = "memfd:samepage-pool"


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def pools_kib(pids):
    """Memory the distinct samepage pools these processes hold open take
    (KiB): each memfd's allocated blocks, counted once."""
    seen = {}
    for pid in pids:
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                if POOL not in os.readlink(fd):
                    continue
                st = os.stat(fd)
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512 // 1024
    return sum(seen.values())


def rollup_kib(pid):
    """Pss and Pss_Shmem of the process from /proc/PID/smaps_rollup (KiB)."""
    v = {}
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        k, _, rest = line.partition(":")
        if k in ("Pss", "Pss_Shmem"):
            v[k] = int(rest.split()[0])
    return v.get("Pss", 0), v.get("Pss_Shmem", 0)


def memory_kib(pids):
    """The processes' memory (KiB): Pss outside shared memory, plus the
    samepage pools they hold, in full. Returns (memory, pss, shmem_pss,
    pools).

    From smaps_rollup, one pass over the process's mappings: summing smaps
    lost tens of MiB on QEMU processes whose 45,000 mappings samepage was
    changing while they were read (the file is read a page at a time). So
    the pool's share is taken as the processes' whole Pss_Shmem: the
    clients measured here (Python workers, QEMU with anonymous guest RAM)
    map no other shared memory.
    """
    pss = shmem = 0
    for pid in pids:
        t, s = rollup_kib(pid)
        pss += t
        shmem += s
    pools = pools_kib(pids)
    return pss - shmem + pools, pss, shmem, pools


def library_pss_kib(pids, name="libsamepage_preload.so"):
    """Pss (KiB) of the mappings of the file `name` (samepage's preload
    library, loaded into every process `samepage run` starts) in these
    processes, from /proc/PID/smaps. Processes with few mappings only (see
    memory_kib on reading smaps while mappings change)."""
    total = 0
    for pid in pids:
        inside = False
        for line in _read(f"/proc/{pid}/smaps").splitlines():
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].strip().endswith(name)
            elif inside and line.startswith("Pss:"):
                total += int(line.split()[1])
    return total
