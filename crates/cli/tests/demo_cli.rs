//! The `samepage demo` command end to end: JSON shape, integrity, exit codes.

use std::process::Command;

fn samepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
}

#[test]
fn demo_json_reaches_the_content_and_keeps_every_byte() {
    let out = samepage()
        .args(["demo", "--size", "32M", "--use-zero-pages", "--no-raise-map-count", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["integrity"], true);
    assert_eq!(v["counters_match_expected"], true, "{v}");
    let c = &v["counters"];
    for k in [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "pages_scanned",
        "full_scans",
        "ksm_zero_pages",
        "general_profit",
    ] {
        assert!(c[k].is_i64(), "counter {k} missing: {c}");
    }
    assert_eq!(c["ksm_zero_pages"], 2048);
    for k in [
        "anon_before_bytes",
        "anon_after_bytes",
        "shmem_before_bytes",
        "shmem_after_bytes",
        "process_before_bytes",
        "process_after_bytes",
    ] {
        assert!(v["memory"][k].is_u64(), "{k}");
    }
    // This process's own accounting does not move with other processes: it
    // freed about what merging saved (within 2 MiB: samepage's metadata and
    // the program's own allocations), whatever the rest of the machine did.
    let dup = v["duplicate_bytes"].as_i64().unwrap();
    let freed = v["freed_bytes_process"].as_i64().unwrap();
    assert!((freed - dup).abs() < 2 << 20, "freed {freed} of {dup} duplicate bytes: {v}");
    assert!(v["converge_seconds"].is_f64() && v["engine_cpu_seconds"].is_f64());
}

#[test]
fn demo_files_mode_merges_copies() {
    let dir = std::env::temp_dir().join(format!("samepage-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("a.bin");
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    let out = samepage()
        .args(["demo", "--files", f.to_str().unwrap(), "--copies", "3", "--no-raise-map-count", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["integrity"], true);
    // 10 pages (the last zero padded) three times: 10 stable pages, 20 sharing.
    assert_eq!(v["counters"]["pages_shared"], 10, "{v}");
    assert_eq!(v["counters"]["pages_sharing"], 20, "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_exits_2_naming_the_value() {
    for (args, needle) in [
        (vec!["demo", "--max-page-sharing", "1"], "1"),
        (vec!["demo", "--size", "12Q"], "12Q"),
        (vec!["demo", "--files", "/nonexistent/samepage"], "/nonexistent/samepage"),
        (vec!["demo", "--vma-share", "2"], "2"),
    ] {
        let out = samepage().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn demo_churn_shows_defrag_reaching_the_minimum() {
    let out = samepage()
        .args([
            "demo",
            "--size",
            "32M",
            "--max-page-sharing",
            "4",
            "--churn",
            "60",
            "--prune-ms",
            "100",
            "--no-raise-map-count",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["integrity"], true);
    assert!(v["counters"]["stable_node_refiled"].as_i64().unwrap() > 0, "{v}");
    let note =
        v["notes"].as_array().unwrap().iter().find_map(|n| n.as_str().filter(|s| s.starts_with("churn"))).unwrap();
    // "... stable pages (dups) A -> B for a minimum of C ..."
    let nums: Vec<u64> = note.split(|c: char| !c.is_ascii_digit()).filter_map(|t| t.parse().ok()).collect();
    assert_eq!(nums[2], nums[3], "defrag reaches the minimum: {note}");
}
