//! `samepage estimate --pid PID...` on real processes: Python children map
//! anonymous memory with contents the test chooses (page `i` holds content
//! id `ids[i]` repeated, id 0 is a page of zeros), mark it with
//! `madvise(MADV_MERGEABLE)` and wait; the estimate must equal the counters
//! the test computes from the ids alone with ksm.rst's rule, for the
//! default `max_page_sharing`, a small one (chains of dups) and
//! `--use-zero-pages`. One test (ignored by default: it takes the machine's
//! ksmd, as root) lets the kernel merge the same processes and compares.

mod common;
use common::{ksm_get, ksm_set, Ksmd, KSM};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// Maps the pages, fills them, madvise(MADV_MERGEABLE), says `ready`, waits
/// for stdin to close. Then `reads` more pages, only read (they map the
/// kernel's zero page: ksmd does not scan them), and as many never touched.
/// With `fork`, forks once everything is written (the child maps the same
/// frames and waits too) and says `ready CHILD_PID`.
const CHILD: &str = r#"
import mmap, os, struct, sys
ids = [int(x) for x in sys.argv[1].split(',')]
reads = int(sys.argv[2])
fork = sys.argv[3] == 'fork'
m = mmap.mmap(-1, (len(ids) + 2 * reads) * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i, c in enumerate(ids):
    m[i * 4096:(i + 1) * 4096] = bytes(4096) if c == 0 else struct.pack('<Q', c) * 512
for i in range(len(ids), len(ids) + reads):
    assert m[i * 4096] == 0
m.madvise(mmap.MADV_MERGEABLE)
child = os.fork() if fork else None
if child == 0:
    sys.stdin.read()
    os._exit(0)
print('ready' if child is None else f'ready {child}', flush=True)
sys.stdin.read()
"#;

/// A child holding pages; killed when dropped.
struct Holder {
    child: Child,
    ids: Vec<u64>,
    /// Pages only read (zero-page mappings).
    reads: u64,
    /// The pid of the process it forked, which maps the same frames.
    forked: Option<u32>,
}

impl Holder {
    fn spawn(ids: Vec<u64>, reads: u64) -> Holder {
        Holder::start(ids, reads, false)
    }

    fn start(ids: Vec<u64>, reads: u64, fork: bool) -> Holder {
        let list: Vec<String> = ids.iter().map(u64::to_string).collect();
        let mut child = Command::new("python3")
            .args(["-c", CHILD, &list.join(","), &reads.to_string(), if fork { "fork" } else { "alone" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("ready"), "the child did not start: {line:?}");
        let forked = words.next().map(|p| p.parse().expect("a pid"));
        Holder { child, ids, reads, forked }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(pid) = self.forked {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three processes: zeros, copies inside each one, copies across them, a
/// content with 608 copies (more than 2 x 256: chains of dups), unique pages.
fn holders() -> Vec<Holder> {
    let mut a: Vec<u64> = vec![0; 10];
    for id in 1..=5 {
        a.extend([id; 7]);
    }
    a.extend([100, 300]);
    a.extend(1000..1020);
    a.extend([200; 3]);
    let mut b: Vec<u64> = Vec::new();
    for id in 1..=5 {
        b.extend([id; 3]);
    }
    b.extend([0; 5]);
    b.extend([200; 600]);
    b.extend(2000..2010);
    let mut c: Vec<u64> = vec![200; 5];
    c.extend([300, 7, 7, 0]);
    c.extend(3000..3005);
    // Interleave the contents (the order must not matter).
    for (i, v) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        let n = v.len();
        for j in 0..n {
            v.swap(j, (j * 7919 + i) % n);
        }
    }
    [a, b, c].into_iter().zip([3, 0, 40]).map(|(ids, reads)| Holder::spawn(ids, reads)).collect()
}

/// What the kernel's rule gives for these holders, computed from the ids.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    shared: u64,
    sharing: u64,
    unshared: u64,
    zero: u64,
    freed_zero: u64,
    freed_within: u64,
    freed_across: u64,
    /// Per holder: pages, pages freed (copies beyond the kept ones, in
    /// holder order: the copy at every multiple of max_page_sharing is kept).
    per: Vec<(u64, u64)>,
}

fn expected(holders: &[Holder], m: u64, use_zero_pages: bool) -> Expected {
    // Content id -> copies per holder.
    let mut copies: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (h, holder) in holders.iter().enumerate() {
        for &id in &holder.ids {
            copies.entry(id).or_insert_with(|| vec![0; holders.len()])[h] += 1;
        }
    }
    // (pages_shared, pages_sharing) of k copies: they fill stable dups of at
    // most m mappings each, one after the other; a lone copy left over
    // stays unshared (not the closed form the estimate uses).
    let rule = |k: u64| -> (u64, u64) {
        let (mut left, mut shared, mut sharing) = (k, 0, 0);
        while left >= 2 {
            let d = left.min(m);
            shared += 1;
            sharing += d - 1;
            left -= d;
        }
        (shared, sharing)
    };
    let mut e = Expected {
        shared: 0,
        sharing: 0,
        unshared: 0,
        zero: 0,
        freed_zero: 0,
        freed_within: 0,
        freed_across: 0,
        per: holders.iter().map(|h| (h.ids.len() as u64, 0)).collect(),
    };
    for (&id, per) in &copies {
        let k: u64 = per.iter().sum();
        if id == 0 && use_zero_pages {
            e.zero += k;
            e.freed_zero += k;
            for (h, &n) in per.iter().enumerate() {
                e.per[h].1 += n;
            }
            continue;
        }
        let (shared, sharing) = rule(k);
        e.shared += shared;
        e.sharing += sharing;
        e.unshared += k - shared - sharing;
        let within: u64 = per.iter().map(|&n| rule(n).1).sum();
        if id == 0 {
            e.freed_zero += sharing;
        } else {
            e.freed_within += within;
            e.freed_across += sharing - within;
        }
        let mut position = 0;
        for (h, &n) in per.iter().enumerate() {
            for _ in 0..n {
                e.per[h].1 += u64::from(position % m != 0);
                position += 1;
            }
        }
    }
    e
}

fn estimate(holders: &[Holder], args: &[&str]) -> Value {
    let pids: Vec<String> = holders.iter().map(Holder::pid).collect();
    estimate_pids(&pids, args)
}

/// `samepage estimate --json --pid PIDS ARGS`.
fn estimate_pids(pids: &[String], args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["estimate", "--json", "--pid"])
        .args(pids)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The machine's ksmd, stopped, set to `max_page_sharing` `m` and
/// `use_zero_pages`, scanning fast (2000 pages, no sleep).
fn ksmd_with(m: u64, use_zero_pages: bool) -> Ksmd {
    let ksmd = Ksmd::take();
    ksm_set("max_page_sharing", &m.to_string());
    ksm_set("use_zero_pages", if use_zero_pages { "1" } else { "0" });
    ksm_set("pages_to_scan", "2000");
    ksm_set("sleep_millisecs", "0");
    ksmd
}

/// Lets the kernel's ksmd run until `read()` has held still over three
/// full scans (at most 60 s; `read()[0]` must be above 0); returns the
/// last reading.
fn ksmd_settled<const N: usize>(read: impl Fn() -> [u64; N]) -> [u64; N] {
    ksm_set("run", "1");
    let t0 = Instant::now();
    let (mut last, mut still_since) = (read(), ksm_get("full_scans"));
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        let scans = ksm_get("full_scans");
        if now != last {
            (last, still_since) = (now, scans);
        } else if scans >= still_since + 3 && now[0] > 0 {
            break;
        }
    }
    last
}

fn got(v: &Value) -> Expected {
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    let c = &v["counters"];
    Expected {
        shared: n(&c["pages_shared"]),
        sharing: n(&c["pages_sharing"]),
        unshared: n(&c["pages_unshared"]),
        zero: n(&c["ksm_zero_pages"]),
        freed_zero: n(&v["pages_freed"]["zero_pages"]),
        freed_within: n(&v["pages_freed"]["within_process"]),
        freed_across: n(&v["pages_freed"]["across_processes"]),
        per: v["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (n(&p["pages_scanned"]), n(&p["pages_freed"])))
            .collect(),
    }
}

fn check(holders: &[Holder], m: u64, use_zero_pages: bool) -> Value {
    let mut args = vec!["--mergeable-only".to_string(), "--max-page-sharing".into(), m.to_string()];
    if use_zero_pages {
        args.push("--use-zero-pages".into());
    }
    let v = estimate(holders, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = expected(holders, m, use_zero_pages);
    assert_eq!(got(&v), want, "max_page_sharing {m}, use_zero_pages {use_zero_pages}: {v:#}");
    // general_profit: (pages_sharing + ksm_zero_pages) * 4096 - rmap items * 64.
    let rmap = want.shared + want.sharing + want.unshared;
    assert_eq!(v["rmap_items"], rmap);
    assert_eq!(v["counters"]["general_profit"], ((want.sharing + want.zero) * PAGE) as i64 - (rmap * 64) as i64);
    v
}

#[test]
fn the_estimate_is_the_kernels_rule_on_the_pages_read() {
    let hs = holders();
    let v = check(&hs, 256, false);
    // The test's content has something in every part of the breakdown.
    let e = got(&v);
    assert!(e.freed_zero > 0 && e.freed_within > 0 && e.freed_across > 0, "{e:?}");
    // Chains: 608 copies of one content under max_page_sharing 3 and 2.
    check(&hs, 3, false);
    check(&hs, 2, false);
    let v = check(&hs, 256, true);
    assert_eq!(v["counters"]["ksm_zero_pages"], 16);
    check(&hs, 3, true);
    for (p, h) in v["processes"].as_array().unwrap().iter().zip(&hs) {
        assert_eq!(p["pid"].to_string(), h.pid());
        assert_eq!(p["comm"], "python3");
        assert_eq!(p["vmas"], 1, "only the MADV_MERGEABLE mapping: {p}");
        // Pages only read map the zero page: left out, and said so.
        assert_eq!(p["pages_zero_mapped"], h.reads, "{p}");
        assert_eq!((&p["pages_swapped"], &p["pages_unreadable"]), (&0.into(), &0.into()), "{p}");
    }
}

/// The partitions breakdown: with every process in a trust domain of its
/// own, each partition is exactly that process estimated alone, and the
/// partitioned total is their sum; all in domain 0 (one user), the one
/// partition is the whole estimate.
#[test]
fn the_partitions_breakdown_counts_each_domain_apart() {
    let hs = holders();
    let all = estimate(&hs, &["--mergeable-only"]);
    assert_eq!(all["partitions"].as_array().unwrap().len(), 1, "{all:#}");
    assert_eq!(all["partitions"][0]["counters"], all["counters"]);
    assert_eq!(all["partitioned_net_saved_bytes"], all["net_saved_bytes"]);
    let domains: Vec<String> = hs.iter().enumerate().map(|(i, h)| format!("{}={}", h.pid(), i + 1)).collect();
    let mut args = vec!["--mergeable-only"];
    for d in &domains {
        args.extend(["--domain", d]);
    }
    let apart = estimate(&hs, &args);
    assert_eq!(apart["counters"], all["counters"], "the kernel's figure does not depend on domains");
    let parts = apart["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), hs.len(), "{apart:#}");
    let mut sum = 0;
    for (i, (p, h)) in parts.iter().zip(&hs).enumerate() {
        let alone = estimate(std::slice::from_ref(h), &["--mergeable-only"]);
        assert_eq!(p["domain"], (i + 1) as u64);
        assert_eq!(p["pids"][0].to_string(), h.pid());
        assert_eq!(p["counters"], alone["counters"], "partition {i} is its process alone");
        sum += alone["net_saved_bytes"].as_i64().unwrap();
    }
    assert_eq!(apart["partitioned_net_saved_bytes"], sum);
    // The same as an SVG: a bar and a label per process and per partition.
    let svg = std::env::temp_dir().join(format!("samepage-estimate-{}.svg", std::process::id()));
    let mut with_plot = args.clone();
    let svg_arg = svg.to_string_lossy().to_string();
    with_plot.extend(["--plot", &svg_arg]);
    estimate(&hs, &with_plot);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..100.min(text.len())]);
    for (i, h) in hs.iter().enumerate() {
        assert!(text.contains(&format!("{} python3", h.pid())), "process {i}'s bar is labelled");
        assert!(text.contains(&format!("domain {} ({})", i + 1, h.pid())), "partition {i}'s bar is labelled");
    }
    assert!(text.contains("kernel: all together"));
    let _ = std::fs::remove_file(&svg);
    assert!(sum < all["net_saved_bytes"].as_i64().unwrap(), "copies across processes are lost apart");
}

#[test]
fn through_proc_pid_mem_the_estimate_is_the_same() {
    let hs = holders();
    let v = check(&hs, 3, true);
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .env("SAMEPAGE_ESTIMATE_NO_VM_READV", "1")
        .args(["estimate", "--json", "--mergeable-only", "--max-page-sharing", "3", "--use-zero-pages", "--pid"])
        .args(hs.iter().map(Holder::pid))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got(&w), got(&v));
    assert_eq!(w["processes"], v["processes"]);
}

#[test]
fn without_mergeable_only_the_whole_private_anonymous_memory_counts() {
    let hs = holders();
    let only = got(&check(&hs, 256, false));
    let all = estimate(&hs, &[]);
    let all_counts = got(&all);
    for ((pages_only, _), (pages_all, _)) in only.per.iter().zip(&all_counts.per) {
        assert!(pages_all > pages_only, "the heap and stack count too: {pages_all} <= {pages_only}");
    }
    // More pages never merge less.
    assert!(all_counts.sharing >= only.sharing, "{all:#}");
    assert!(all["processes"].as_array().unwrap().iter().all(|p| p["vmas"].as_u64().unwrap() > 1));
}

#[test]
fn the_human_table_names_the_counters_and_processes() {
    let hs = holders();
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["estimate", "--mergeable-only", "--pid", &hs[0].pid(), &hs[1].pid()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = expected(&hs[..2], 256, false);
    assert!(text.contains(&format!("  pages_shared         {}\n", want.shared)), "{text}");
    assert!(text.contains(&format!("  pages_sharing        {}\n", want.sharing)), "{text}");
    assert!(text.contains(&format!("  duplicates across processes      {}\n", want.freed_across)), "{text}");
    for h in &hs[..2] {
        assert!(text.contains(&format!("{}  python3", h.pid())), "{text}");
    }
}

#[test]
fn bad_input_is_refused_naming_the_value() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_samepage")).arg("estimate").args(args).output().unwrap();
    // A pid that cannot exist (above the kernel's PID_MAX_LIMIT).
    let out = run(&["--pid", "4194305"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pid 4194305: no such process"), "{out:?}");
    let me = std::process::id().to_string();
    let out = run(&["--pid", &me, "--max-page-sharing", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-page-sharing 1"), "{out:?}");
    let out = run(&["--pid", &me, &me]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("--pid {me} is given twice")), "{out:?}");
    let out = run(&["--pid", "12x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("12x"), "{out:?}");
    assert_eq!(run(&[]).status.code(), Some(2), "--pid is required");
}

/// A process (its pages: content 5 four times, content 6, 10 unique ones,
/// zeros three times, and 2 pages only read) and the child it forked, which
/// maps the same frames.
fn forked_holder() -> (Holder, [String; 2]) {
    let mut ids: Vec<u64> = vec![5; 4];
    ids.push(6);
    ids.extend(1000..1010);
    ids.extend([0; 3]);
    let h = Holder::start(ids, 2, true);
    let pids = [h.pid(), h.forked.expect("forked").to_string()];
    (h, pids)
}

/// A process and the child it forked map the same frames: as root (page
/// frame numbers visible), each frame counts once. The counters count
/// mappings as the kernel does: a content whose mappings are all one frame
/// stays unshared once and volatile for the others; a content with several
/// frames merges every mapping; only frames are freed.
#[test]
fn a_frame_shared_since_a_fork_counts_once() {
    let (_h, pids) = forked_holder();
    let v = estimate_pids(&pids, &["--mergeable-only"]);
    if !rustix::process::geteuid().is_root() {
        assert_eq!(v["frames_visible"], false, "{v:#}");
        eprintln!("skipped: page frame numbers need root");
        return;
    }
    assert_eq!(v["frames_visible"], true);
    // The parent is read first: had reading it unshared its pages (as a
    // process_vm_readv of them does), the child would map frames of its own.
    let c = &v["counters"];
    // Content 5: 4 frames, 8 mappings. Content 6 and the 10 unique ones:
    // 1 frame, 2 mappings each. Zeros: 3 frames, 6 mappings.
    let (shared, sharing, unshared, volatile) = (2u64, 12u64, 11u64, 11u64);
    let rmap = shared + sharing + unshared + volatile;
    assert_eq!(
        [&c["pages_shared"], &c["pages_sharing"], &c["pages_unshared"], &c["pages_volatile"], &c["ksm_zero_pages"]],
        [shared, sharing, unshared, volatile, 0].map(Value::from).each_ref(),
        "{v:#}"
    );
    assert_eq!(v["rmap_items"], rmap);
    assert_eq!(c["general_profit"], (sharing * PAGE) as i64 - (rmap * 64) as i64, "the kernel's formula");
    // Frames freed: 3 of content 5, 2 of zeros.
    assert_eq!(v["saved_bytes"], 5 * PAGE);
    assert_eq!(v["net_saved_bytes"], (5 * PAGE) as i64 - (rmap * 64) as i64);
    let p = &v["processes"];
    for (i, again) in [(0, 0), (1, 18)] {
        assert_eq!(p[i]["pages_scanned"], 18, "{p:#}");
        assert_eq!(p[i]["pages_mapped_again"], again, "{p:#}");
        assert_eq!(p[i]["pages_zero_mapped"], 2, "{p:#}");
    }
    assert_eq!((&p[0]["pages_freed"], &p[1]["pages_freed"]), (&5.into(), &0.into()));
    // With use_zero_pages: all 6 mappings of zeros go to the zero page, 3 frames freed.
    let z = estimate_pids(&pids, &["--mergeable-only", "--use-zero-pages"]);
    assert_eq!(z["counters"]["ksm_zero_pages"], 6);
    assert_eq!(z["saved_bytes"], 6 * PAGE);
    // In two partitions, each one counts the frame once for itself.
    let d = estimate_pids(&pids, &["--mergeable-only", "--domain", &format!("{}=1", pids[1])]);
    assert_eq!(d["counters"], v["counters"]);
    let alone = estimate_pids(&pids[..1], &["--mergeable-only"]);
    for part in d["partitions"].as_array().unwrap() {
        assert_eq!(part["counters"], alone["counters"], "{d:#}");
    }
}

/// `/proc/PID/ksm_stat` field `name`.
fn ksm_stat(pid: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in ksm_stat: {text}"))
}

#[test]
#[ignore = "takes the machine's ksmd (root): run with --ignored when nothing else uses kernel KSM"]
fn the_kernels_ksmd_reaches_the_estimate() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new(KSM).exists() {
        eprintln!("skipped: needs root and a kernel with KSM");
        return;
    }
    for (m, use_zero_pages) in [(256, false), (3, false), (256, true)] {
        let ksmd = ksmd_with(m, use_zero_pages);
        let hs = holders();
        let mut args = vec!["--mergeable-only".to_string(), "--max-page-sharing".into(), m.to_string()];
        if use_zero_pages {
            args.push("--use-zero-pages".into());
        }
        let v = estimate(&hs, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let want = got(&v);
        ksmd_settled(|| ["pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages"].map(ksm_get));
        let pids: Vec<String> = hs.iter().map(Holder::pid).collect();
        let sum = |name: &str| pids.iter().map(|p| ksm_stat(p, name)).sum::<u64>();
        let kernel = (
            ksm_get("pages_shared"),
            ksm_get("pages_sharing"),
            ksm_get("ksm_zero_pages"),
            sum("ksm_merging_pages"),
            sum("ksm_rmap_items"),
            sum("ksm_zero_pages"),
        );
        let rmap = want.shared + want.sharing + want.unshared;
        let estimated = (want.shared, want.sharing, want.zero, want.shared + want.sharing, rmap, want.zero);
        drop(hs);
        drop(ksmd);
        assert_eq!(
            kernel, estimated,
            "max_page_sharing {m}, use_zero_pages {use_zero_pages}: (pages_shared, pages_sharing, ksm_zero_pages, \
             ksm_stat ksm_merging_pages, ksm_rmap_items, ksm_zero_pages): kernel vs estimate"
        );
    }
}

#[test]
#[ignore = "takes the machine's ksmd (root): run with --ignored when nothing else uses kernel KSM"]
fn the_kernels_ksmd_reaches_the_estimate_after_a_fork() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new(KSM).exists() {
        eprintln!("skipped: needs root and a kernel with KSM");
        return;
    }
    let ksmd = ksmd_with(256, false);
    let (h, pids) = forked_holder();
    let v = estimate_pids(&pids, &["--mergeable-only"]);
    // With smart_scan (the default) ksmd skips pages that failed to merge
    // for a while, and the split of those between pages_unshared and
    // pages_volatile moves from scan to scan; their sum (the rmap items
    // not merged) does not.
    let n = |name: &str| v["counters"][name].as_u64().unwrap();
    let want = [n("pages_shared"), n("pages_sharing"), n("pages_unshared") + n("pages_volatile")];
    let last = ksmd_settled(|| {
        let [shared, sharing, unshared, volatile] =
            ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"].map(ksm_get);
        [shared, sharing, unshared + volatile]
    });
    let per_process: Vec<(u64, u64)> =
        pids.iter().map(|p| (ksm_stat(p, "ksm_rmap_items"), ksm_stat(p, "ksm_merging_pages"))).collect();
    drop(h);
    drop(ksmd);
    assert_eq!(last, want, "(pages_shared, pages_sharing, pages_unshared + pages_volatile): kernel vs estimate");
    // Each process has an rmap item per page it maps (18), and the 8 pages
    // of content 5 and zeros map the KSM pages.
    assert_eq!(per_process, [(18, 7), (18, 7)], "ksm_stat (ksm_rmap_items, ksm_merging_pages) of parent and child");
}
