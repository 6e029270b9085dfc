//! `libsamepage_preload.so` under a C program that knows nothing of
//! samepage (`tests/mergeable.c`, KSM-selftest style): its
//! `madvise(MADV_MERGEABLE)` memory merges (its pages come to map the
//! samepage pool), and writes, `MADV_DONTNEED`, `munmap`, `mprotect`,
//! `MADV_UNMERGEABLE` and `fork` keep every byte and the kernel's results.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn an_unmodified_c_program_merges_through_madvise_mergeable() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let lib = [deps.clone(), deps.parent().unwrap().to_path_buf()]
        .into_iter()
        .map(|d| d.join("libsamepage_preload.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no libsamepage_preload.so in {} or its parent", deps.display()));
    let exe = std::env::temp_dir().join(format!("samepage-mergeable-c-{}", std::process::id()));
    let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Werror"])
        .arg(crate_dir.join("tests/mergeable.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe)
        .env("LD_PRELOAD", &lib)
        .env("SAMEPAGE_MODE", "process")
        .env("SAMEPAGE_TUNABLES", "pages_to_scan=1000,sleep_millisecs=0")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("merged 256 pages") && stdout.ends_with("ok\n"), "{stdout}");
}
