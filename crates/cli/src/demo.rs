//! `samepage demo`.

use crate::args::UsageError;
use crate::measure::{converge, Memory};
use crate::side::{KernelSide, SamepageOptions, SamepageSide, Settings, Side};
use crate::workload::{Mem, Workload, HUGE_SUBPAGES, PAGE};
use crate::{procfs, sysctl};
use anyhow::{Context, Result};
use clap::Args;
use samepage::testing::AnonMapping;
use samepage::{Run, SpaceStats, Tunables, UffdMode};
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the synthetic workload (bytes, or with K, M, G suffix).
    #[arg(long, default_value = "1G", value_parser = crate::args::parse_size)]
    size: u64,
    /// Merge empty pages with the kernel's zero page.
    #[arg(long)]
    use_zero_pages: bool,
    /// Most mappings of one stable page (2 to 2147483647).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..=i32::MAX as i64))]
    max_page_sharing: u32,
    /// Pages scanned per batch (full speed by default).
    #[arg(long, default_value_t = 20_000)]
    pages_to_scan: u32,
    /// Sleep between batches, in milliseconds.
    #[arg(long, default_value_t = 0)]
    sleep_ms: u32,
    /// smart_scan: skip pages that keep failing to merge.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    smart_scan: bool,
    /// stable_node_defrag: refile mappings of sparse dups into dups with room.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stable_node_defrag: bool,
    /// stable_node_chains_prune_millisecs.
    #[arg(long, default_value_t = 2000)]
    prune_ms: u32,
    /// advisor_mode: none or scan-time (then pages_to_scan is the advisor's).
    #[arg(long, default_value = "none", value_parser = ["none", "scan-time"])]
    advisor_mode: String,
    /// advisor_max_cpu (percent, 1 to 100).
    #[arg(long, default_value_t = 70)]
    advisor_max_cpu: u32,
    /// advisor_target_scan_time (seconds, at least 1).
    #[arg(long, default_value_t = 200)]
    advisor_target_scan_time: u64,
    /// advisor_min_pages_to_scan.
    #[arg(long, default_value_t = 500)]
    advisor_min_pages_to_scan: u32,
    /// advisor_max_pages_to_scan.
    #[arg(long, default_value_t = 30000)]
    advisor_max_pages_to_scan: u32,
    /// After converging, write this percentage of the duplicate pages (making
    /// them unique) and converge again: shows pruning and defragmentation
    /// bringing the stable pages back to the minimum the mappings need.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    churn: u8,
    /// Load these files instead of the synthetic mix (each page aligned, last page zero padded).
    #[arg(long, num_args = 1..)]
    files: Vec<PathBuf>,
    /// How many times to load --files.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    copies: u32,
    /// Distinct contents the synthetic mix copies.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    distinct: u64,
    /// Build the workload in transparent huge pages (`MADV_HUGEPAGE`, 2 MiB
    /// aligned): a few huge pages mostly duplicate, many with one duplicate
    /// subpage each. Reports AnonHugePages and a random-read pass.
    #[arg(long)]
    thp: bool,
    /// thp_split_min_subpages: split a huge page only if this many of its
    /// 512 subpages would merge (1 = the kernel's behaviour).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=HUGE_SUBPAGES as i64))]
    thp_split_min_subpages: u32,
    /// Random 8-byte reads in the timed pass over the region (with --thp).
    #[arg(long, default_value_t = 4_000_000)]
    random_reads: u64,
    /// Seed of the synthetic layout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of the vm.max_map_count headroom the engine may use (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    vma_share: f64,
    /// Do not raise vm.max_map_count even as root.
    #[arg(long)]
    no_raise_map_count: bool,
    /// Merge with the kernel's ksmd instead (root; for comparison on the same content).
    #[arg(long)]
    kernel: bool,
    /// Give up waiting for convergence after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// One JSON object on stdout instead of the report.
    #[arg(long)]
    json: bool,
}

/// What a side (samepage or the kernel) reached.
struct Outcome {
    /// Every counter, kernel names.
    counters: Vec<(&'static str, i64)>,
    converge: Duration,
    cpu: Duration,
    before: Memory,
    after: Memory,
    integrity_bad_pages: u64,
    /// With --thp: (AnonHugePages before, after; random-read pass before, after merging).
    thp: Option<ThpOutcome>,
    /// What only samepage's engine reports.
    engine: Option<EngineFacts>,
}

/// samepage's engine at the end of its run.
struct EngineFacts {
    uffd_mode: UffdMode,
    vma_limit: u64,
    space: SpaceStats,
    /// Mappings in the process.
    mappings: u64,
}

impl Outcome {
    /// A counter by name (0 if the side has no such counter).
    fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|(k, _)| *k == name).map_or(0, |(_, v)| *v as u64)
    }
}

#[derive(Clone, Copy, Debug)]
struct ThpOutcome {
    huge_before: u64,
    huge_after: u64,
    read_before: Duration,
    read_after: Duration,
}

impl ThpOutcome {
    /// Huge pages and the read pass over `m` now, with `before` (from
    /// [`ThpOutcome::measure`] before merging).
    fn after(before: (u64, Duration), m: &AnonMapping, reads: u64) -> ThpOutcome {
        let (huge_after, read_after) = ThpOutcome::measure(m, reads);
        ThpOutcome { huge_before: before.0, huge_after, read_before: before.1, read_after }
    }

    /// `AnonHugePages` and the read pass over `m`.
    fn measure(m: &AnonMapping, reads: u64) -> (u64, Duration) {
        (anon_huge(), random_read_pass(m, reads))
    }
}

/// A fixed pass of `n` random 8-byte reads over `m` (same addresses every
/// run): huge pages make it cheaper (fewer TLB misses). One untimed pass,
/// then the fastest of three.
fn random_read_pass(m: &AnonMapping, n: u64) -> Duration {
    let words = m.len() / 8;
    let mut best = Duration::MAX;
    for pass in 0..4 {
        let mut rng = fastrand::Rng::with_seed(4242);
        let mut sum = 0u64;
        let start = std::time::Instant::now();
        let mut v = 0u64;
        for _ in 0..n {
            // Each address depends on the value read before (merging changes
            // no content, so the addresses are the same before and after):
            // the reads cannot overlap, and each pays its TLB miss in full.
            let i = (rng.usize(..words) ^ v as usize) % words;
            v = m.read_u64(i * 8).expect("inside");
            sum = sum.wrapping_add(v);
        }
        if pass > 0 {
            best = best.min(start.elapsed());
        }
        std::hint::black_box(sum);
    }
    best
}

fn anon_huge() -> u64 {
    let [huge] = procfs::smaps_rollup(&["AnonHugePages"]);
    huge.unwrap_or(0)
}

/// The bytes churn() writes into page `i` (unique to it).
fn churn_mark(i: usize) -> [u8; 8] {
    (i as u64 | 0xC4u64 << 56).to_ne_bytes()
}

/// Writes `percent` of the pages whose content has copies, making them
/// unique; returns them.
fn churn(w: &Workload, region: &dyn Mem, percent: u8) -> HashSet<usize> {
    let mut copies: std::collections::HashMap<crate::workload::Content, u64> = std::collections::HashMap::new();
    for c in &w.pages {
        *copies.entry(*c).or_default() += 1;
    }
    let mut rng = fastrand::Rng::with_seed(77);
    let mut churned = HashSet::new();
    for (i, c) in w.pages.iter().enumerate() {
        if copies[c] >= 2 && rng.u8(..100) < percent {
            region.write(i * PAGE + 100, &churn_mark(i));
            churned.insert(i);
        }
    }
    churned
}

/// Pages that differ from the workload, the churned ones expected with their mark.
fn check(w: &Workload, m: &dyn Mem, churned: Option<&HashSet<usize>>) -> u64 {
    w.mismatches(m, |i, want| {
        if churned.is_some_and(|c| c.contains(&i)) {
            want[100..108].copy_from_slice(&churn_mark(i));
        }
    })
}

/// `(pages_shared, pages_sharing, ksm_zero_pages)` once the content is fully merged.
type Expected = (u64, u64, u64);

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    let w = workload(&a)?;
    let tunables = tunables(&a)?;
    let expected = w.expected(a.max_page_sharing as u64, a.use_zero_pages)?;
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    say(header(&a, &w));
    let mut notes = Vec::new();
    let o = if a.kernel {
        merge_with_kernel(&a, &w, &say)?
    } else {
        merge_with_samepage(&a, &w, tunables, expected, &say, &mut notes)?
    };
    let s = Summary::new(&o, expected, &mut notes);
    if a.json {
        print_json(&a, &w, &o, expected, &s, &notes)?;
    } else {
        print_text(&a, &w, &o, expected, &s, &notes);
    }
    if !s.integrity {
        anyhow::bail!("integrity check failed: {} pages differ from what was written", o.integrity_bad_pages);
    }
    Ok(ExitCode::SUCCESS)
}

/// The workload the flags ask for (checking the flags that shape it).
fn workload(a: &DemoArgs) -> Result<Workload> {
    if !(0.0..=1.0).contains(&a.vma_share) {
        return Err(UsageError(format!("--vma-share {} is out of range: 0 to 1", a.vma_share)).into());
    }
    if a.thp && !a.files.is_empty() {
        return Err(UsageError("--thp builds its own workload: it cannot be combined with --files".into()).into());
    }
    if a.thp {
        Ok(Workload::thp(a.size, a.seed))
    } else if a.files.is_empty() {
        Ok(Workload::mix(a.size, a.distinct, a.seed))
    } else {
        for p in &a.files {
            if let Err(e) = std::fs::metadata(p) {
                return Err(UsageError(format!("--files {}: {e}", p.display())).into());
            }
        }
        Ok(Workload::files(&a.files, a.copies).map_err(|e| UsageError(format!("{e:#}")))?)
    }
}

/// samepage's tunables from the flags, validated as the kernel's sysfs does.
fn tunables(a: &DemoArgs) -> Result<Tunables> {
    let mut tunables = Tunables {
        run: Run::Stop,
        pages_to_scan: a.pages_to_scan,
        sleep_millisecs: a.sleep_ms,
        max_page_sharing: a.max_page_sharing,
        use_zero_pages: a.use_zero_pages,
        smart_scan: a.smart_scan,
        stable_node_defrag: a.stable_node_defrag,
        stable_node_chains_prune_millisecs: a.prune_ms,
        advisor_max_cpu: a.advisor_max_cpu,
        advisor_target_scan_time: a.advisor_target_scan_time,
        advisor_min_pages_to_scan: a.advisor_min_pages_to_scan,
        advisor_max_pages_to_scan: a.advisor_max_pages_to_scan,
        thp_split_min_subpages: a.thp_split_min_subpages,
        ..Tunables::default()
    };
    tunables.validate().map_err(|e| UsageError(e.to_string()))?;
    tunables.set("advisor_mode", &a.advisor_mode).map_err(|e| UsageError(e.to_string()))?;
    if a.churn > 0 && a.kernel {
        return Err(UsageError("--churn is for samepage's own run (not --kernel)".into()).into());
    }
    Ok(tunables)
}

/// The first line: what the workload is.
fn header(a: &DemoArgs, w: &Workload) -> String {
    format!(
        "samepage demo: {} ({} MiB, {} pages){}",
        w.name,
        w.bytes() >> 20,
        w.pages.len(),
        if a.thp {
            ", in transparent huge pages"
        } else if a.files.is_empty() {
            ": 25% zero pages, 50% copies of a small set, 25% unique, scattered"
        } else {
            ""
        }
    )
}

/// Writes the workload into the side's memory, merges it until the counters
/// hold still, runs `after_converging` (still merging), stops and checks
/// every byte.
fn merge<S: Side>(
    side: &mut S,
    a: &DemoArgs,
    w: &Workload,
    say: &dyn Fn(String),
    after_converging: impl FnOnce(&S) -> Result<Option<HashSet<usize>>>,
) -> Result<Outcome> {
    w.write_into(side.mem());
    let ready = side.ready();
    if a.kernel {
        ready.context("--kernel")?;
    } else {
        ready?;
    }
    let thp_before = side.mapping().filter(|_| a.thp).map(|m| ThpOutcome::measure(m, a.random_reads));
    let before = Memory::now();
    side.start()?;
    say(format!("{}: merging", side.label()));
    let (converge_t, cpu) = converge(Duration::from_secs(a.timeout), a.json, || side.poll())?;
    let churned = after_converging(side)?;
    side.stop()?;
    let after = Memory::now();
    let counters = side.counters()?;
    let thp = thp_before.zip(side.mapping()).map(|(b, m)| ThpOutcome::after(b, m, a.random_reads));
    let integrity_bad_pages = check(w, side.mem(), churned.as_ref());
    Ok(Outcome { counters, converge: converge_t, cpu, before, after, integrity_bad_pages, thp, engine: None })
}

/// The workload merged by the kernel's ksmd.
fn merge_with_kernel(a: &DemoArgs, w: &Workload, say: &dyn Fn(String)) -> Result<Outcome> {
    let settings = Settings {
        pages_to_scan: a.pages_to_scan,
        sleep_millisecs: a.sleep_ms,
        max_page_sharing: a.max_page_sharing,
        use_zero_pages: a.use_zero_pages,
    };
    let mut side = KernelSide::new(w.bytes() as usize, a.thp, settings)?;
    merge(&mut side, a, w, say, |_| Ok(None))
}

/// The workload merged by samepage's engine (and churned with --churn).
fn merge_with_samepage(
    a: &DemoArgs,
    w: &Workload,
    tunables: Tunables,
    (shared, sharing, zero): Expected,
    say: &dyn Fn(String),
    notes: &mut Vec<String>,
) -> Result<Outcome> {
    let mut side = SamepageSide::new(SamepageOptions {
        tunables,
        vma_share: a.vma_share,
        len: w.bytes() as usize,
        thp: a.thp,
        raise_map_count_for: (!a.no_raise_map_count)
            .then_some(shared + sharing + if a.use_zero_pages { 0 } else { zero }),
    })?;
    if let Some((old, want)) = side.raised {
        let msg = format!("vm.max_map_count raised {old} -> {want} for this run (restored at exit)");
        say(msg.clone());
        notes.push(msg);
    }
    let info = side.engine().info().clone();
    if info.uffd_mode == UffdMode::UserModeOnly {
        let msg = "userfaultfd: user-mode-only (no privilege for full mode): a system call writing into a page during its merge window fails with EFAULT".to_string();
        say(format!("warning: {msg}"));
        notes.push(msg);
    }
    let mut o = merge(&mut side, a, w, say, |side| churn_and_converge(a, w, side, say, notes))?;
    o.engine = Some(EngineFacts {
        uffd_mode: info.uffd_mode,
        vma_limit: info.vma_limit,
        space: side.engine().space_stats(),
        mappings: procfs::mappings(),
    });
    Ok(o)
}

/// With --churn: writes that share of the duplicate pages, converges again
/// and waits for pruning and defragmentation; returns the pages written.
fn churn_and_converge(
    a: &DemoArgs,
    w: &Workload,
    side: &SamepageSide,
    say: &dyn Fn(String),
    notes: &mut Vec<String>,
) -> Result<Option<HashSet<usize>>> {
    if a.churn == 0 {
        return Ok(None);
    }
    let engine = side.engine();
    let r = churn(w, side.mem(), a.churn);
    let before = engine.counters()?;
    converge(Duration::from_secs(a.timeout), a.json, || side.poll())?;
    // Two prune intervals, so pruning and defragmentation have run.
    std::thread::sleep(Duration::from_millis(2 * a.prune_ms as u64 + 100));
    let after = engine.counters()?;
    let needed = engine.stable_pages_needed()?;
    let msg = format!(
        "churn: wrote {} of the duplicate pages; stable pages (dups) {} -> {} for a minimum of {} \
         (ceil(mappings / max_page_sharing) per content), {} mappings refiled",
        r.len(),
        before.pages_shared,
        after.pages_shared,
        needed,
        after.stable_node_refiled
    );
    say(msg.clone());
    notes.push(msg);
    Ok(Some(r))
}

/// What the outcome means against the content.
struct Summary {
    /// Bytes of pages that duplicate another (or are zero).
    dup_bytes: u64,
    /// Freed system-wide, net of the pool.
    net_freed: i64,
    /// Freed in this process's own accounting (see [`Memory`]).
    process_freed: i64,
    /// The counters reached what the content implies.
    matches: bool,
    left_unmerged: u64,
    integrity: bool,
}

impl Summary {
    fn new(o: &Outcome, (exp_shared, exp_sharing, exp_zero): Expected, notes: &mut Vec<String>) -> Summary {
        let (shared, sharing, zero) =
            (o.counter("pages_shared"), o.counter("pages_sharing"), o.counter("ksm_zero_pages"));
        let left_unmerged = (exp_sharing + exp_zero).saturating_sub(sharing + zero);
        if o.counter("vma_budget_skips") > 0 {
            notes.push(format!(
                "the VMA budget (vm.max_map_count {}, engine limit {} mappings) left {left_unmerged} duplicate pages unmerged; as root, samepage demo raises the limit for its run (or: sysctl vm.max_map_count=N)",
                sysctl::max_map_count(),
                o.engine.as_ref().map_or(0, |e| e.vma_limit)
            ));
        }
        Summary {
            dup_bytes: (exp_sharing + exp_zero) * PAGE as u64,
            net_freed: o.before.freed_system(&o.after),
            process_freed: o.before.freed_process(&o.after),
            matches: (shared, sharing, zero) == (exp_shared, exp_sharing, exp_zero),
            left_unmerged,
            integrity: o.integrity_bad_pages == 0,
        }
    }
}

fn print_json(
    a: &DemoArgs,
    w: &Workload,
    o: &Outcome,
    (exp_shared, exp_sharing, exp_zero): Expected,
    s: &Summary,
    notes: &[String],
) -> Result<()> {
    let counters: serde_json::Map<String, serde_json::Value> =
        o.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let out = json!({
        "workload": w.name,
        "engine": if a.kernel { "kernel" } else { "samepage" },
        "bytes": w.bytes(),
        "uffd_mode": o.engine.as_ref().map(|e| format!("{:?}", e.uffd_mode)),
        "vma_limit": o.engine.as_ref().map(|e| e.vma_limit),
        "counters": counters,
        "expected": { "pages_shared": exp_shared, "pages_sharing": exp_sharing, "ksm_zero_pages": exp_zero },
        "counters_match_expected": s.matches,
        "memory": {
            "anon_before_bytes": o.before.anon,
            "anon_after_bytes": o.after.anon,
            "shmem_before_bytes": o.before.shmem,
            "shmem_after_bytes": o.after.shmem,
            "process_before_bytes": o.before.process,
            "process_after_bytes": o.after.process,
        },
        "freed_bytes": s.net_freed,
        "freed_bytes_process": s.process_freed,
        "duplicate_bytes": s.dup_bytes,
        "left_unmerged_pages": s.left_unmerged,
        "integrity": s.integrity,
        "converge_seconds": o.converge.as_secs_f64(),
        "engine_cpu_seconds": o.cpu.as_secs_f64(),
        "syscalls": o.engine.as_ref().map(|e| { let s = &e.space; json!({
            "pool_maps": s.pool_maps, "moves": s.moves, "pages_moved": s.pages_moved, "windows": s.windows,
            "write_protects": s.write_protects, "unshares": s.unshares,
            "pagemap_scans": s.pagemap_scans, "pages_hashed": s.pages_hashed })}),
        "mappings_after": o.engine.as_ref().map(|e| e.mappings),
        "thp": o.thp.map(|t| json!({
            "thp_split_min_subpages": if a.kernel { 1 } else { a.thp_split_min_subpages },
            "anon_huge_bytes_before": t.huge_before,
            "anon_huge_bytes_after": t.huge_after,
            "random_reads": a.random_reads,
            "random_read_seconds_before": t.read_before.as_secs_f64(),
            "random_read_seconds_after": t.read_after.as_secs_f64(),
        })),
        "notes": notes,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn print_text(
    a: &DemoArgs,
    w: &Workload,
    o: &Outcome,
    (exp_shared, exp_sharing, exp_zero): Expected,
    s: &Summary,
    notes: &[String],
) {
    let who = if a.kernel { "kernel ksmd" } else { "samepage" };
    println!("{who}: converged in {:.2} s, {:.2} s of CPU", o.converge.as_secs_f64(), o.cpu.as_secs_f64());
    println!("counters:");
    for (k, v) in &o.counters {
        println!("  {k:<20} {v}");
    }
    if a.thp && a.thp_split_min_subpages > 1 && !a.kernel {
        println!(
            "with every huge page split (thp_split_min_subpages 1, the kernel's behaviour) the content gives \
             pages_shared {exp_shared}, pages_sharing {exp_sharing}; the threshold kept {} huge pages whole",
            o.counter("thp_kept_whole")
        );
    } else if a.churn == 0 {
        println!(
            "expected from the content: pages_shared {exp_shared}, pages_sharing {exp_sharing}, ksm_zero_pages {exp_zero}: {}",
            if s.matches { "reached" } else { "NOT reached" }
        );
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "memory (/proc/meminfo): AnonPages {:.1} -> {:.1} MiB, Shmem (the pool) {:.1} -> {:.1} MiB",
        mib(o.before.anon),
        mib(o.after.anon),
        mib(o.before.shmem),
        mib(o.after.shmem)
    );
    println!(
        "memory (this process, smaps_rollup Pss_Anon + Pss_Shmem): {:.1} -> {:.1} MiB",
        mib(o.before.process),
        mib(o.after.process)
    );
    let share = |b: i64| 100.0 * b as f64 / s.dup_bytes.max(1) as f64;
    println!(
        "freed {:.1} MiB net of the pool = {:.1}% of the {:.1} MiB of duplicate pages (this process: {:.1} MiB = {:.1}%)",
        s.net_freed as f64 / (1 << 20) as f64,
        share(s.net_freed),
        mib(s.dup_bytes),
        s.process_freed as f64 / (1 << 20) as f64,
        share(s.process_freed)
    );
    if let Some(e) = &o.engine {
        let sp = &e.space;
        println!(
            "system calls: {} windows, {} UFFDIO_MOVE ({} pages), {} pool mmaps, {} write-protect ioctls, {} PAGEMAP_SCAN; {} mappings in the process",
            sp.windows, sp.moves, sp.pages_moved, sp.pool_maps, sp.write_protects, sp.pagemap_scans, e.mappings
        );
    }
    if let Some(t) = &o.thp {
        println!(
            "huge pages (smaps AnonHugePages): {:.0} -> {:.0} MiB; {} random reads: {:.0} ms before merging, {:.0} ms after",
            mib(t.huge_before),
            mib(t.huge_after),
            a.random_reads,
            t.read_before.as_secs_f64() * 1e3,
            t.read_after.as_secs_f64() * 1e3
        );
    }
    for n in notes {
        println!("note: {n}");
    }
    println!(
        "integrity: {} pages checked byte for byte: {}",
        w.pages.len(),
        if s.integrity { "OK".to_string() } else { format!("{} pages DIFFER", o.integrity_bad_pages) }
    );
}
