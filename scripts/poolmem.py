"""Memory of processes merged by samepage, counted so that nothing hides.

samepage's merged pages are pages of its pool, a memfd that every client
maps `MAP_PRIVATE` over its own memory. A page of the pool counts in a
process's Pss only once the process has touched it since it was mapped
there: a merged page the program never reads again is in no page table, so
it is in nobody's Pss, yet it takes memory. Measured on three prefork
Python workers: the pool memfd held 29,064 KiB (`st_blocks`) while the Pss
of every mapping of it on the machine added up to 10,322 KiB.

So the memory of a set of processes is their Pss, less the Pss of their
pool mappings, plus the pool itself in full (the allocated size of each
distinct pool memfd any of them holds open). For processes that samepage
does not merge (or ksmd merges) this is their Pss.
"""
import glob, os, re

POOL = "memfd:samepage-pool"


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def pss_kib(pid):
    """Pss of the process, and Pss of its mappings of a samepage pool (KiB)."""
    total = pool = 0
    in_pool = False
    for line in _read(f"/proc/{pid}/smaps").splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_pool = POOL in line
        elif line.startswith("Pss:"):
            kib = int(line.split()[1])
            total += kib
            if in_pool:
                pool += kib
    return total, pool


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


def memory_kib(pids):
    """The processes' memory (KiB): Pss outside samepage pools, plus the
    pools they hold in full. Returns (memory, pss, pool_pss, pools)."""
    pss = pool_pss = 0
    for pid in pids:
        t, p = pss_kib(pid)
        pss += t
        pool_pss += p
    pools = pools_kib(pids)
    return pss - pool_pss + pools, pss, pool_pss, pools
