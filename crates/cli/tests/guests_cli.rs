//! Real QEMU guests under `samepage run` (`scripts/guests/`): two TCG guests
//! booted from a Debian kernel and an initramfs the kit builds, with
//! identical content in their RAM, each QEMU a client of one samepage daemon
//! (QEMU marks guest RAM with `madvise(MADV_MERGEABLE)`, `mem-merge=on`).
//! Their RAM merges across the two QEMU processes, and both guests keep
//! checking every page of their memory and reading a `cache=none` disk
//! (O_DIRECT into guest RAM) after the merge. The short version of the
//! README's `scripts/guests/run.sh --mode samepage` run; it needs root, and
//! `scripts/guests/build.sh` installs QEMU, busybox and cpio from Debian's
//! packages when they are missing (`.ci/run` installs them first).

use std::path::Path;
use std::process::Command;

#[test]
fn qemu_guests_merge_across_processes_under_samepage_run_and_keep_every_byte() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: QEMU guests under samepage run need root (build.sh installs packages; the census reads /proc/kpageflags)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let scripts = repo.join("scripts/guests");
    let build = repo.join("target/guests");
    let st = Command::new(scripts.join("build.sh")).arg(&build).status().expect("build.sh");
    assert!(st.success(), "scripts/guests/build.sh failed");
    let out_dir = std::env::temp_dir().join(format!("samepage-guests-test-{}", std::process::id()));
    let out = Command::new(scripts.join("run.sh"))
        .args(["--mode", "samepage", "--guests", "2", "--mem", "64", "--seconds", "60", "--interval", "2"])
        .args(["--diskmb", "4", "--build"])
        .arg(&build)
        .arg("--out")
        .arg(&out_dir)
        .env("SAMEPAGE", env!("CARGO_BIN_EXE_samepage"))
        .output()
        .expect("run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or("");
    let s: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("summary: {e}\n{stdout}\n{stderr}"));
    let ctx = format!("{stderr}\n{last}");
    // Every guest checked every page of its memory and read its disk on
    // every round, including whole rounds after merging.
    assert_eq!(s["guests_ok"], true, "{ctx}");
    assert_eq!(s["verified_after"], true, "{ctx}");
    for g in s["guest_results"].as_array().unwrap() {
        assert_eq!(g["failure_count"], 0, "{ctx}");
        assert!(g["check_ok_rounds"].as_u64().unwrap() >= 2, "{ctx}");
    }
    assert_eq!(s["disk_o_direct"], true, "the disk is read with O_DIRECT (cache=none): {ctx}");
    // Merged across the two QEMU processes: the daemon's counters, and the
    // pages of guest RAM that map samepage's pool, counted from outside
    // (pagemap) by the census.
    let merged = s["converge"]["final"]["pages_sharing"].as_u64().unwrap();
    assert!(merged > 0, "nothing merged: {ctx}");
    let mapped = s["census_after"]["ksm_now"]["ksm_pages_mapped"].as_u64().unwrap();
    assert!(mapped > 0, "no guest RAM page maps the pool: {ctx}");
    assert_eq!(s["guest_ram_mergeable"], serde_json::json!([true, true]), "{ctx}");
    assert_eq!(s["leftover_qemu"], serde_json::json!([]), "{ctx}");
    let _ = std::fs::remove_dir_all(&out_dir);
}
