#!/usr/bin/env python3
"""The workers' heaps compared, for `workers.py --at-settle`.

Reads, for each worker in $WORKER_PIDS (the master, the first, left out),
the pages of its `[heap]` that are present and anonymous (pagemap: not
mapping a file, so not samepage's pool), twice a second apart, and the
content of every heap and pool page of the other workers. Prints one JSON
object: per worker, such pages (`anon_heap_pages`), how many changed in
that second (`changed_1s`), how many hold a content some other worker's
heap holds (`content_elsewhere`), and how many are unique (`unique`: found
nowhere else, nor twice in the worker itself), which no merger can merge.
Run it outside samepage (`env -u LD_PRELOAD`): as a program under
`samepage run` it would register its own memory.

    samepage run --merge-any -- python3 scripts/workers/workers.py --workers 3 --mib 16 \\
        --at-settle "env -u LD_PRELOAD python3 scripts/workers/heap_diff.py"
"""
import collections, hashlib, json, os, struct, time


def anon_heap(pid):
    """{address: sha1} of the present anonymous pages of `pid`'s heap."""
    out = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in open(f"/proc/{pid}/maps"):
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[5].strip() != "[heap]":
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            pm.seek(a // 4096 * 8)
            data = pm.read((b - a) // 4096 * 8)
            for i in range(0, len(data), 8):
                e = struct.unpack_from("<Q", data, i)[0]
                if e >> 63 and not (e >> 61) & 1:
                    addr = a + i // 8 * 4096
                    mem.seek(addr)
                    out[addr] = hashlib.sha1(mem.read(4096)).digest()
    return out


def all_contents(pid):
    """The contents of every page of `pid`'s heap and pool mappings."""
    seen = set()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in open(f"/proc/{pid}/maps"):
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else ""
            a, b = (int(x, 16) for x in parts[0].split("-"))
            if (name == "[heap]" or "samepage-pool" in name) and b - a <= 64 << 20:
                for addr in range(a, b, 4096):
                    mem.seek(addr)
                    seen.add(hashlib.sha1(mem.read(4096)).digest())
    return seen


def main():
    pids = [int(p) for p in os.environ["WORKER_PIDS"].split()][1:]
    first = {p: anon_heap(p) for p in pids}
    time.sleep(1)
    second = {p: anon_heap(p) for p in pids}
    out = {}
    for p in pids:
        others = set().union(*[all_contents(q) for q in pids if q != p])
        counts = collections.Counter(first[p].values())
        out[p] = {
            "anon_heap_pages": len(first[p]),
            "changed_1s": sum(v != second[p].get(k) for k, v in first[p].items()),
            "content_elsewhere": sum(v in others for v in first[p].values()),
            "unique": sum(1 for v in first[p].values() if v not in others and counts[v] == 1),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
