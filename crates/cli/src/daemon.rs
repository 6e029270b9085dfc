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

/// `samepage daemon`.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The socket to listen on [default: /run/samepage/samepage.sock as
    /// root, $XDG_RUNTIME_DIR/samepage.sock otherwise].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// `max_page_sharing` of every partition (2 or more), as the kernel's
    /// tunable.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..))]
    max_page_sharing: u32,
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
    eprintln!("samepage daemon: listening on {} (max_page_sharing {})", path.display(), a.max_page_sharing);
    let daemon = Daemon::new(Config { max_page_sharing: a.max_page_sharing, ..Config::default() });
    daemon.serve(&listener).context("accepting clients")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the daemon's partitions and clients.
pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let path = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    let parts = Connection::status(&path).with_context(|| format!("asking the daemon at {}", path.display()))?;
    if a.json {
        let v: Vec<serde_json::Value> = parts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "uid": p.uid,
                    "domain": p.domain,
                    "pages_shared": p.stable.nodes,
                    "pages_sharing": p.stable.mappings - p.stable.nodes,
                    "stable_node_chains": p.stable.chains,
                    "stable_node_dups": p.stable.dups,
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
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("samepage daemon at {}: {} partition(s)", path.display(), parts.len());
    for p in &parts {
        println!(
            "uid {} domain {}: pages_shared {} pages_sharing {} stable_node_chains {} stable_node_dups {}, pool slots {} (orphans {}), clients {:?}",
            p.uid,
            p.domain,
            p.stable.nodes,
            p.stable.mappings - p.stable.nodes,
            p.stable.chains,
            p.stable.dups,
            p.slots_in_use,
            p.orphans,
            p.clients.iter().map(|(_, pid)| *pid).collect::<Vec<_>>()
        );
        for r in &p.processes {
            println!(
                "  pid {}: ksm_rmap_items {} ksm_zero_pages {} ksm_merging_pages {} ksm_process_profit {} ksm_mergeable {}, scanner CPU {:.2} s",
                r.pid,
                r.ksm_rmap_items,
                r.ksm_zero_pages,
                r.ksm_merging_pages,
                r.ksm_process_profit,
                r.ksm_mergeable,
                r.cpu_ns as f64 / 1e9
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
