//! `samepage torture` and `samepage bench`, short runs: no lost write, and
//! the JSON a user scripts against.

mod common;
use common::OutputWithin;
use std::process::Command;
use std::time::Duration;

/// Each run here takes seconds to a minute: past this it hangs.
const LIMIT: Duration = Duration::from_secs(300);

fn samepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
}

#[test]
fn torture_loses_nothing() {
    let out = samepage()
        .args(["torture", "--seconds", "8", "--regions", "3", "--pages", "1024", "--json"])
        .output_within(LIMIT);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["lost_writes"], 0, "{v}");
    assert_eq!(v["corrupted_bytes"], 0, "{v}");
    assert_eq!(v["child_failures"], 0, "{v}");
    assert_eq!(v["pool_pages_after_unregister"], 0, "{v}");
    for k in [
        "writes",
        "merges",
        "unmerges",
        "cow_faults",
        "forks",
        "kernel_writes",
        "reregisters",
        "run_changes",
        "unmaps",
        "remaps",
        "protects",
    ] {
        assert!(v[k].as_u64().unwrap() > 0, "nothing exercised {k}: {v}");
    }
}

#[test]
fn bench_samepage_only_reports_every_figure() {
    let out = samepage()
        .args(["bench", "--samepage-only", "--workload", "mix", "--size", "16M", "--json"])
        .output_within(LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["samepage"];
    for k in [
        "converge_seconds",
        "converge_cpu_seconds",
        "freed_bytes",
        "freed_bytes_process",
        "metadata_bytes_per_page",
        "steady_scan_cpu_seconds",
        "cow_fault_ns",
        "app_throughput_ratio",
    ] {
        assert!(s[k].is_number(), "{k} missing: {v}");
    }
    assert_eq!(s["integrity"], true);
    assert!(s["counters"]["pages_sharing"].as_i64().unwrap() > 0);
}

/// `samepage torture --processes`, short: client processes of a daemon,
/// some killed with SIGKILL and started again, the daemon killed and
/// started again; no page of any client wrong, no forked child
/// seeing wrong memory, the surviving clients connected to the new daemon
/// and holding nothing of the old one's pool, and no pool page left once
/// every client is gone.
#[test]
fn torture_processes_loses_nothing_through_kills_and_a_daemon_restart() {
    let out = samepage()
        .args(["torture", "--processes", "3", "--seconds", "10", "--pages", "512", "--json"])
        .output_within(LIMIT);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    for k in ["lost_pages", "child_failures", "old_pools_held", "pool_bytes_left", "slots_in_use_left"] {
        assert_eq!(v[k], 0, "{k}: {v}");
    }
    for k in [
        "daemon_restarts",
        "clients_killed",
        "reconnects",
        "merges",
        "cow_faults",
        "pages_checked",
        "forks",
        "discards",
    ] {
        assert!(v[k].as_u64().unwrap() > 0, "{k}: {v}");
    }
}
