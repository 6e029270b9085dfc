//! `samepage torture --processes N`: merging across processes under
//! abuse. A daemon (`samepage daemon`, a process of its own) and N client
//! processes (this binary run again as `samepage torture-client`), each an
//! engine connected to the daemon, writing pages of a few contents every
//! process holds (so they merge across processes) and unique ones, forking
//! children that check what they inherit, discarding pages and asking for
//! merges now. Meanwhile clients are killed with SIGKILL (mid-merge, as it
//! happens) and started again, and the daemon is killed and started again
//! every third of the run: the clients keep their bytes and connect to the
//! new daemon.
//!
//! Checked: every client's every page against what it wrote (each second
//! and at the end, and by its forked children); after the restart, no
//! client still maps or holds the killed daemon's pools; once every client
//! has gone, the daemon's partitions hold no pool page.

use anyhow::{bail, Context, Result};
use clap::Args;
use samepage::{Discard, Domain, Engine, Run, Tunables};
use samepage_daemon::client::Connection;
use serde_json::json;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::workload::PAGE;

/// `samepage torture-client` (run by `torture --processes`, not by hand).
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Pages of memory.
    #[arg(long)]
    pages: u64,
    /// This client's number (its unique contents).
    #[arg(long)]
    index: u64,
    /// Seed of its writes.
    #[arg(long)]
    seed: u64,
}

/// Contents every client holds: zeros and 6 others.
const COMMON: u64 = 7;

/// The bytes of content `v`: 0 zeros, `1..COMMON` the common contents,
/// anything else a content of its own. Allocation-free (forked children
/// call it).
fn content(v: u64, out: &mut [u8; PAGE]) {
    if v == 0 {
        out.fill(0);
    } else {
        crate::workload::gen_page(0x70_57_00 + v, out);
    }
}

/// One client: fill, then write, check, fork, discard and merge now until
/// `stop` (or EOF) on stdin; prints `check LOST CHECKED` after each full
/// check and one JSON line at the end.
pub fn client(a: ClientArgs) -> Result<ExitCode> {
    let t = Tunables { run: Run::Merge, ..Tunables::default() };
    let deadline = Instant::now() + Duration::from_secs(30);
    let engine = loop {
        match Engine::connect(&a.socket, Domain::default(), t.clone()) {
            Ok(e) => break e,
            Err(e) if Instant::now() >= deadline => return Err(e).context("no daemon answered"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let pages = a.pages as usize;
    let region = engine.alloc_region(pages * PAGE)?;
    let mut shadow: Vec<u64> = (0..pages as u64).map(|p| (p + a.index) % COMMON).collect();
    let mut buf = [0u8; PAGE];
    for (p, &v) in shadow.iter().enumerate() {
        content(v, &mut buf);
        region.write(p * PAGE, &buf)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for l in std::io::stdin().lock().lines() {
                if l.map_or(true, |l| l.trim() == "stop") {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut out = std::io::stdout();
    let (mut lost, mut checked, mut forks, mut child_failures, mut discards, mut merges_now) = (0u64, 0u64, 0, 0, 0, 0);
    let mut unique = (a.index + 1) << 40;
    let (mut last_full, mut last_fork, mut last_discard, mut last_merge) =
        (Instant::now(), Instant::now(), Instant::now(), Instant::now());
    let mut got = [0u8; PAGE];
    let mut check = |p: usize, v: u64, lost: &mut u64, checked: &mut u64| -> Result<()> {
        content(v, &mut buf);
        region.read(p * PAGE, &mut got)?;
        *checked += 1;
        if got != buf {
            *lost += 1;
            eprintln!("client {}: page {p} does not hold content {v}", a.index);
        }
        Ok(())
    };
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let p = rng.usize(..pages);
            let v = if rng.u8(..100) < 85 {
                rng.u64(..COMMON)
            } else {
                unique += 1;
                unique
            };
            shadow[p] = v;
            let mut b = [0u8; PAGE];
            content(v, &mut b);
            region.write(p * PAGE, &b)?;
        }
        for _ in 0..64 {
            let p = rng.usize(..pages);
            check(p, shadow[p], &mut lost, &mut checked)?;
        }
        if last_full.elapsed() >= Duration::from_secs(1) {
            last_full = Instant::now();
            for (p, &v) in shadow.iter().enumerate() {
                check(p, v, &mut lost, &mut checked)?;
            }
            writeln!(out, "check {lost} {checked}")?;
        }
        if last_fork.elapsed() >= Duration::from_secs(2) {
            last_fork = Instant::now();
            forks += 1;
            if !child_sees(region.as_ptr() as usize, &shadow)? {
                child_failures += 1;
            }
        }
        if last_discard.elapsed() >= Duration::from_millis(700) {
            last_discard = Instant::now();
            let p = rng.usize(..pages - 4);
            engine.discard(region.as_ptr().wrapping_add(p * PAGE), 4 * PAGE, Discard::DontNeed)?;
            shadow[p..p + 4].iter_mut().for_each(|v| *v = 0);
            discards += 1;
        }
        if last_merge.elapsed() >= Duration::from_secs(3) {
            last_merge = Instant::now();
            let p = rng.usize(..pages - 64);
            engine.merge_now(region.as_ptr().wrapping_add(p * PAGE), 64 * PAGE)?;
            merges_now += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.u64(..5)));
    }
    for (p, &v) in shadow.iter().enumerate() {
        check(p, v, &mut lost, &mut checked)?;
    }
    let c = engine.counters()?;
    let link = engine.daemon_link().unwrap_or_default();
    let report = json!({
        "lost": lost, "checked": checked, "forks": forks, "child_failures": child_failures,
        "discards": discards, "merges_now": merges_now, "merges": c.merges, "cow_faults": c.cow_faults,
        "reconnects": link.reconnects, "connected": link.connected,
    });
    writeln!(out, "{report}")?;
    Ok(ExitCode::SUCCESS)
}

/// Forks a child that reads every page of the region at `base` (its copy)
/// against `shadow`, allocation-free; returns whether it saw them all right.
fn child_sees(base: usize, shadow: &[u64]) -> Result<bool> {
    let code = crate::torture_io::fork_check(|| {
        let mut want = [0u8; PAGE];
        let ok = shadow.iter().enumerate().all(|(p, &v)| {
            content(v, &mut want);
            want.iter().enumerate().step_by(64).all(|(j, b)| {
                // SAFETY: the child's copy of the registered region.
                unsafe { ((base + p * PAGE + j) as *const u8).read_volatile() == *b }
            })
        });
        i32::from(!ok)
    })?;
    Ok(code == 0)
}

/// A client process and what it printed.
struct ClientProc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<ClientOut>>,
}

#[derive(Default)]
struct ClientOut {
    /// Pages found wrong at its last full check.
    lost: u64,
    /// Its final report.
    report: Option<serde_json::Value>,
}

fn spawn_client(socket: &Path, pages: u64, index: u64, seed: u64) -> Result<ClientProc> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("torture-client")
        .arg("--socket")
        .arg(socket)
        .args(["--pages", &pages.to_string(), "--index", &index.to_string(), "--seed", &seed.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a client")?;
    let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
    let out = Arc::new(Mutex::new(ClientOut::default()));
    let o = out.clone();
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(|l| l.ok()) {
            let mut o = o.lock().unwrap();
            if let Some(rest) = l.strip_prefix("check ") {
                o.lost = rest.split(' ').next().and_then(|x| x.parse().ok()).unwrap_or(o.lost);
            } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                o.lost = v["lost"].as_u64().unwrap_or(o.lost);
                o.report = Some(v);
            }
        }
    });
    Ok(ClientProc { stdin: child.stdin.take(), child, out })
}

struct DaemonProc(Child);

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(socket: &Path, max_page_sharing: u32) -> Result<DaemonProc> {
    let child = Command::new(std::env::current_exe()?)
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .args(["--pages-to-scan", "4000", "--sleep-ms", "5", "--use-zero-pages"])
        .args(["--max-page-sharing", &max_page_sharing.to_string(), "--stable-node-chains-prune-ms", "200"])
        .stderr(Stdio::null())
        .spawn()
        .context("starting the daemon")?;
    let d = DaemonProc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Connection::status(socket).is_err() {
        if Instant::now() >= deadline {
            bail!("the daemon never listened on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

/// The inodes of the pool memfds process `pid` maps or holds open.
fn pool_inodes(pid: u32) -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    for l in maps.lines().filter(|l| l.contains("samepage-pool")) {
        if let Some(ino) = l.split_whitespace().nth(4).and_then(|i| i.parse().ok()) {
            out.insert(ino);
        }
    }
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in fds.flatten() {
            let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
            if target.contains("samepage-pool") {
                if let Ok(m) = std::fs::metadata(e.path()) {
                    out.insert(m.ino());
                }
            }
        }
    }
    out
}

/// What `torture --processes` runs.
pub struct Options {
    pub processes: u64,
    pub seconds: u64,
    pub pages: u64,
    pub max_page_sharing: u32,
    pub seed: u64,
    pub json: bool,
}

/// Runs the daemon and the clients, kills and restarts them, and checks.
pub fn run(o: &Options) -> Result<ExitCode> {
    let socket = std::env::temp_dir().join(format!("samepage-torture-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let start = Instant::now();
    let mut daemon = spawn_daemon(&socket, o.max_page_sharing)?;
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let mut next_index = 0u64;
    let mut spawn = |rng: &mut fastrand::Rng| {
        next_index += 1;
        spawn_client(&socket, o.pages, next_index, rng.u64(..))
    };
    let mut clients = Vec::new();
    for _ in 0..o.processes {
        clients.push(spawn(&mut rng)?);
    }
    let total = Duration::from_secs(o.seconds);
    let kill_every = (total / (o.processes as u32 + 4)).max(Duration::from_millis(1500));
    let mut next_kill = start + kill_every;
    // The daemon is killed and started again every third of the run.
    let restart_every = (total / 3).max(Duration::from_secs(3));
    let mut next_restart = start + restart_every;
    let (mut killed, mut restarts, mut killed_lost) = (0u64, 0u64, 0u64);
    let mut old_pools: BTreeSet<u64> = BTreeSet::new();
    let mut errors: Vec<String> = Vec::new();
    while start.elapsed() < total {
        std::thread::sleep(Duration::from_millis(100));
        for c in clients.iter_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                errors.push(format!("client {} exited early: {status}", c.child.id()));
            }
        }
        if !errors.is_empty() {
            break;
        }
        if Instant::now() >= next_kill {
            next_kill += kill_every;
            // The first client is never killed: it lives through the
            // daemon's restart and must connect again.
            let i = if clients.len() > 1 { rng.usize(1..clients.len()) } else { 0 };
            let mut c = std::mem::replace(&mut clients[i], spawn(&mut rng)?);
            let _ = c.child.kill();
            let _ = c.child.wait();
            killed_lost += c.out.lock().unwrap().lost;
            killed += 1;
        }
        if Instant::now() >= next_restart && start.elapsed() + Duration::from_secs(2) < total {
            next_restart += restart_every;
            for c in &clients {
                old_pools.extend(pool_inodes(c.child.id()));
            }
            drop(daemon);
            std::thread::sleep(Duration::from_millis(300));
            daemon = spawn_daemon(&socket, o.max_page_sharing)?;
            restarts += 1;
        }
    }
    // The clients started before the restart must have let its pools go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held: BTreeSet<u64> = BTreeSet::new();
    loop {
        held.clear();
        for c in &clients {
            held.extend(pool_inodes(c.child.id()).intersection(&old_pools));
        }
        if held.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut reports = Vec::new();
    for c in clients.iter_mut() {
        if let Some(mut s) = c.stdin.take() {
            let _ = writeln!(s, "stop");
        }
    }
    let mut lost = killed_lost;
    for mut c in clients {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = c.child.kill();
                errors.push(format!("client {} did not finish", c.child.id()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its reader has the last lines once the pipe closed.
        std::thread::sleep(Duration::from_millis(50));
        let out = c.out.lock().unwrap();
        lost += out.lost;
        match &out.report {
            Some(r) => reports.push(r.clone()),
            None => errors.push(format!("client {} gave no report", c.child.id())),
        }
    }
    // Every client gone: the daemon's partitions hold no pool page.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pool_bytes, slots_in_use) = loop {
        let s = Connection::status(&socket).unwrap_or_default();
        let left = (s.iter().map(|p| p.pool_bytes).sum::<u64>(), s.iter().map(|p| p.slots_in_use).sum::<u64>());
        if left == (0, 0) || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Pool pages left: who still maps a pool (the daemon frees a
    // partition's pool once no other process maps it), for the report.
    let pool_mappers_left: Vec<String> = if (pool_bytes, slots_in_use) == (0, 0) {
        Vec::new()
    } else {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
                    .filter(|&pid| pid != std::process::id())
                    .filter_map(|pid| {
                        let inodes = pool_inodes(pid);
                        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                        (!inodes.is_empty()).then(|| format!("{pid} {} {inodes:?}", comm.trim()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    drop(daemon);
    let _ = std::fs::remove_file(&socket);
    let sum = |k: &str| reports.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let out = json!({
        "seconds": start.elapsed().as_secs_f64(),
        "processes": o.processes,
        "pages_per_process": o.pages,
        "clients_killed": killed,
        "daemon_restarts": restarts,
        "lost_pages": lost,
        "pages_checked": sum("checked"),
        "forks": sum("forks"),
        "child_failures": sum("child_failures"),
        "discards": sum("discards"),
        "merges_now": sum("merges_now"),
        "merges": sum("merges"),
        "cow_faults": sum("cow_faults"),
        "reconnects": sum("reconnects"),
        "old_pools": old_pools.len(),
        "old_pools_held": held.len(),
        "pool_bytes_left": pool_bytes,
        "slots_in_use_left": slots_in_use,
        "pool_mappers_left": pool_mappers_left,
        "errors": errors,
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} processes x {} pages, {:.0} s: {} clients killed, {} daemon restart(s), {} reconnects, {} old pools",
            o.processes,
            o.pages,
            out["seconds"].as_f64().unwrap_or(0.0),
            killed,
            restarts,
            out["reconnects"],
            old_pools.len()
        );
        println!(
            "{} merges, {} merges now, {} copy-on-write faults, {} forks, {} discards, {} pages checked",
            out["merges"], out["merges_now"], out["cow_faults"], out["forks"], out["discards"], out["pages_checked"]
        );
        println!(
            "lost pages: {lost}; children that saw wrong memory: {}; old pools still held: {}; \
             pool bytes left once every client is gone: {pool_bytes} ({slots_in_use} slots)",
            out["child_failures"],
            held.len()
        );
    }
    let child_failures = sum("child_failures");
    if restarts > 0 && o.processes > 1 && sum("reconnects") == 0 {
        errors.push("no client connected to the restarted daemon again".into());
    }
    if lost > 0 || child_failures > 0 || !held.is_empty() || pool_bytes > 0 || slots_in_use > 0 || !errors.is_empty() {
        bail!(
            "torture --processes found {lost} lost pages, {child_failures} failed children, {} old pools held, \
             {pool_bytes} pool bytes left, errors: {errors:?}",
            held.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
