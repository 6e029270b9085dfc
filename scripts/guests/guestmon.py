#!/usr/bin/env python3
"""Measurement helper for scripts/guests/run.sh (standard library only).

  guestmon.py snapshot PID...                       one JSON object: memory, KSM, CPU
  guestmon.py converge --seconds S [--tol T] [--interval I] [--timeline F] [--min-scans N]
                                                    sample KSM until the counters stop changing
  guestmon.py census [--mps N] PID...                content census of the guests' RAM: what an
                                                    ideal merge reaches, and what is merged now
  guestmon.py summary --out DIR ...                 assemble the final JSON summary
"""
import argparse
import bisect
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import poolmem  # noqa: E402

KSM = "/sys/kernel/mm/ksm"
TCK = os.sysconf("SC_CLK_TCK")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "ksm_zero_pages", "full_scans", "pages_scanned", "general_profit",
            "stable_node_chains", "stable_node_dups")
SETTINGS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages")


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


# samepage as the merger (run.sh --mode samepage): its counters come from
# `samepage status --json`, its CPU is the daemon's plus the samepage-*
# threads inside the QEMU processes (each process merges its own memory).
SP_BIN = os.environ.get("SAMEPAGE_BIN")
SP_SOCKET = os.environ.get("SAMEPAGE_SOCKET")
SP_DAEMON = int(os.environ.get("SAMEPAGE_DAEMON_PID") or 0)


def samepage_counters():
    r = subprocess.run([SP_BIN, "status", "--socket", SP_SOCKET, "--json"], capture_output=True,
                       text=True, timeout=30)
    j = json.loads(r.stdout)
    out = {k: 0 for k in COUNTERS}
    procs = []
    for p in j["partitions"]:
        for k in ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups"):
            out[k] += p[k]
        procs += p["processes"]
    out["ksm_zero_pages"] = sum(p["ksm_zero_pages"] for p in procs)
    out["general_profit"] = sum(p["ksm_process_profit"] for p in procs)
    # A full scan is done when every process has done one.
    out["full_scans"] = min((p["full_scans"] for p in procs), default=0)
    out["processes"] = len(procs)
    for k in SETTINGS:
        out[k] = int(j["tunables"][k])
    return out


def ksm_counters():
    if SP_BIN:
        return samepage_counters()
    out = {}
    for k in COUNTERS + SETTINGS:
        v = read(os.path.join(KSM, k))
        if v is not None:
            try:
                out[k] = int(v.strip())
            except ValueError:
                pass
    return out


def ksmd_pid():
    for comm in glob.glob("/proc/[0-9]*/comm"):
        if read(comm, "").strip() == "ksmd":
            return int(comm.split("/")[2])
    return None


def cpu_ticks(pid, stat=None):
    """utime+stime of a process (all threads), or of the thread whose stat
    file is `stat`, in clock ticks, or None."""
    s = read(stat or f"/proc/{pid}/stat")
    if not s:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat


def merger_cpu_ticks(pids):
    """CPU of the merger: the ksmd kthread, or samepage's daemon and the
    samepage-* threads in the given processes."""
    if not SP_BIN:
        kp = ksmd_pid()
        return cpu_ticks(kp) if kp else None
    t = cpu_ticks(SP_DAEMON) or 0
    for pid in pids:
        for task in glob.glob(f"/proc/{pid}/task/*"):
            if read(task + "/comm", "").startswith("samepage-"):
                t += cpu_ticks(pid, task + "/stat") or 0
    return t


def meminfo():
    out = {}
    for line in read("/proc/meminfo", "").splitlines():
        k, _, v = line.partition(":")
        if k in ("MemTotal", "MemFree", "MemAvailable", "AnonPages", "AnonHugePages", "Cached", "Shmem",
                 "SUnreclaim", "PageTables"):
            out[k + "_kB"] = int(v.split()[0])
    return out


def vmstat():
    """THP and KSM event counters (split THPs, copy-on-write of KSM pages)."""
    out = {}
    for line in read("/proc/vmstat", "").splitlines():
        k, _, v = line.partition(" ")
        if k.startswith(("thp_split", "thp_deferred", "thp_underused", "thp_fault_alloc",
                         "thp_collapse_alloc", "cow_ksm", "ksm_")):
            out[k] = int(v)
    return out


def kv_kb(text, keys):
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in keys:
            out[k + "_kB"] = int(v.split()[0])
    return out


def smaps_entries(pid):
    """Every mapping of a process from smaps: range, perms, path and sizes."""
    out = []
    for line in read(f"/proc/{pid}/smaps", "").splitlines():
        f = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            out.append({"lo": lo, "hi": hi, "perms": f[1], "path": " ".join(f[5:]), "Size_kB": 0})
            continue
        if not out:
            continue
        k, _, v = line.partition(":")
        if k in ("Size", "Rss", "Pss", "AnonHugePages"):
            out[-1][k + "_kB"] = int(v.split()[0])
        elif k == "VmFlags":
            out[-1]["flags"] = v.split()
    return out


def is_pool(path):
    return "samepage-pool" in path


def ram_run(pid):
    """QEMU's guest RAM block: the largest run of adjacent private
    non-executable mappings (TCG's translation cache is rwx) that are
    anonymous or samepage pool pieces (samepage maps merged pages
    from its pool memfd over the block, splitting it into many mappings;
    before any merge it is one anonymous mapping)."""
    best, cur = [], []
    for e in smaps_entries(pid):
        ok = e["perms"] in ("rw-p", "r--p") and (e["path"] == "" or is_pool(e["path"]))
        if ok and cur and cur[-1]["hi"] == e["lo"]:
            cur.append(e)
        elif ok:
            cur = [e]
        else:
            cur = []
        if cur and cur[-1]["hi"] - cur[0]["lo"] > (best[-1]["hi"] - best[0]["lo"] if best else 0):
            best = list(cur)
    return best


def guest_ram(pid):
    """Rss/Pss of QEMU's guest RAM block (see ram_run), how many mappings it
    is now, and whether it is marked mergeable (kernel: VmFlags mg;
    samepage: pool pieces in it)."""
    run = ram_run(pid)
    if not run:
        return {}
    out = {"lo": run[0]["lo"], "hi": run[-1]["hi"], "mappings": len(run)}
    for k in ("Size_kB", "Rss_kB", "Pss_kB", "AnonHugePages_kB"):
        out[k] = sum(e.get(k, 0) for e in run)
    out["mergeable"] = any("mg" in e.get("flags", []) or is_pool(e["path"]) for e in run)
    out["hugepage"] = any("hg" in e.get("flags", []) for e in run)
    out["pool_mappings"] = sum(1 for e in run if is_pool(e["path"]))
    out["pool_Pss_kB"] = sum(e.get("Pss_kB", 0) for e in run if is_pool(e["path"]))
    return out


def odirect(pid):
    """Open-file flags of the disk image in a QEMU process: is it O_DIRECT?"""
    found = []
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.endswith("disk.img"):
            info = read(f"/proc/{pid}/fdinfo/{os.path.basename(fd)}", "")
            m = re.search(r"flags:\s*([0-7]+)", info)
            if m:
                found.append(bool(int(m.group(1), 8) & os.O_DIRECT))
    return found


def snapshot(pids):
    snap = {"time": time.time(), "ksm": ksm_counters(), "meminfo": meminfo(), "vmstat": vmstat(),
            "guests": []}
    snap["merger_cpu_ticks"] = merger_cpu_ticks(pids)
    if SP_DAEMON:
        snap["daemon"] = kv_kb(read(f"/proc/{SP_DAEMON}/smaps_rollup", ""), ("Rss", "Pss"))
    tot = {"Rss_kB": 0, "Pss_kB": 0, "ram_Rss_kB": 0, "ram_Pss_kB": 0, "cpu_ticks": 0}
    for pid in pids:
        g = {"pid": pid}
        g.update(kv_kb(read(f"/proc/{pid}/smaps_rollup", ""),
                       ("Rss", "Pss", "Pss_Anon", "Anonymous", "AnonHugePages")))
        g["ram"] = guest_ram(pid)
        g["cpu_ticks"] = cpu_ticks(pid)
        st = read(f"/proc/{pid}/ksm_stat")
        if st:
            g["ksm_stat"] = {l.split()[0]: int(l.split()[1]) for l in st.splitlines()
                             if len(l.split()) == 2 and l.split()[1].lstrip("-").isdigit()}
        g["disk_o_direct"] = odirect(pid)
        snap["guests"].append(g)
        tot["Rss_kB"] += g.get("Rss_kB", 0)
        tot["Pss_kB"] += g.get("Pss_kB", 0)
        tot["ram_Rss_kB"] += g["ram"].get("Rss_kB", 0)
        tot["ram_Pss_kB"] += g["ram"].get("Pss_kB", 0)
        tot["cpu_ticks"] += g["cpu_ticks"] or 0
    # The memory of QEMU (and the samepage daemon): Pss, with samepage's
    # pool counted in full (merged pages the guest has not touched since
    # are in no Pss: scripts/poolmem.py). Equal to QEMU's Pss under ksmd.
    holders = list(pids) + ([SP_DAEMON] if SP_DAEMON else [])
    mem_kib, pss, pool_pss, pools = poolmem.memory_kib(holders)
    tot.update({"memory_kB": mem_kib, "pool_pss_kB": pool_pss, "pools_kB": pools})
    # Guest RAM alone, likewise (the pool holds guest RAM pages only).
    tot["ram_memory_kB"] = tot["ram_Pss_kB"] - sum(g["ram"].get("pool_Pss_kB", 0) for g in snap["guests"]) + pools
    snap["total"] = tot
    return snap


def converge(a):
    """Sample every --interval s. Converged when, at a full-scan boundary at
    least --min-scans scans after the start, pages_shared and
    pages_sharing+ksm_zero_pages are within --tol of their values at the
    previous boundary. The reported time is the first sample from which the
    merged total stayed within --tol of its converged value."""
    c0 = merger_cpu_ticks(a.pids)
    t0 = time.monotonic()
    k0 = ksm_counters()
    tl = open(a.timeline, "w") if a.timeline else None
    samples = []
    last_boundary = None
    converged = False
    while True:
        time.sleep(a.interval)
        t = time.monotonic() - t0
        k = ksm_counters()
        c = merger_cpu_ticks(a.pids)
        s = {"t": round(t, 3), "merger_cpu_s": (c - c0) / TCK if c is not None and c0 is not None else None}
        s.update({x: k.get(x) for x in COUNTERS})
        samples.append(s)
        if tl:
            tl.write(json.dumps(s) + "\n")
            tl.flush()
        scans = k["full_scans"] - k0["full_scans"]
        if last_boundary is None or k["full_scans"] != last_boundary["full_scans"]:
            merged = k["pages_sharing"] + k.get("ksm_zero_pages", 0)
            if last_boundary is not None and scans >= a.min_scans:
                pm = last_boundary["pages_sharing"] + last_boundary.get("ksm_zero_pages", 0)
                ok_m = abs(merged - pm) <= a.tol * max(merged, 1)
                ok_s = abs(k["pages_shared"] - last_boundary["pages_shared"]) <= a.tol * max(k["pages_shared"], 1) + 2
                if merged > 0 and ok_m and ok_s:
                    converged = True
            last_boundary = k
        if converged or t >= a.seconds:
            break
    final = samples[-1]
    fm = final["pages_sharing"] + (final.get("ksm_zero_pages") or 0)
    t_conv = None
    if converged:
        for s in samples:
            m = s["pages_sharing"] + (s.get("ksm_zero_pages") or 0)
            if m >= (1 - a.tol) * fm:
                t_conv = s["t"]
                break
    res = {
        "converged": converged,
        "time_to_converge_s": t_conv,
        "detected_after_s": final["t"],
        "full_scans": final["full_scans"] - k0["full_scans"],
        "merger_cpu_to_converge_s": next((s["merger_cpu_s"] for s in samples if s["t"] == t_conv), None),
        "merger_cpu_s": final["merger_cpu_s"],
        "final": {x: final.get(x) for x in COUNTERS},
    }
    print(json.dumps(res))


KPF_KSM, KPF_THP, KPF_ZERO_PAGE = 21, 22, 24
ZERO = bytes(4096)


def census(pids, mps):
    """Read every present page of each guest's RAM block (via pagemap and
    /proc/PID/mem, so nothing is faulted in), hash the contents, and count:
    what a perfect merge across all guests would give (per content c mapped
    n >= 2 times: ceil(n/mps) KSM pages, n - ceil(n/mps) sharing), and how
    many of those pages are merged now (KSM pages by kpageflags, or pages of
    samepage's pool), split zero / non-zero."""
    import struct
    counts = {}
    per_page = []  # (content key, is_ksm)
    guests = []
    kpf = open("/proc/kpageflags", "rb", buffering=0)
    for pid in pids:
        run = ram_run(pid)
        ram = (run[0]["lo"], run[-1]["hi"]) if run else None
        # samepage's merged pages: pool pieces whose page is the pool's own
        # (pagemap bit 61, a file page), not a private copy made by a write.
        pool = [(e["lo"], e["hi"]) for e in run if is_pool(e["path"])]
        pool_lo = [a for a, _ in pool]
        g = {"pid": pid, "present": 0, "ksm": 0, "zero": 0, "thp": 0, "zero_page": 0}
        guests.append(g)
        if ram is None:
            continue
        lo, hi = ram
        npages = (hi - lo) // 4096
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm, \
                open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            ents = struct.unpack(f"<{npages}Q", os.pread(pm.fileno(), npages * 8, lo // 4096 * 8))
            i = 0
            while i < npages:
                if not ents[i] >> 63 & 1:
                    i += 1
                    continue
                j = i
                while j < npages and j - i < 512 and ents[j] >> 63 & 1:
                    j += 1
                try:
                    buf = os.pread(mem.fileno(), (j - i) * 4096, lo + i * 4096)
                except OSError:
                    i = j
                    continue
                for k in range(i, i + len(buf) // 4096):
                    page = buf[(k - i) * 4096:(k - i + 1) * 4096]
                    pfn = ents[k] & ((1 << 55) - 1)
                    fl = 0
                    if pfn:
                        b = os.pread(kpf.fileno(), 8, pfn * 8)
                        fl = struct.unpack("<Q", b)[0] if len(b) == 8 else 0
                    if fl >> KPF_ZERO_PAGE & 1:  # mapped to the zero page (use_zero_pages)
                        g["zero_page"] += 1
                        continue
                    z = page == ZERO
                    key = b"Z" if z else hash(page).to_bytes(8, "little", signed=True) + page[:8]
                    counts[key] = counts.get(key, 0) + 1
                    addr = lo + k * 4096
                    at = bisect.bisect_right(pool_lo, addr) - 1
                    in_pool = at >= 0 and addr < pool[at][1]
                    ksm = bool(fl >> KPF_KSM & 1) or (in_pool and bool(ents[k] >> 61 & 1))
                    per_page.append((key, ksm))
                    g["present"] += 1
                    g["ksm"] += ksm
                    g["zero"] += z
                    g["thp"] += bool(fl >> KPF_THP & 1)
                i = j
    ideal_shared = ideal_sharing = 0
    for key, n in counts.items():
        if n >= 2:
            c = math.ceil(n / mps)
            ideal_shared += c
            ideal_sharing += n - c
    zn = counts.get(b"Z", 0)
    mergeable = [(k, ksm) for k, ksm in per_page if counts[k] >= 2]
    res = {
        "present_pages": len(per_page), "zero_pages": zn,
        "distinct_contents": len(counts),
        "duplicated_contents": sum(1 for n in counts.values() if n >= 2),
        "mergeable_pages": len(mergeable),
        "ideal": {"pages_shared": ideal_shared, "pages_sharing": ideal_sharing,
                  "merging_pages": ideal_shared + ideal_sharing,
                  "with_use_zero_pages": {
                      "ksm_zero_pages": zn,
                      "pages_shared": ideal_shared - (math.ceil(zn / mps) if zn >= 2 else 0),
                      "pages_sharing": ideal_sharing - (zn - math.ceil(zn / mps) if zn >= 2 else 0)}},
        "ksm_now": {"ksm_pages_mapped": sum(1 for _, k in per_page if k),
                    "zero_mapped_ksm": sum(1 for key, k in per_page if k and key == b"Z"),
                    "zero_mapped_zero_page": sum(g["zero_page"] for g in guests),
                    "mergeable_unmerged": sum(1 for _, k in mergeable if not k),
                    "mergeable_unmerged_zero": sum(1 for key, k in mergeable if not k and key == b"Z")},
        "guests": guests,
    }
    return res


def parse_guest_log(path):
    text = read(path, "")
    ready = None
    rounds = {"check": 0, "disk": 0}
    fails = []
    errors = []
    for line in text.splitlines():
        i = line.find("SAMEPAGE-GUEST ")
        if i < 0:
            continue
        line = line[i + len("SAMEPAGE-GUEST "):].strip()
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        word = line.split()[0] if line else ""
        if word == "ready":
            ready = kv
        elif word in ("check", "disk") and len(line.split()) > 1:
            if line.split()[1] == "ok":
                rounds[word] = max(rounds[word], int(kv.get("round", 0)))
            else:
                fails.append(line)
        elif word in ("error", "exit") or "FAIL" in line:
            (fails if "FAIL" in line else errors).append(line)
    return {"ready": ready, "check_ok_rounds": rounds["check"], "disk_ok_rounds": rounds["disk"],
            "failures": fails[:20], "failure_count": len(fails), "errors": errors[:20]}


def expected(readies, mps, uzp):
    """What a perfect merge of the workload pages alone would give (the guest
    kernel, page cache and churn add to or subtract from this)."""
    if not readies or any(r is None for r in readies):
        return None
    g = len(readies)
    shared = sharing = zero = 0
    z = sum(int(r["zero"]) for r in readies)
    if uzp:
        zero += z
    elif z >= 2:
        n = math.ceil(z / mps)
        shared += n
        sharing += z - n
    d = int(readies[0]["distinct"])
    for k in range(d):
        m = sum(int(r["dup"]) // d + (1 if k < int(r["dup"]) % d else 0) for r in readies)
        if m >= 2:
            n = math.ceil(m / mps)
            shared += n
            sharing += m - n
    c = int(readies[0]["common"])
    if g >= 2:
        n = math.ceil(g / mps)
        shared += c * n
        sharing += c * (g - n)
    pages = sum(int(r["pages"]) for r in readies)
    return {"pages_shared": shared, "pages_sharing": sharing, "ksm_zero_pages": zero,
            "workload_pages": pages,
            "unique_pages": sum(int(r["unique"]) for r in readies)}


def summary(a):
    out = a.out
    j = lambda name: json.load(open(os.path.join(out, name))) if os.path.exists(os.path.join(out, name)) else None
    before, after, conv, meta = j("before.json"), j("after.json"), j("converge.json"), j("meta.json")
    guests = []
    for i in range(meta["guests"]):
        g = parse_guest_log(os.path.join(out, f"guest{i}.log"))
        g["seed"] = meta["seed_base"] + i
        g["ready_host_s"] = meta.get("ready_s", {}).get(str(i))
        g["ready_guest_uptime_s"] = float(g["ready"]["uptime"]) if g["ready"] else None
        guests.append(g)
    mib = lambda kb: round(kb / 1024, 1) if kb is not None else None
    res = {
        "kind": "samepage-guests", "mode": meta["mode"], "guests": meta["guests"],
        "mem_mib": meta["mem"], "guest_ram_mib": meta["guest_ram"],
        "qemu_prefix": meta["qemu_prefix"], "mem_merge": meta["mem_merge"],
        "settings": meta.get("ksm_settings"), "out": out,
        "host_thp": meta.get("host_thp"),
        "ready_s_max": max((g["ready_host_s"] or 0) for g in guests),
    }
    if conv:
        res["converge"] = conv
    for name in ("census_before", "census_after"):
        c = j(name + ".json")
        if c:
            c.pop("guests", None)
            res[name] = c
    if before and after:
        mem = {}
        for name, b, c in (
            ("qemu_rss", before["total"]["Rss_kB"], after["total"]["Rss_kB"]),
            ("qemu_pss", before["total"]["Pss_kB"], after["total"]["Pss_kB"]),
            ("memory", before["total"].get("memory_kB"), after["total"].get("memory_kB")),
            ("guest_ram_memory", before["total"].get("ram_memory_kB"), after["total"].get("ram_memory_kB")),
            ("pools", before["total"].get("pools_kB"), after["total"].get("pools_kB")),
            ("pool_pss", before["total"].get("pool_pss_kB"), after["total"].get("pool_pss_kB")),
            ("guest_ram_rss", before["total"]["ram_Rss_kB"], after["total"]["ram_Rss_kB"]),
            ("guest_ram_pss", before["total"]["ram_Pss_kB"], after["total"]["ram_Pss_kB"]),
            ("anon_pages", before["meminfo"].get("AnonPages_kB"), after["meminfo"].get("AnonPages_kB")),
            ("anon_huge_pages", before["meminfo"].get("AnonHugePages_kB"), after["meminfo"].get("AnonHugePages_kB")),
            ("mem_free", before["meminfo"].get("MemFree_kB"), after["meminfo"].get("MemFree_kB")),
            ("shmem", before["meminfo"].get("Shmem_kB"), after["meminfo"].get("Shmem_kB")),
            ("slab_unreclaimable", before["meminfo"].get("SUnreclaim_kB"), after["meminfo"].get("SUnreclaim_kB")),
            ("page_tables", before["meminfo"].get("PageTables_kB"), after["meminfo"].get("PageTables_kB")),
            ("daemon_pss", (before.get("daemon") or {}).get("Pss_kB"), (after.get("daemon") or {}).get("Pss_kB")),
        ):
            mem[name + "_mib"] = {"before": mib(b), "after": mib(c),
                                  "delta": mib(c - b) if b is not None and c is not None else None}
        res["memory"] = mem
        # What merging freed, as the machine counts it: anonymous memory and
        # shmem (samepage's pool is a memfd) that went away, less the kernel
        # memory the merger made the kernel spend (slab: VMAs, rmap items;
        # page tables). System-wide, so other activity in the window adds noise.
        d = lambda k: (after["meminfo"].get(k, 0) - before["meminfo"].get(k, 0)) / 1024
        res["freed_mib"] = round(-(d("AnonPages_kB") + d("Shmem_kB")), 1)
        res["freed_net_of_kernel_mib"] = round(-(d("AnonPages_kB") + d("Shmem_kB") + d("SUnreclaim_kB")
                                                 + d("PageTables_kB")), 1)
        res["ram_mappings_after"] = [g["ram"].get("mappings") for g in after["guests"]]
        res["window_s"] = round(after["time"] - before["time"], 1)
        res["ksm_after"] = after["ksm"]
        res["vmstat_delta"] = {k: v - before.get("vmstat", {}).get(k, 0)
                               for k, v in after.get("vmstat", {}).items()}
        kb, ka = before.get("merger_cpu_ticks"), after.get("merger_cpu_ticks")
        res["merger_cpu_window_s"] = (ka - kb) / TCK if ka is not None and kb is not None else None
        res["qemu_cpu_window_s"] = (after["total"]["cpu_ticks"] - before["total"]["cpu_ticks"]) / TCK
        res["guest_ram_mergeable"] = [g["ram"].get("mergeable") for g in after["guests"]]
        res["disk_o_direct"] = all(all(g["disk_o_direct"]) and g["disk_o_direct"] for g in after["guests"])
        res["ksm_stat"] = [g.get("ksm_stat") for g in after["guests"]]
    est = j("estimate_before.json")
    if est and res.get("memory"):
        fell = -(res["memory"]["guest_ram_memory_mib"]["delta"] or 0)
        saved = est["saved_bytes"] / 2**20
        res["estimate_before"] = {
            "pages_shared": est["counters"]["pages_shared"], "pages_sharing": est["counters"]["pages_sharing"],
            "ksm_zero_pages": est["counters"]["ksm_zero_pages"], "saved_mib": round(saved, 1),
            "net_saved_mib": round(est["net_saved_bytes"] / 2**20, 1), "read_seconds": est["read_seconds"],
            "guest_ram_memory_fell_mib": round(fell, 1),
            "off_percent": round((fell - saved) / saved * 100, 2) if saved else None,
        }
    mps = (meta.get("ksm_settings") or {}).get("max_page_sharing") or 256
    uzp = (meta.get("ksm_settings") or {}).get("use_zero_pages") or 0
    res["expected_workload"] = expected([g["ready"] for g in guests], int(mps), int(uzp))
    res["guest_results"] = [{k: g[k] for k in ("seed", "ready_host_s", "ready_guest_uptime_s",
                                                  "check_ok_rounds", "disk_ok_rounds",
                                                  "failure_count", "failures", "errors")}
                            for g in guests]
    res["verified_after"] = meta.get("verified_after")
    res["guests_ok"] = bool(meta.get("verified_after")) and all(
        g["failure_count"] == 0 and not [e for e in g["errors"] if not e.startswith("exit")]
        and g["check_ok_rounds"] > 0 and g["disk_ok_rounds"] > 0 for g in guests)
    res["ksm_restored"] = meta.get("ksm_restored")
    res["leftover_qemu"] = meta.get("leftover_qemu")
    print(json.dumps(res, sort_keys=False))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("pids", nargs="*", type=int)
    c = sub.add_parser("converge")
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--tol", type=float, default=0.01)
    c.add_argument("--interval", type=float, default=1.0)
    c.add_argument("--min-scans", type=int, default=2)
    c.add_argument("--timeline")
    c.add_argument("pids", nargs="*", type=int)
    m = sub.add_parser("summary")
    m.add_argument("--out", required=True)
    cs = sub.add_parser("census")
    cs.add_argument("--mps", type=int, default=256)
    cs.add_argument("pids", nargs="*", type=int)
    l = sub.add_parser("guestlog")
    l.add_argument("path")
    a = p.parse_args()
    if a.cmd == "snapshot":
        print(json.dumps(snapshot(a.pids)))
    elif a.cmd == "converge":
        converge(a)
    elif a.cmd == "summary":
        summary(a)
    elif a.cmd == "census":
        print(json.dumps(census(a.pids, a.mps)))
    elif a.cmd == "guestlog":
        print(json.dumps(parse_guest_log(a.path)))


if __name__ == "__main__":
    main()
