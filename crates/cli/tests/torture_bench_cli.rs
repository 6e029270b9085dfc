//! `samepage torture` and `samepage bench`, short runs: no lost write, and
//! the JSON a user scripts against.

use std::process::Command;

fn samepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
}

#[test]
fn torture_loses_nothing() {
    let out =
        samepage().args(["torture", "--seconds", "8", "--regions", "3", "--pages", "1024", "--json"]).output().unwrap();
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
    let out =
        samepage().args(["bench", "--samepage-only", "--workload", "mix", "--size", "16M", "--json"]).output().unwrap();
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
