//! `samepage daemon` and `samepage status`: the daemon that owns what
//! processes share when they merge with each other, and its view.

use anyhow::{Context, Result};
use clap::Args;
use samepage_daemon::client::Connection;
use samepage_daemon::server::{Config, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

/// `samepage daemon`: the system-wide tunables, with the kernel's names
/// and meanings (`samepage set` changes them while it runs).
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The socket to listen on [default: /run/samepage/samepage.sock as
    /// root, $XDG_RUNTIME_DIR/samepage.sock otherwise].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// run: 0 stop, 1 merge (each process still opts in), 2 unmerge everything.
    #[arg(long, default_value_t = 1)]
    run: u32,
    #[command(flatten)]
    tunables: crate::args::KsmTunables,
    /// smart_scan: skip pages that keep failing to merge.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    smart_scan: bool,
    /// stable_node_chains_prune_millisecs.
    #[arg(long, default_value_t = 2000)]
    stable_node_chains_prune_ms: u32,
    /// Serve OpenMetrics at http://ADDR/metrics: PORT or :PORT listens on
    /// 127.0.0.1 only (e.g. 9467); HOST:PORT as given (0.0.0.0:9467).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// `samepage set`.
#[derive(Args, Debug)]
pub struct SetArgs {
    /// The daemon's socket [default: as `samepage daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// NAME=VALUE with the kernel's names and values (`run=2`,
    /// `pages_to_scan=1000`, `max_page_sharing=64`, ...), applied in order.
    #[arg(required = true)]
    settings: Vec<String>,
}

/// `samepage merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The process whose mergeable memory merges now (its engine must be a
    /// client of the daemon).
    #[arg(long)]
    pid: i32,
    /// The daemon's socket [default: as `samepage daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Give up waiting for the process's answer after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// `samepage status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The daemon's socket [default: as `samepage daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the daemon until it is killed.
pub fn run(a: DaemonArgs) -> Result<ExitCode> {
    let path = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a daemon that died: nobody answers on it.
    if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
        std::fs::remove_file(&path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    // Every user may connect: each gets partitions of its own (by the
    // kernel's peer credentials), never another user's.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let mut t = samepage::Tunables::default();
    a.tunables.apply(&mut t)?;
    for (name, value) in [
        ("run", a.run.to_string()),
        ("smart_scan", u32::from(a.smart_scan).to_string()),
        ("stable_node_chains_prune_millisecs", a.stable_node_chains_prune_ms.to_string()),
    ] {
        t.set(name, &value).map_err(|e| crate::args::UsageError(e.to_string()))?;
    }
    eprintln!(
        "samepage daemon: listening on {} (run {}, pages_to_scan {}, sleep_millisecs {}, max_page_sharing {}, use_zero_pages {})",
        path.display(),
        t.run.as_u32(),
        t.pages_to_scan,
        t.sleep_millisecs,
        t.max_page_sharing,
        u32::from(t.use_zero_pages)
    );
    let daemon = Daemon::new(Config { tunables: t, ..Config::default() });
    if let Some(addr) = &a.metrics {
        let bound = crate::metrics::start(crate::metrics::parse_addr(addr)?, std::sync::Arc::clone(&daemon))?;
        eprintln!("samepage daemon: metrics at http://{bound}/metrics");
    }
    daemon.serve(&listener).context("accepting clients")?;
    Ok(ExitCode::SUCCESS)
}

/// Sets the daemon's tunables, then prints them all.
pub fn set(a: SetArgs) -> Result<ExitCode> {
    let path = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    let mut now = None;
    for s in &a.settings {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| crate::args::UsageError(format!("{s:?} is not NAME=VALUE (e.g. pages_to_scan=1000)")))?;
        let t = Connection::set(&path, name.trim(), value.trim())
            .with_context(|| format!("setting {} at the daemon at {}", name.trim(), path.display()))?;
        now = Some(t);
    }
    if let Some(t) = now {
        for (name, value) in t.named() {
            println!("{name} {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Orders a merge of process `pid` through the daemon and waits for its outcome.
pub fn merge(a: MergeArgs) -> Result<ExitCode> {
    let path = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    let ids = Connection::merge_pid(&path, a.pid)
        .with_context(|| format!("asking the daemon at {} to merge process {}", path.display(), a.pid))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout);
    loop {
        let parts = Connection::status(&path).with_context(|| format!("asking the daemon at {}", path.display()))?;
        let done: Vec<_> = parts
            .iter()
            .flat_map(|p| &p.processes)
            .filter_map(|r| r.merged_now.filter(|m| ids.contains(&m.id)))
            .collect();
        if done.len() == ids.len() {
            let pages: u64 = done.iter().map(|m| m.pages).sum();
            let saved: u64 = done.iter().map(|m| m.saved_bytes).sum();
            println!("process {}: {pages} pages merged, {saved} bytes saved", a.pid);
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("process {} did not answer within {} s (is its engine stopped?)", a.pid, a.timeout);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A partition's counters `samepage status` shows, by kernel name, in the
/// order it shows them.
fn shown(c: &samepage::Counters) -> [(&'static str, i64); 8] {
    const SHOWN: [&str; 8] = [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "ksm_zero_pages",
        "general_profit",
        "stable_node_chains",
        "stable_node_dups",
    ];
    let all = c.named();
    SHOWN.map(|n| (n, all.iter().find(|(k, _)| *k == n).map_or(0, |&(_, v)| v)))
}

/// Prints the daemon's partitions and clients.
pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let path = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    let parts = Connection::status(&path).with_context(|| format!("asking the daemon at {}", path.display()))?;
    let tunables = Connection::tunables(&path).with_context(|| format!("asking the daemon at {}", path.display()))?;
    if a.json {
        let v: Vec<serde_json::Value> = parts
            .iter()
            .map(|p| {
                let c = samepage_daemon::view::partition_counters(p);
                let mut v = serde_json::json!({
                    "uid": p.uid,
                    "domain": p.domain,
                    "pool_slots_in_use": p.slots_in_use,
                    "orphan_slots": p.orphans,
                    "clients": p.clients.iter().map(|(c, pid)| serde_json::json!({"client": c.0, "pid": pid})).collect::<Vec<_>>(),
                    "processes": p.processes.iter().map(|r| serde_json::json!({
                        "pid": r.pid,
                        "ksm_rmap_items": r.ksm_rmap_items,
                        "ksm_zero_pages": r.ksm_zero_pages,
                        "ksm_merging_pages": r.ksm_merging_pages,
                        "ksm_process_profit": r.ksm_process_profit,
                        "ksm_mergeable": r.ksm_mergeable,
                        "cpu_seconds": r.cpu_ns as f64 / 1e9,
                        "full_scans": r.full_scans,
                        "memory_bytes": r.memory_bytes,
                    })).collect::<Vec<_>>(),
                });
                for (name, value) in shown(&c) {
                    v[name] = value.into();
                }
                v
            })
            .collect();
        let t: serde_json::Map<String, serde_json::Value> =
            tunables.named().into_iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v))).collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"tunables": t, "partitions": v}))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("samepage daemon at {}: {} partition(s)", path.display(), parts.len());
    let named = tunables.named();
    println!("tunables: {}", named.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
    for p in &parts {
        let c = samepage_daemon::view::partition_counters(p);
        let figures: Vec<String> = shown(&c).iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!(
            "uid {} domain {}: {}, pool slots {} (orphans {}), clients {:?}",
            p.uid,
            p.domain,
            figures.join(" "),
            p.slots_in_use,
            p.orphans,
            p.clients.iter().map(|(_, pid)| *pid).collect::<Vec<_>>()
        );
        for r in &p.processes {
            println!(
                "  pid {}: ksm_rmap_items {} ksm_zero_pages {} ksm_merging_pages {} ksm_process_profit {} ksm_mergeable {} full_scans {}, scanner CPU {:.2} s, engine memory {} KiB",
                r.pid,
                r.ksm_rmap_items,
                r.ksm_zero_pages,
                r.ksm_merging_pages,
                r.ksm_process_profit,
                r.ksm_mergeable,
                r.full_scans,
                r.cpu_ns as f64 / 1e9,
                r.memory_bytes / 1024
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
