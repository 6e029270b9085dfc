//! `samepage demo`.

use crate::measure::{anon_shmem, converge, Progress};
use crate::workload::{Mem, Workload, PAGE};
use crate::{sysctl, UsageError};
use anyhow::{Context, Result};
use clap::Args;
use samepage::kernel::KernelKsm;
use samepage::testing::AnonMapping;
use samepage::{procfs, Counters, Engine, Run, Tunables, UffdMode};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the synthetic workload (bytes, or with K, M, G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
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
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=512))]
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

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?} in {s:?}: use K, M, G or T")),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size: expected e.g. 4096, 64M, 1G"))?;
    let bytes = n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < PAGE as u64 || bytes > 1 << 40 {
        return Err(format!("size {s} is out of range: 4096 bytes to 1T"));
    }
    Ok(bytes)
}

/// What a side (samepage or the kernel) reached.
struct Outcome {
    /// Every counter, kernel names.
    counters: Vec<(&'static str, i64)>,
    converge: Duration,
    cpu: Duration,
    anon_before: u64,
    anon_after: u64,
    shmem_before: u64,
    shmem_after: u64,
    integrity_bad_pages: u64,
    /// With --thp: (AnonHugePages before, after; random-read pass before, after merging).
    thp: Option<ThpOutcome>,
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
    procfs::smaps_rollup("AnonHugePages").unwrap_or(0)
}

/// The bytes churn() writes into page `i` (unique to it).
fn churn_mark(i: usize) -> [u8; 8] {
    (i as u64 | 0xC4u64 << 56).to_ne_bytes()
}

/// Writes `percent` of the pages whose content has copies, making them
/// unique; returns them.
fn churn(w: &Workload, region: &dyn Mem, percent: u8) -> std::collections::HashSet<usize> {
    let mut copies: std::collections::HashMap<crate::workload::Content, u64> = std::collections::HashMap::new();
    for c in &w.pages {
        *copies.entry(*c).or_default() += 1;
    }
    let mut rng = fastrand::Rng::with_seed(77);
    let mut churned = std::collections::HashSet::new();
    for (i, c) in w.pages.iter().enumerate() {
        if copies[c] >= 2 && rng.u8(..100) < percent {
            region.write(i * PAGE + 100, &churn_mark(i));
            churned.insert(i);
        }
    }
    churned
}

fn key(c: &Counters) -> (u64, u64, u64) {
    (c.pages_shared, c.pages_sharing, c.ksm_zero_pages)
}

/// Pages that differ from the workload, the churned ones expected with their mark.
fn check(w: &Workload, m: &dyn Mem, churned: Option<&std::collections::HashSet<usize>>) -> u64 {
    w.mismatches(m, |i, want| {
        if churned.is_some_and(|c| c.contains(&i)) {
            want[100..108].copy_from_slice(&churn_mark(i));
        }
    })
}

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.vma_share) {
        return Err(UsageError(format!("--vma-share {} is out of range: 0 to 1", a.vma_share)).into());
    }
    if a.thp && !a.files.is_empty() {
        return Err(UsageError("--thp builds its own workload: it cannot be combined with --files".into()).into());
    }
    let w = if a.thp {
        Workload::thp(a.size, a.seed)
    } else if a.files.is_empty() {
        Workload::mix(a.size, a.distinct, a.seed)
    } else {
        for p in &a.files {
            if let Err(e) = std::fs::metadata(p) {
                return Err(UsageError(format!("--files {}: {e}", p.display())).into());
            }
        }
        Workload::files(&a.files, a.copies).map_err(|e| UsageError(format!("{e:#}")))?
    };
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
    let (exp_shared, exp_sharing, exp_zero) = w.expected(a.max_page_sharing as u64, a.use_zero_pages);
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    say(format!(
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
    ));
    let mut notes = Vec::new();
    let mut uffd_mode = None;
    let mut vma_limit = None;
    let mut space = None;
    let o = if a.kernel {
        run_kernel(&a, &w, &say)?
    } else {
        // Isolated merges take up to two mappings each: make room as root.
        let mut _guard = None;
        if !a.no_raise_map_count {
            let need = (exp_shared + exp_sharing + if a.use_zero_pages { 0 } else { exp_zero }) * 2;
            let want = procfs::mappings() + ((need + 10_000) as f64 / a.vma_share.max(0.01)) as u64;
            if let Some((g, old)) = sysctl::raise(want) {
                let msg = format!("vm.max_map_count raised {old} -> {want} for this run (restored at exit)");
                say(msg.clone());
                notes.push(msg);
                _guard = Some(g);
            }
        }
        let engine = Engine::with_vma_budget(tunables.clone(), a.vma_share)?;
        let info = engine.info().clone();
        uffd_mode = Some(info.uffd_mode);
        vma_limit = Some(info.vma_limit);
        if info.uffd_mode == UffdMode::UserModeOnly {
            let msg = "userfaultfd: user-mode-only (no privilege for full mode): a system call writing into a page during its merge window fails with EFAULT".to_string();
            say(format!("warning: {msg}"));
            notes.push(msg);
        }
        // With --thp, huge-page memory the program registers; else a region the engine allocates.
        let huge_mem = if a.thp { Some(AnonMapping::new_huge(w.bytes() as usize)?) } else { None };
        let region = if a.thp { None } else { Some(engine.alloc_region(w.bytes() as usize)?) };
        let mem: &dyn Mem = match &huge_mem {
            Some(m) => m,
            None => region.as_ref().expect("allocated above"),
        };
        w.write_into(mem);
        let registered = match &huge_mem {
            // SAFETY: the mapping outlives its registration (unregistered below).
            Some(m) => Some(unsafe { engine.register(m.as_ptr(), m.len()) }?),
            None => None,
        };
        let thp_before = huge_mem.as_ref().map(|m| ThpOutcome::measure(m, a.random_reads));
        let (anon_before, shmem_before) = anon_shmem();
        engine.set_run(Run::Merge)?;
        let (converge_t, cpu) = converge(Duration::from_secs(a.timeout), a.json, || {
            let c = engine.counters()?;
            Ok(Progress { key: key(&c), unshared: c.pages_unshared, full_scans: c.full_scans, cpu: engine.cpu_time() })
        })?;
        let churned = if a.churn > 0 {
            let r = churn(&w, mem, a.churn);
            let before = engine.counters()?;
            converge(Duration::from_secs(a.timeout), a.json, || {
                let c = engine.counters()?;
                Ok(Progress {
                    key: key(&c),
                    unshared: c.pages_unshared,
                    full_scans: c.full_scans,
                    cpu: engine.cpu_time(),
                })
            })?;
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
            Some(r)
        } else {
            None
        };
        engine.set_run(Run::Stop)?;
        let (anon_after, shmem_after) = anon_shmem();
        let c = engine.counters()?;
        let thp = thp_before.zip(huge_mem.as_ref()).map(|(b, m)| ThpOutcome::after(b, m, a.random_reads));
        let bad = check(&w, mem, churned.as_ref());
        space = Some((engine.space_stats(), procfs::mappings()));
        let o = Outcome {
            counters: c.named(),
            converge: converge_t,
            cpu,
            anon_before,
            anon_after,
            shmem_before,
            shmem_after,
            integrity_bad_pages: bad,
            thp,
        };
        if let Some(id) = registered {
            engine.unregister(id)?;
        }
        drop(region);
        drop(huge_mem);
        o
    };

    let dup_bytes = (exp_sharing + exp_zero) * PAGE as u64;
    let anon_freed = o.anon_before.saturating_sub(o.anon_after);
    let net_freed = anon_freed as i64 - o.shmem_after as i64 + o.shmem_before as i64;
    let (shared, sharing, zero) = (o.counter("pages_shared"), o.counter("pages_sharing"), o.counter("ksm_zero_pages"));
    let matches = (shared, sharing, zero) == (exp_shared, exp_sharing, exp_zero);
    let left_unmerged = (exp_sharing + exp_zero).saturating_sub(sharing + zero);
    let budget_skips = o.counter("vma_budget_skips");
    if budget_skips > 0 {
        notes.push(format!(
            "the VMA budget (vm.max_map_count {}, engine limit {} mappings) left {left_unmerged} duplicate pages unmerged; as root, samepage demo raises the limit for its run (or: sysctl vm.max_map_count=N)",
            sysctl::max_map_count(),
            vma_limit.unwrap_or(0)
        ));
    }
    let integrity = o.integrity_bad_pages == 0;
    if a.json {
        let counters: serde_json::Map<String, serde_json::Value> =
            o.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let out = json!({
            "workload": w.name,
            "engine": if a.kernel { "kernel" } else { "samepage" },
            "bytes": w.bytes(),
            "uffd_mode": uffd_mode.map(|m| format!("{m:?}")),
            "vma_limit": vma_limit,
            "counters": counters,
            "expected": { "pages_shared": exp_shared, "pages_sharing": exp_sharing, "ksm_zero_pages": exp_zero },
            "counters_match_expected": matches,
            "memory": {
                "anon_before_bytes": o.anon_before,
                "anon_after_bytes": o.anon_after,
                "shmem_before_bytes": o.shmem_before,
                "shmem_after_bytes": o.shmem_after,
            },
            "freed_bytes": net_freed,
            "duplicate_bytes": dup_bytes,
            "left_unmerged_pages": left_unmerged,
            "integrity": integrity,
            "converge_seconds": o.converge.as_secs_f64(),
            "engine_cpu_seconds": o.cpu.as_secs_f64(),
            "syscalls": space.as_ref().map(|(s, _)| json!({
                "pool_maps": s.pool_maps, "moves": s.moves, "pages_moved": s.pages_moved, "windows": s.windows,
                "write_protects": s.write_protects, "unshares": s.unshares,
                "pagemap_scans": s.pagemap_scans, "pages_hashed": s.pages_hashed })),
            "mappings_after": space.as_ref().map(|(_, m)| m),
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
    } else {
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
                if matches { "reached" } else { "NOT reached" }
            );
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "memory (/proc/meminfo): AnonPages {:.1} -> {:.1} MiB, Shmem (the pool) {:.1} -> {:.1} MiB",
            mib(o.anon_before),
            mib(o.anon_after),
            mib(o.shmem_before),
            mib(o.shmem_after)
        );
        println!(
            "freed {:.1} MiB net of the pool = {:.1}% of the {:.1} MiB of duplicate pages",
            net_freed as f64 / (1 << 20) as f64,
            100.0 * net_freed as f64 / dup_bytes.max(1) as f64,
            mib(dup_bytes)
        );
        if let Some((s, maps)) = &space {
            println!(
                "system calls: {} windows, {} UFFDIO_MOVE ({} pages), {} pool mmaps, {} write-protect ioctls, {} PAGEMAP_SCAN; {} mappings in the process",
                s.windows, s.moves, s.pages_moved, s.pool_maps, s.write_protects, s.pagemap_scans, maps
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
        for n in &notes {
            println!("note: {n}");
        }
        println!(
            "integrity: {} pages checked byte for byte: {}",
            w.pages.len(),
            if integrity { "OK".to_string() } else { format!("{} pages DIFFER", o.integrity_bad_pages) }
        );
    }
    if !integrity {
        anyhow::bail!("integrity check failed: {} pages differ from what was written", o.integrity_bad_pages);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_kernel(a: &DemoArgs, w: &Workload, say: &dyn Fn(String)) -> Result<Outcome> {
    let m = if a.thp { AnonMapping::new_huge(w.bytes() as usize)? } else { AnonMapping::new(w.bytes() as usize)? };
    w.write_into(&m);
    let thp_before = a.thp.then(|| ThpOutcome::measure(&m, a.random_reads));
    let k = KernelKsm::take().context("--kernel")?;
    for (name, v) in [
        ("pages_to_scan", a.pages_to_scan.to_string()),
        ("sleep_millisecs", a.sleep_ms.to_string()),
        ("max_page_sharing", a.max_page_sharing.to_string()),
        ("use_zero_pages", u8::from(a.use_zero_pages).to_string()),
    ] {
        k.set(name, &v)?;
    }
    let (anon_before, shmem_before) = anon_shmem();
    let cpu0 = k.ksmd_cpu();
    let scans0 = k.get("full_scans")? as u64;
    m.advise_kernel_mergeable()?;
    k.set("run", "1")?;
    say("kernel ksmd: merging".into());
    let (converge_t, cpu) = converge(Duration::from_secs(a.timeout), a.json, || {
        let g = |n| k.get(n).map(|v| v as u64);
        Ok(Progress {
            key: (g("pages_shared")?, g("pages_sharing")?, g("ksm_zero_pages")?),
            unshared: g("pages_unshared")?,
            full_scans: g("full_scans")? - scans0,
            cpu: k.ksmd_cpu() - cpu0,
        })
    })?;
    k.set("run", "0")?;
    let (anon_after, shmem_after) = anon_shmem();
    let counters = k.counters()?;
    let thp = thp_before.map(|b| ThpOutcome::after(b, &m, a.random_reads));
    let bad = check(w, &m, None);
    Ok(Outcome {
        counters,
        converge: converge_t,
        cpu,
        anon_before,
        anon_after,
        shmem_before,
        shmem_after,
        integrity_bad_pages: bad,
        thp,
    })
}
