//! `samepage bench --workload processes`: N processes holding the same
//! content (the mix's zero pages and copies of a small set, shared by all,
//! plus unique pages of each process), merged by the kernel's ksmd
//! (`MADV_MERGEABLE` in each process) and by samepage (each process an
//! engine connected to a daemon this command starts), one after the other.
//!
//! Each process is this binary run again as `samepage worker`: it fills its
//! memory, says `ready`, starts merging on `go`, and when its stdin closes
//! checks every byte and reports how many pages differ.

use crate::kernel::KernelKsm;
use crate::measure::Memory;
use crate::workload::{Content, Mem, Workload, PAGE};
use anyhow::{bail, Context, Result};
use clap::Args;
use samepage::{Domain, Engine, Run, Tunables};
use samepage_daemon::client::Connection;
use samepage_daemon::server::{Config, Daemon};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// `samepage worker` (run by `bench --workload processes`, not by hand).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The daemon's socket; without it the memory is handed to the kernel's KSM.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// This process's index (its unique pages).
    #[arg(long)]
    index: u64,
    /// Bytes of memory.
    #[arg(long)]
    size: u64,
    /// Distinct contents of the shared copies.
    #[arg(long)]
    distinct: u64,
    /// Seed of the layout.
    #[arg(long)]
    seed: u64,
}

/// The content of process `index`: the mix, its unique pages made unique to it.
pub fn workload(size: u64, distinct: u64, seed: u64, index: u64) -> Workload {
    let mut w = Workload::mix(size, distinct, seed);
    for p in w.pages.iter_mut() {
        if let Content::Gen(id) = p {
            if *id >= distinct {
                *p = Content::Gen(*id + ((index + 1) << 40));
            }
        }
    }
    w
}

/// The worker: fill, `ready`, merge on `go`, check on EOF.
pub fn worker(a: WorkerArgs) -> Result<std::process::ExitCode> {
    let w = workload(a.size, a.distinct, a.seed, a.index);
    let bytes = w.bytes() as usize;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    let (mut scanned, mut uncounted) = (0, 0);
    let bad = match &a.socket {
        Some(socket) => {
            // The daemon's tunables apply; this process starts merging on `go`.
            let t = Tunables { run: Run::Stop, ..Tunables::default() };
            let engine = Engine::connect(socket, Domain::default(), t)?;
            let region = engine.alloc_region(bytes)?;
            w.write_into(&region);
            writeln!(out, "ready")?;
            let _ = lines.next();
            engine.set_run(Run::Merge)?;
            for _ in lines.by_ref() {}
            engine.set_run(Run::Stop)?;
            scanned = engine.counters()?.pages_scanned;
            uncounted = engine.space_stats().uncounted_moves;
            w.mismatches(&region as &dyn Mem, |_, _| {})
        }
        None => {
            let m = samepage::testing::AnonMapping::new(bytes)?;
            w.write_into(&m);
            writeln!(out, "ready")?;
            let _ = lines.next();
            m.advise_kernel_mergeable()?;
            writeln!(out, "mergeable")?;
            for _ in lines.by_ref() {}
            w.mismatches(&m as &dyn Mem, |_, _| {})
        }
    };
    writeln!(out, "done {bad} {scanned} {uncounted}")?;
    Ok(std::process::ExitCode::SUCCESS)
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        Ok(l.trim().to_string())
    }
}

fn spawn(socket: Option<&Path>, index: u64, size: u64, distinct: u64, seed: u64) -> Result<Worker> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("worker").args(["--index", &index.to_string(), "--size", &size.to_string()]).args([
        "--distinct",
        &distinct.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    if let Some(s) = socket {
        c.arg("--socket").arg(s);
    }
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("starting a worker")?;
    let stdin = child.stdin.take();
    let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
    Ok(Worker { child, stdin, stdout })
}

/// One side's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub converge_seconds: f64,
    pub converge_cpu_seconds: f64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub stable_node_dups: u64,
    pub freed_bytes: i64,
    /// `freed_bytes` net of the kernel memory (`SUnreclaim + PageTables`)
    /// that grew meanwhile.
    pub freed_bytes_with_kernel: i64,
    pub bad_pages: u64,
    /// Requests to the daemon until convergence per page merged (samepage only).
    pub requests_per_merged_page: Option<f64>,
    /// Requests to the daemon per page the engines scanned, over the whole
    /// run (samepage only): each request carries a batch, never one page.
    pub requests_per_page_scanned: Option<f64>,
    /// Pages a failing `UFFDIO_MOVE` moved without counting them, found in
    /// the page tables by the engines (samepage only; see `move_window`).
    pub uncounted_moves: Option<u64>,
}

/// What `bench --workload processes` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Processes.
    pub n: u64,
    /// Bytes of all of them together.
    pub size: u64,
    /// Distinct contents of the shared copies.
    pub distinct: u64,
    /// Seed of the layouts.
    pub seed: u64,
    /// JSON on stdout.
    pub json: bool,
    /// samepage's side alone.
    pub samepage_only: bool,
    /// Give up waiting for convergence after this long.
    pub timeout: Duration,
    /// `pages_to_scan` of both sides (machine-wide: ksmd's, the daemon's).
    pub pages_to_scan: u32,
    /// `max_page_sharing` of both sides.
    pub max_page_sharing: u32,
    /// `use_zero_pages` of both sides.
    pub use_zero_pages: bool,
}

/// Runs N workers on one side and measures it.
fn run_side(kernel: bool, o: &Options, per: u64) -> Result<Figures> {
    let (n, size, distinct, seed) = (o.n, per, o.distinct, o.seed);
    let mut ksm = None;
    let mut socket = None;
    if kernel {
        let k = KernelKsm::take()?;
        for (name, v) in [
            ("pages_to_scan", o.pages_to_scan.to_string()),
            ("sleep_millisecs", "0".to_string()),
            ("max_page_sharing", o.max_page_sharing.to_string()),
            ("use_zero_pages", u32::from(o.use_zero_pages).to_string()),
        ] {
            k.set(name, &v)?;
        }
        ksm = Some(k);
    } else {
        let path = std::env::temp_dir().join(format!("samepage-bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        // The daemon's tunables, as ksmd's: one machine-wide rate.
        let tunables = Tunables {
            run: Run::Merge,
            pages_to_scan: o.pages_to_scan,
            sleep_millisecs: 0,
            max_page_sharing: o.max_page_sharing,
            use_zero_pages: o.use_zero_pages,
            ..Tunables::default()
        };
        let daemon = Daemon::new(Config { tunables, ..Config::default() });
        std::thread::Builder::new().name("samepage-daemon".into()).spawn(move || daemon.serve(&listener))?;
        socket = Some(path);
    }
    // Scattered merges need a mapping each: as the single-process bench
    // does, room under vm.max_map_count (per process) for all of them,
    // restored afterwards.
    let _map_count = if kernel { None } else { crate::sysctl::raise(size / PAGE as u64 * 3 + 65_536) };
    let mut workers = (0..n).map(|i| spawn(socket.as_deref(), i, size, distinct, seed)).collect::<Result<Vec<_>>>()?;
    for w in workers.iter_mut() {
        let l = w.line()?;
        if l != "ready" {
            bail!("a worker failed before merging: {l:?}");
        }
    }
    let mem0 = Memory::now();
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    let cpu0: Duration = pids.iter().map(|&p| crate::procfs::cpu_time(p)).sum::<Duration>()
        + crate::procfs::cpu_time(std::process::id());
    let ksmd0 = ksm.as_ref().map_or(Duration::ZERO, |k| k.ksmd_cpu());
    let t0 = Instant::now();
    // `go`: samepage's engines start merging, the kernel's workers mark
    // their memory MADV_MERGEABLE (and say so) before ksmd runs.
    for w in workers.iter_mut() {
        writeln!(w.stdin.as_mut().context("worker stdin")?, "go")?;
    }
    if let Some(k) = &ksm {
        for w in workers.iter_mut() {
            let l = w.line()?;
            if l != "mergeable" {
                bail!("a worker could not mark its memory mergeable: {l:?}");
            }
        }
        k.set("run", "1")?;
    }
    let poll = |ksm: &Option<KernelKsm>| -> Result<(u64, u64, u64, u64)> {
        Ok(match ksm {
            Some(k) => {
                (k.get("pages_shared")? as u64, k.get("pages_sharing")? as u64, k.get("stable_node_dups")? as u64, 0)
            }
            None => {
                let s = Connection::status(socket.as_deref().expect("samepage side"))?;
                let p = s.first().map(|p| {
                    let c = samepage_daemon::view::partition_counters(p);
                    (c.pages_shared, c.pages_sharing, c.stable_node_dups, p.requests)
                });
                p.unwrap_or_default()
            }
        })
    };
    let (mut last, mut changed, mut cpu_at_change) = (poll(&ksm)?, t0, Duration::ZERO);
    let mut requests_at_change = 0;
    let cpu_now = |ksm: &Option<KernelKsm>| match ksm {
        Some(k) => k.ksmd_cpu().saturating_sub(ksmd0),
        None => (pids.iter().map(|&p| crate::procfs::cpu_time(p)).sum::<Duration>()
            + crate::procfs::cpu_time(std::process::id()))
        .saturating_sub(cpu0),
    };
    while changed.elapsed() < Duration::from_secs(3) && t0.elapsed() < o.timeout {
        std::thread::sleep(Duration::from_millis(20));
        let now = poll(&ksm)?;
        if (now.0, now.1, now.2) != (last.0, last.1, last.2) {
            changed = Instant::now();
            cpu_at_change = cpu_now(&ksm);
            requests_at_change = now.3;
        }
        last = now;
    }
    let mem1 = Memory::now();
    let converge = changed.duration_since(t0);
    let requests_end = poll(&ksm)?.3;
    let (mut bad, mut scanned, mut uncounted) = (0, 0, 0);
    for w in workers.iter_mut() {
        drop(w.stdin.take());
        let l = w.line()?;
        let mut f = l.strip_prefix("done ").context("a worker's check")?.split_whitespace();
        bad += f.next().and_then(|b| b.parse::<u64>().ok()).context("a worker's check")?;
        scanned += f.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        uncounted += f.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
        w.child.wait()?;
    }
    if let Some(k) = &ksm {
        k.set("run", "2")?;
    }
    drop(ksm);
    if let Some(s) = &socket {
        let _ = std::fs::remove_file(s);
    }
    let merged = last.1 + last.0;
    Ok(Figures {
        converge_seconds: converge.as_secs_f64(),
        converge_cpu_seconds: cpu_at_change.as_secs_f64(),
        pages_shared: last.0,
        pages_sharing: last.1,
        stable_node_dups: last.2,
        freed_bytes: mem0.freed_system(&mem1),
        freed_bytes_with_kernel: mem0.freed_with_kernel(&mem1),
        bad_pages: bad,
        requests_per_merged_page: (!kernel && merged > 0).then(|| requests_at_change as f64 / merged as f64),
        requests_per_page_scanned: (!kernel && scanned > 0).then(|| requests_end as f64 / scanned as f64),
        uncounted_moves: (!kernel).then_some(uncounted),
    })
}

/// `samepage bench --workload processes --processes N`.
pub fn run(o: &Options) -> Result<std::process::ExitCode> {
    let (n, json) = (o.n, o.json);
    if n < 2 {
        bail!(crate::args::UsageError(format!("--processes {n} is out of range: 2 or more")));
    }
    let per = o.size / n;
    let all: Vec<Content> = (0..n).flat_map(|i| workload(per, o.distinct, o.seed, i).pages).collect();
    let expected = Workload { name: String::new(), pages: all, files: Vec::new() }
        .expected(o.max_page_sharing as u64, o.use_zero_pages)?;
    eprintln!("processes: {n} x {} MiB; expected pages_shared {}, pages_sharing {}", per >> 20, expected.0, expected.1);
    let kernel = if o.samepage_only {
        None
    } else {
        match run_side(true, o, per) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("kernel side skipped: {e:#}");
                None
            }
        }
    };
    let samepage = run_side(false, o, per)?;
    let ok = samepage.bad_pages == 0 && kernel.as_ref().is_none_or(|k| k.bad_pages == 0);
    if json {
        let v = serde_json::json!({
            "workload": format!("processes-{n}x{}MiB", per >> 20),
            "expected": {"pages_shared": expected.0, "pages_sharing": expected.1},
            "kernel": kernel,
            "samepage": samepage,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<34} {:>14} {:>14}", "figure", "kernel ksmd", "samepage");
        let k = kernel.clone();
        let row = |name: &str, f: &dyn Fn(&Figures) -> String| {
            println!("{name:<34} {:>14} {:>14}", k.as_ref().map_or("-".into(), f), f(&samepage));
        };
        row("time to converge (s)", &|x| format!("{:.2}", x.converge_seconds));
        row("CPU to converge (s)", &|x| format!("{:.2}", x.converge_cpu_seconds));
        row("pages_shared", &|x| x.pages_shared.to_string());
        row("pages_sharing", &|x| x.pages_sharing.to_string());
        row("stable_node_dups", &|x| x.stable_node_dups.to_string());
        row("memory freed (MiB)", &|x| format!("{:.1}", x.freed_bytes as f64 / (1 << 20) as f64));
        row("freed net of kernel memory (MiB)", &|x| {
            format!("{:.1}", x.freed_bytes_with_kernel as f64 / (1 << 20) as f64)
        });
        row("pages not byte-exact", &|x| x.bad_pages.to_string());
        row("daemon requests per merged page", &|x| {
            x.requests_per_merged_page.map_or("-".into(), |r| format!("{r:.4}"))
        });
        row("daemon requests per page scanned", &|x| {
            x.requests_per_page_scanned.map_or("-".into(), |r| format!("{r:.4}"))
        });
        row("uncounted UFFDIO_MOVE pages", &|x| x.uncounted_moves.map_or("-".into(), |n| n.to_string()));
        println!("expected from the content: pages_shared {}, pages_sharing {}", expected.0, expected.1);
    }
    Ok(if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}
