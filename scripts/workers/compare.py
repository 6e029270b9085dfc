#!/usr/bin/env python3
"""Prefork Python workers: samepage against the kernel's ksmd, same run.

Runs scripts/workers/workers.py three times on this machine, as root:
  1. without merging (the baseline Pss);
  2. under the kernel's ksmd: the master calls prctl(PR_SET_MEMORY_MERGE, 1)
     before forking (what systemd's MemoryKSM=yes does), ksmd runs with the
     given pages_to_scan and sleep_millisecs;
  3. under samepage: a `samepage daemon` with the same two tunables, the
     workers under `samepage run --merge-any` (the program unmodified).
Each reports the memory of the master and workers once it holds still (Pss,
with samepage's pool counted in full: scripts/poolmem.py), and whether every
worker's model stayed byte-exact. Saved = baseline memory - memory after;
samepage's side also counts, at the same moment, the daemon's and the
supervisor's (`samepage run --merge-any` stays as the program's parent)
memory, so its figure is net. Beside it: samepage's own memory (daemon,
supervisor, and the engines in the processes: their heaps as `samepage
status` reports their memory_bytes, and the preload library's code) and what merging itself freed (net saving + own memory),
which is what `samepage estimate` predicts.
CPU: ksmd's thread (utime+stime from /proc) against the daemon's, the
supervisor's and the samepage threads inside the workers.

Every /sys/kernel/mm/ksm setting touched is restored (run 2 then 0).
Prints a table, then one JSON line.
"""
import argparse, json, os, signal, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import poolmem  # noqa: E402
from workers import process_cpu_s as cpu_s  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KSM = "/sys/kernel/mm/ksm"
PY = "/usr/bin/python3"


def ksm_get(name):
    with open(f"{KSM}/{name}") as f:
        return f.read().strip()


def ksm_set(name, value):
    with open(f"{KSM}/{name}", "w") as f:
        f.write(str(value))


def ksmd_pid():
    out = subprocess.run(["pgrep", "-x", "ksmd"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def workers(args, extra, prefix=()):
    cmd = list(prefix) + [PY, os.path.join(HERE, "workers.py"), "--workers", str(args.workers),
                          "--mib", str(args.mib), "--seconds", str(args.seconds)] + extra
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
    wall = time.monotonic() - t0
    line = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not line:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    r = json.loads(line[-1])
    r["wall_s"] = round(wall, 1)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--pages-to-scan", type=int, default=4000)
    ap.add_argument("--sleep-ms", type=int, default=20)
    ap.add_argument("--samepage", default=os.path.join(ROOT, "target", "release", "samepage"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("compare.py drives /sys/kernel/mm/ksm: run it as root")

    # 1. Baseline: nothing merges (a short run: Pss holds still at once);
    # `samepage estimate` reads the workers then, from outside.
    base_args = argparse.Namespace(**{**vars(a), "seconds": 5})
    base = workers(base_args, ["--at-settle", f"{a.samepage} estimate --json --pid $WORKER_PIDS"])

    # 2. ksmd.
    names = ["run", "pages_to_scan", "sleep_millisecs"]
    saved = {n: ksm_get(n) for n in names}
    kpid = ksmd_pid()
    try:
        ksm_set("pages_to_scan", a.pages_to_scan)
        ksm_set("sleep_millisecs", a.sleep_ms)
        ksm_set("run", 1)
        c0 = cpu_s(kpid)
        counters = ("import json; print(json.dumps({n: int(open('/sys/kernel/mm/ksm/' + n).read()) for n in "
                    "['pages_shared', 'pages_sharing', 'pages_unshared', 'ksm_zero_pages', 'general_profit']}))")
        kern = workers(a, ["--prctl", "--at-settle", f'{PY} -c "{counters}"'])
        kern["merger_cpu_s"] = round(cpu_s(kpid) - c0, 2)
    finally:
        ksm_set("run", 2)
        ksm_set("run", 0)
        for n in names:
            if n != "run":
                ksm_set(n, saved[n])
        ksm_set("run", saved["run"])

    # 3. samepage: a daemon on a socket of this run, the workers unmodified.
    sock = f"/tmp/samepage-compare-{os.getpid()}.sock"
    daemon = subprocess.Popen([a.samepage, "daemon", "--socket", sock, "--pages-to-scan", str(a.pages_to_scan),
                               "--sleep-ms", str(a.sleep_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        d0 = cpu_s(daemon.pid)
        same = workers(a, ["--count-parent", "--count-pid", str(daemon.pid), "--at-settle", f"{a.samepage} status --json --socket {sock}"],
                       prefix=[a.samepage, "run", "--merge-any", "--socket", sock, "--"])
        same["daemon_cpu_s"] = round(cpu_s(daemon.pid) - d0, 2)
        same["daemon_pss_mib"] = same["counted_pss_after_mib"][str(daemon.pid)]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)

    saved_k = base["memory_after_mib"] - kern["memory_after_mib"]
    saved_s = base["memory_after_mib"] - same["memory_after_mib"]
    # samepage's own memory, counted in saved_s: the daemon, the supervisor,
    # and the engines inside the processes (each reports its heap's resident
    # pages: `samepage status`'s memory_bytes; plus the preload library's
    # own pages, its code). What merging itself freed is the net saving plus
    # that.
    try:
        # The master's and workers' engines only (the processes --at-settle
        # starts inherit the preload library too).
        engines = sum(p["memory_bytes"] for part in same["at_settle"]["partitions"] for p in part["processes"]
                      if p["pid"] in same["pids"]) / 2**20
        engines += same["preload_library_pss_after_mib"]
    except (KeyError, TypeError):
        engines = None
    own = None if engines is None else same["daemon_pss_mib"] + (same["parent_pss_after_mib"] or 0) + engines
    merged_s = None if own is None else saved_s + own
    cpu_k = kern["merger_cpu_s"]
    cpu_s_ = same["merger_cpu_s"] + same["daemon_cpu_s"]
    print(f"{a.workers} prefork Python workers, {a.mib} MiB model each, pages_to_scan {a.pages_to_scan}, "
          f"sleep_millisecs {a.sleep_ms}")
    print(f"{'':10} {'memory after':>12} {'saved':>9} {'settled':>8} {'merger CPU':>11} {'content':>8}")
    print(f"{'none':10} {base['memory_after_mib']:>9.1f} MiB {'':>9} {'':>8} {'':>11} "
          f"{'ok' if base['ok'] else 'WRONG':>8}")
    for name, r, saved_mib, cpu in [("ksmd", kern, saved_k, cpu_k), ("samepage", same, saved_s, cpu_s_)]:
        settled = "-" if r["settled_s"] is None else f"{r['settled_s']} s"
        print(f"{name:10} {r['memory_after_mib']:>9.1f} MiB {saved_mib:>5.1f} MiB {settled:>8} {cpu:>9.2f} s "
              f"{'ok' if r['ok'] else 'WRONG':>8}")
    # The estimate (read before anything merged) against what each reached.
    def sharing(r, get):
        try:
            return get(r["at_settle"])
        except (KeyError, TypeError):
            return None
    est = sharing(base, lambda x: x["counters"]["pages_sharing"])
    est_mib = sharing(base, lambda x: x["saved_bytes"] / 2**20)
    if est_mib:
        for name, got in [("ksmd", saved_k), ("samepage", saved_s)]:
            print(f"samepage estimate said {est_mib:.1f} MiB freed; {name} freed {got:.1f} MiB "
                  f"({(got - est_mib) / est_mib * 100:+.1f}%)")
    if est_mib and merged_s is not None:
        print(f"samepage's merging freed {merged_s:.1f} MiB ({(merged_s - est_mib) / est_mib * 100:+.1f}% of the "
              f"estimate); samepage's own memory {own:.1f} MiB (daemon {same['daemon_pss_mib']:.1f}, supervisor "
              f"{same['parent_pss_after_mib'] or 0:.1f}, engines in the processes {engines:.1f})")
    k_sh = sharing(kern, lambda x: x["pages_sharing"])
    s_sh = sharing(same, lambda x: sum(p["pages_sharing"] for p in x["partitions"]))
    if est:
        for name, got in [("ksmd", k_sh), ("samepage", s_sh)]:
            if got is not None:
                print(f"samepage estimate said pages_sharing {est}; {name} reached {got} "
                      f"({(got - est) / est * 100:+.1f}%)")
    ratio = saved_s / saved_k if saved_k > 0 else None
    print(f"samepage saved {ratio * 100:.0f}% of what ksmd saved" if ratio else "ksmd saved nothing")
    for r in (base, kern, same):
        r.pop("samples", None)
    print(json.dumps({"baseline": base, "ksmd": kern, "samepage": same, "saved_mib_ksmd": round(saved_k, 1),
                      "saved_mib_samepage": round(saved_s, 1),
                      "samepage_own_mib": None if own is None else round(own, 1),
                      "engines_mib": None if engines is None else round(engines, 1),
                      "merging_freed_mib_samepage": None if merged_s is None else round(merged_s, 1),
                      "pages_sharing": {"estimate": est, "ksmd": k_sh, "samepage": s_sh},
                      "estimate_saved_mib": None if est_mib is None else round(est_mib, 1),
                      "ratio": None if ratio is None else round(ratio, 3)}))
    return 0 if base["ok"] and kern["ok"] and same["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
