//! `samepage bench`: samepage against the kernel's ksmd on identical content,
//! one after the other in the same run.
//!
//! For each side: time and CPU to converge, counters, memory freed as
//! /proc/meminfo reports it and in this process's own accounting
//! (`/proc/self/smaps_rollup`, see `measure::Memory`), metadata per page (samepage's own plus the
//! `vm_area_struct` slab its mappings take), CPU per full scan once converged,
//! the latency of a first write to a merged page, and the throughput of an
//! application thread writing to an extra tenth of the memory during
//! convergence against the same thread with no merging.

use crate::args::UsageError;
use crate::measure::{converge, vma_slab_bytes, Memory, Progress};
use crate::procfs;
use crate::side::{metadata_bytes, KernelSide, SamepageOptions, SamepageSide, Settings, Side};
use crate::workload::{Content, Mem, Workload, PAGE};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use samepage::{Run, Tunables};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The demo's synthetic mix, scattered (--size, --distinct).
    Mix,
    /// --files loaded --copies times: content in long runs.
    Files,
    /// The same pages as `files`, shuffled as a guest's allocator would place them.
    FilesScattered,
    /// Mostly unique pages (95%): the cost of scanning memory that does not merge.
    Unique,
    /// mix, files, files-scattered and unique, one after the other.
    All,
    /// --processes processes sharing the mix's copies (--size in all),
    /// merged across processes: ksmd against engines connected to a daemon.
    Processes,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which workload.
    #[arg(long, value_enum, default_value = "mix")]
    workload: Kind,
    /// Size of the mix and unique workloads (bytes, or K, M, G suffix).
    #[arg(long, default_value = "1G", value_parser = crate::args::parse_size)]
    size: u64,
    /// Processes of the `processes` workload (2 or more).
    #[arg(long, default_value_t = 4)]
    processes: u64,
    /// Distinct contents of the mix workload.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    distinct: u64,
    /// Files for the files workloads (default: the four largest libraries in /usr/lib/x86_64-linux-gnu).
    #[arg(long, num_args = 1..)]
    files: Vec<PathBuf>,
    /// How many times the files are loaded.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    copies: u32,
    /// pages_to_scan for both sides (sleep_millisecs is 0 for both).
    #[arg(long, default_value_t = 20_000)]
    pages_to_scan: u32,
    /// max_page_sharing for both sides.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..=i32::MAX as i64))]
    max_page_sharing: u32,
    /// use_zero_pages for both sides.
    #[arg(long)]
    use_zero_pages: bool,
    /// Seed of the layouts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measure samepage only.
    #[arg(long)]
    samepage_only: bool,
    /// Run each side this many times, alternating, and report medians (this
    /// machine is a VM whose timings vary by tens of percent run to run).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Give up waiting for convergence after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// JSON on stdout (one object per workload; an array for `all`).
    #[arg(long)]
    json: bool,
    /// Write an SVG of pages saved over time, both sides.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One side's figures.
#[derive(Serialize, Default, Clone)]
struct Figures {
    converge_seconds: f64,
    converge_cpu_seconds: f64,
    counters: BTreeMap<String, i64>,
    freed_bytes: i64,
    /// `freed_bytes` net of the kernel memory that grew meanwhile
    /// (`SUnreclaim + PageTables`: samepage's mappings, ksmd's rmap items).
    freed_bytes_with_kernel: i64,
    /// Freed in this process's own accounting (see `measure::Memory`).
    freed_bytes_process: i64,
    metadata_bytes_per_page: f64,
    mappings: u64,
    vma_slab_bytes: i64,
    steady_scan_cpu_seconds: f64,
    cow_fault_ns: f64,
    app_throughput_ratio: f64,
    integrity: bool,
    #[serde(skip)]
    series: Vec<(f64, f64)>,
}

const RATIO_KEYS: [&str; 11] = [
    "converge_seconds",
    "converge_cpu_seconds",
    "freed_bytes",
    "freed_bytes_with_kernel",
    "freed_bytes_process",
    "metadata_bytes_per_page",
    "steady_scan_cpu_seconds",
    "cow_fault_ns",
    "app_throughput_ratio",
    "pages_sharing",
    "ksm_zero_pages",
];

impl Figures {
    fn figure(&self, k: &str) -> f64 {
        match k {
            "converge_seconds" => self.converge_seconds,
            "converge_cpu_seconds" => self.converge_cpu_seconds,
            "freed_bytes" => self.freed_bytes as f64,
            "freed_bytes_with_kernel" => self.freed_bytes_with_kernel as f64,
            "freed_bytes_process" => self.freed_bytes_process as f64,
            "metadata_bytes_per_page" => self.metadata_bytes_per_page,
            "steady_scan_cpu_seconds" => self.steady_scan_cpu_seconds,
            "cow_fault_ns" => self.cow_fault_ns,
            "app_throughput_ratio" => self.app_throughput_ratio,
            other => *self.counters.get(other).unwrap_or(&0) as f64,
        }
    }
}

/// The median of each timing figure over repeated runs (counters and memory
/// from the first run; they do not vary).
fn median(runs: Vec<Figures>) -> Figures {
    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    let pick = |f: fn(&Figures) -> f64, runs: &[Figures]| med(runs.iter().map(f).collect());
    let mut out = runs[0].clone();
    out.converge_seconds = pick(|s| s.converge_seconds, &runs);
    out.converge_cpu_seconds = pick(|s| s.converge_cpu_seconds, &runs);
    out.steady_scan_cpu_seconds = pick(|s| s.steady_scan_cpu_seconds, &runs);
    out.cow_fault_ns = pick(|s| s.cow_fault_ns, &runs);
    out.app_throughput_ratio = pick(|s| s.app_throughput_ratio, &runs);
    out.freed_bytes = pick(|s| s.freed_bytes as f64, &runs) as i64;
    out.freed_bytes_with_kernel = pick(|s| s.freed_bytes_with_kernel as f64, &runs) as i64;
    out.freed_bytes_process = pick(|s| s.freed_bytes_process as f64, &runs) as i64;
    out.integrity = runs.iter().all(|s| s.integrity);
    out
}

/// The four largest shared libraries of the machine (present on a fresh one).
fn default_files() -> Result<Vec<PathBuf>> {
    let mut libs: Vec<(u64, PathBuf)> = std::fs::read_dir("/usr/lib/x86_64-linux-gnu")
        .context("listing /usr/lib/x86_64-linux-gnu for default --files")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".so"))
        .filter_map(|e| Some((e.metadata().ok().filter(|m| m.is_file())?.len(), e.path())))
        .collect();
    libs.sort_by(|a, b| b.cmp(a));
    // Skip the LLVM giants so a run stays small (about 80 MB of files).
    Ok(libs.into_iter().filter(|(n, _)| *n < 64 << 20).take(4).map(|(_, p)| p).collect())
}

fn build(kind: Kind, a: &BenchArgs) -> Result<Workload> {
    Ok(match kind {
        Kind::Mix => Workload::mix(a.size, a.distinct, a.seed),
        Kind::Unique => {
            let mut w = Workload::mix(a.size, 100, a.seed);
            let n = w.pages.len() as u64;
            for (i, p) in w.pages.iter_mut().enumerate() {
                if i % 20 != 0 {
                    *p = Content::Gen(1 << 40 | (n + i as u64));
                }
            }
            w.name = format!("unique-{}MiB", a.size >> 20);
            w
        }
        Kind::Files | Kind::FilesScattered => {
            let files = if a.files.is_empty() { default_files()? } else { a.files.clone() };
            for p in &files {
                std::fs::metadata(p).map_err(|e| UsageError(format!("--files {}: {e}", p.display())))?;
            }
            let mut w = Workload::files(&files, a.copies).map_err(|e| UsageError(format!("{e:#}")))?;
            if kind == Kind::FilesScattered {
                fastrand::Rng::with_seed(a.seed).shuffle(&mut w.pages);
                w.name = format!("{} scattered", w.name);
            }
            w
        }
        Kind::All | Kind::Processes => unreachable!("expanded or run by the caller"),
    })
}

/// The workload, then `hot` unique pages for the application thread.
fn fill(w: &Workload, hot: usize, m: &dyn Mem) {
    w.write_into(m);
    let mut buf = [0u8; PAGE];
    for h in 0..hot {
        crate::workload::gen_page(1 << 50 | h as u64, &mut buf);
        m.write((w.pages.len() + h) * PAGE, &buf);
    }
}

fn integrity(w: &Workload, m: &dyn Mem) -> bool {
    w.mismatches(m, |_, _| {}) == 0
}

/// The application thread: 64-byte writes at random places of the hot pages.
fn app_writer(m: &dyn Mem, first: usize, hot: usize, stop: &AtomicBool, ops: &AtomicU64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = [0u8; 64];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            // Random bytes: the hot pages stay unique, so both sides merge the same.
            rng.fill(&mut data);
            let p = first + rng.usize(..hot);
            m.write(p * PAGE + rng.usize(..PAGE / 64) * 64, &data);
        }
        n += 64;
        ops.store(n, Ordering::Relaxed);
    }
}

fn baseline_rate(m: &dyn Mem, first: usize, hot: usize) -> f64 {
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| app_writer(m, first, hot, &stop, &ops, 9));
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::Relaxed);
    });
    ops.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Pages whose content is duplicated and not zero: candidates for the COW test.
fn merged_candidates(w: &Workload, max: usize) -> Vec<usize> {
    let mut seen: std::collections::HashMap<Content, u32> = std::collections::HashMap::new();
    for c in &w.pages {
        *seen.entry(*c).or_default() += 1;
    }
    let mut buf = [0u8; PAGE];
    let all: Vec<usize> = (0..w.pages.len())
        .filter(|&i| seen[&w.pages[i]] >= 2 && w.pages[i] != Content::Zero)
        .filter(|&i| {
            w.page(i, &mut buf);
            buf.iter().any(|&b| b != 0)
        })
        .collect();
    let step = (all.len() / max).max(1);
    all.into_iter().step_by(step).take(max).collect()
}

fn cow_fault_ns(m: &dyn Mem, pages: &[usize]) -> f64 {
    let mut ns: Vec<u128> = pages
        .iter()
        .map(|&p| {
            let t = Instant::now();
            m.write(p * PAGE + 8, &[0xEE; 8]);
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    ns.get(ns.len() / 2).copied().unwrap_or(0) as f64
}

/// Converges while the app thread writes; returns (converge time, CPU, ops/s during).
fn converge_with_app(
    side: &dyn Side,
    first: usize,
    hot: usize,
    a: &BenchArgs,
    series: &mut Vec<(f64, f64)>,
) -> Result<(Duration, Duration, f64)> {
    let m = side.mem();
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let start = Instant::now();
    let r = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("app-writer".into())
            .spawn_scoped(s, || app_writer(m, first, hot, &stop, &ops, 10))
            .expect("spawn the app thread");
        let r = converge(Duration::from_secs(a.timeout), a.json, || {
            let p = side.poll()?;
            series.push((start.elapsed().as_secs_f64(), (p.key.1 + p.key.2) as f64 * PAGE as f64 / (1 << 20) as f64));
            Ok(p)
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    let rate = ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let (t, cpu) = r?;
    Ok((t, cpu, rate))
}

/// CPU per full scan once converged: over three more full scans (at most a minute).
fn steady_cpu(side: &dyn Side) -> Result<f64> {
    let Progress { full_scans: s0, cpu: c0, .. } = side.poll()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let Progress { full_scans: s, cpu: c, .. } = side.poll()?;
        if s >= s0 + 3 || Instant::now() > deadline {
            return Ok((c - c0).as_secs_f64() / (s - s0).max(1) as f64);
        }
    }
}

/// The tunables both sides run with.
fn settings(a: &BenchArgs) -> Settings {
    Settings {
        pages_to_scan: a.pages_to_scan,
        sleep_millisecs: 0,
        max_page_sharing: a.max_page_sharing,
        use_zero_pages: a.use_zero_pages,
    }
}

/// The workload, then `hot` more pages the app thread writes: pages of memory.
fn hot_pages(w: &Workload) -> (usize, usize) {
    let hot = (w.pages.len() / 10).max(1);
    (hot, w.pages.len() + hot)
}

fn run_kernel(w: &Workload, a: &BenchArgs) -> Result<Figures> {
    let (_, total) = hot_pages(w);
    let mut side = KernelSide::new(total * PAGE, false, settings(a))?;
    measure(&mut side, w, a)
}

fn run_samepage(w: &Workload, a: &BenchArgs) -> Result<Figures> {
    let (_, total) = hot_pages(w);
    let (shared, sharing, zero) = w.expected(a.max_page_sharing as u64, a.use_zero_pages)?;
    let s = settings(a);
    let side = SamepageSide::new(SamepageOptions {
        tunables: Tunables {
            run: Run::Stop,
            pages_to_scan: s.pages_to_scan,
            sleep_millisecs: s.sleep_millisecs,
            max_page_sharing: s.max_page_sharing,
            use_zero_pages: s.use_zero_pages,
            ..Tunables::default()
        },
        vma_share: 0.5,
        len: total * PAGE,
        thp: false,
        raise_map_count_for: Some(shared + sharing + if a.use_zero_pages { 0 } else { zero }),
    })?;
    if let (Some((old, _)), false) = (side.raised, a.json) {
        eprintln!("vm.max_map_count raised from {old} for samepage's run (restored after)");
    }
    let mut side = side;
    measure(&mut side, w, a)
}

/// One side's run: the workload and the app thread's pages written, the app
/// thread's rate with no merging, then convergence with the app thread
/// writing, CPU per full scan once converged, memory freed, metadata,
/// integrity and the first write to merged pages.
fn measure(side: &mut dyn Side, w: &Workload, a: &BenchArgs) -> Result<Figures> {
    let (hot, total) = hot_pages(w);
    fill(w, hot, side.mem());
    let base = baseline_rate(side.mem(), w.pages.len(), hot);
    side.ready()?;
    let before = Memory::now();
    let (maps0, slab0) = (procfs::mappings(), vma_slab_bytes());
    side.start()?;
    let mut f = Figures::default();
    let (t, cpu, rate) = converge_with_app(side, w.pages.len(), hot, a, &mut f.series)?;
    let after = Memory::now();
    let counters = side.counters()?;
    f.counters = counters.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    f.steady_scan_cpu_seconds = steady_cpu(side)?;
    side.stop()?;
    f.mappings = procfs::mappings().saturating_sub(maps0);
    f.vma_slab_bytes = vma_slab_bytes() as i64 - slab0 as i64;
    let slab = if side.adds_mappings() { f.vma_slab_bytes.max(0) } else { 0 };
    f.metadata_bytes_per_page = (metadata_bytes(&counters) + slab) as f64 / total as f64;
    f.converge_seconds = t.as_secs_f64();
    f.converge_cpu_seconds = cpu.as_secs_f64();
    f.freed_bytes = before.freed_system(&after);
    f.freed_bytes_with_kernel = before.freed_with_kernel(&after);
    f.freed_bytes_process = before.freed_process(&after);
    f.app_throughput_ratio = rate / base;
    f.integrity = integrity(w, side.mem());
    f.cow_fault_ns = cow_fault_ns(side.mem(), &merged_candidates(w, 2000));
    Ok(f)
}

fn bench_one(kind: Kind, a: &BenchArgs) -> Result<serde_json::Value> {
    let w = build(kind, a)?;
    if !a.json {
        eprintln!(
            "workload {}: {} pages ({} MiB) + a tenth more written by the app thread",
            w.name,
            w.pages.len(),
            w.bytes() >> 20
        );
    }
    let mut kernels = Vec::new();
    let mut sps = Vec::new();
    let mut kernel_ok = !a.samepage_only;
    for _ in 0..a.repeat {
        if kernel_ok {
            match run_kernel(&w, a) {
                Ok(s) => kernels.push(s),
                Err(e) => {
                    eprintln!("kernel side skipped: {e:#} (measuring samepage alone)");
                    kernel_ok = false;
                }
            }
        }
        sps.push(run_samepage(&w, a)?);
    }
    let kernel = (!kernels.is_empty()).then(|| median(kernels));
    let sp = median(sps);
    let mut ratio = serde_json::Map::new();
    if let Some(k) = &kernel {
        for key in RATIO_KEYS {
            let (x, y) = (sp.figure(key), k.figure(key));
            ratio.insert(key.to_string(), if y != 0.0 { serde_json::json!(x / y) } else { serde_json::Value::Null });
        }
    }
    if !a.json {
        print_table(&w.name, kernel.as_ref(), &sp);
    }
    if let Some(path) = &a.plot {
        let path = if matches!(a.workload, Kind::All) {
            path.with_file_name(format!(
                "{}-{}.svg",
                path.file_stem().unwrap_or_default().to_string_lossy(),
                w.name.replace(' ', "-")
            ))
        } else {
            path.clone()
        };
        plot(&path, &w.name, kernel.as_ref(), &sp)?;
        if !a.json {
            eprintln!("plot written to {}", path.display());
        }
    }
    if !sp.integrity || kernel.as_ref().is_some_and(|k| !k.integrity) {
        anyhow::bail!("integrity check failed on {}", w.name);
    }
    Ok(serde_json::json!({
        "workload": w.name,
        "pages": w.pages.len(),
        "repeat": a.repeat,
        "tunables": { "pages_to_scan": a.pages_to_scan, "sleep_millisecs": 0,
                      "max_page_sharing": a.max_page_sharing, "use_zero_pages": a.use_zero_pages },
        "kernel": kernel,
        "samepage": sp,
        "ratio": ratio,
    }))
}

fn print_table(name: &str, k: Option<&Figures>, s: &Figures) {
    println!("\n{name}");
    println!("{:<28} {:>16} {:>16} {:>16}", "figure", "kernel ksmd", "samepage", "samepage/kernel");
    let rows: [(&str, &str, f64); 14] = [
        ("converge_seconds", "converge (s)", 1.0),
        ("converge_cpu_seconds", "CPU to converge (s)", 1.0),
        ("pages_shared", "pages_shared", 1.0),
        ("pages_sharing", "pages_sharing", 1.0),
        ("ksm_zero_pages", "ksm_zero_pages", 1.0),
        ("stable_node_dups", "stable_node_dups", 1.0),
        ("freed_bytes", "freed (MiB, net)", 1.0 / (1 << 20) as f64),
        ("freed_bytes_with_kernel", "freed net of kernel memory (MiB)", 1.0 / (1 << 20) as f64),
        ("freed_bytes_process", "freed (MiB, this process)", 1.0 / (1 << 20) as f64),
        ("metadata_bytes_per_page", "metadata (B/page)", 1.0),
        ("steady_scan_cpu_seconds", "CPU per full scan (ms)", 1000.0),
        ("cow_fault_ns", "first write, merged (us)", 0.001),
        ("app_throughput_ratio", "app throughput (x idle)", 1.0),
        ("mappings", "mappings added", 1.0),
    ];
    let get = |side: &Figures, key: &str| match key {
        "mappings" => side.mappings as f64,
        _ => side.figure(key),
    };
    for (key, label, scale) in rows {
        let sv = get(s, key) * scale;
        match k {
            Some(k) => {
                let kv = get(k, key) * scale;
                let r = if kv != 0.0 { format!("{:.3}", sv / kv) } else { "-".into() };
                println!("{label:<28} {kv:>16.3} {sv:>16.3} {r:>16}");
            }
            None => println!("{label:<28} {:>16} {sv:>16.3} {:>16}", "-", "-"),
        }
    }
    println!(
        "{:<28} {:>16} {:>16}",
        "integrity",
        k.map_or("-".to_string(), |k| k.integrity.to_string()),
        s.integrity.to_string()
    );
}

fn plot(path: &std::path::Path, name: &str, k: Option<&Figures>, s: &Figures) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = s.series.iter().chain(k.map_or(&[][..], |k| &k.series[..])).map(|p| p.0).fold(0.1, f64::max);
    let ymax = s.series.iter().chain(k.map_or(&[][..], |k| &k.series[..])).map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("pages saved over time: {name}"), ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax * 1.05, 0.0..ymax * 1.1)?;
    chart.configure_mesh().x_desc("seconds").y_desc("MiB saved (pages_sharing + ksm_zero_pages)").draw()?;
    chart
        .draw_series(LineSeries::new(s.series.iter().copied(), &BLUE))?
        .label("samepage")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if let Some(k) = k {
        chart
            .draw_series(LineSeries::new(k.series.iter().copied(), &RED))?
            .label("kernel ksmd")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    if matches!(a.workload, Kind::Processes) {
        return crate::processes::run(&crate::processes::Options {
            n: a.processes,
            size: a.size,
            distinct: a.distinct,
            seed: a.seed,
            json: a.json,
            samepage_only: a.samepage_only,
            timeout: std::time::Duration::from_secs(a.timeout),
            pages_to_scan: a.pages_to_scan,
            max_page_sharing: a.max_page_sharing,
            use_zero_pages: a.use_zero_pages,
        });
    }
    let kinds = match a.workload {
        Kind::All => vec![Kind::Mix, Kind::Files, Kind::FilesScattered, Kind::Unique],
        k => vec![k],
    };
    let mut out = Vec::new();
    for k in kinds {
        out.push(bench_one(k, &a)?);
    }
    if a.json {
        let v = if out.len() == 1 { out.pop().expect("one") } else { serde_json::Value::Array(out) };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(ExitCode::SUCCESS)
}
