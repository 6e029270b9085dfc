//! The C ABI as a C program uses it: `examples/merge.c` compiled with the
//! system's C compiler against `include/samepage.h` and the
//! `libsamepage_c.so` cargo built, then run: it merges 256 pages of 4
//! contents to the kernel's counters (4 shared, 252 sharing), checks every
//! byte, writes, discards, unregisters, and checks again.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_c_program_merges_its_memory_through_samepage_h() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Built beside this test (target/<profile>/deps), where `cargo test`
    // leaves it; `cargo build` also copies it to target/<profile>.
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let lib_dir = [deps.clone(), deps.parent().unwrap().to_path_buf()]
        .into_iter()
        .find(|d| d.join("libsamepage_c.so").exists())
        .unwrap_or_else(|| panic!("no libsamepage_c.so in {} or its parent", deps.display()));
    let exe = std::env::temp_dir().join(format!("samepage-merge-c-{}", std::process::id()));
    let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Werror", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("examples/merge.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lsamepage_c")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("pages_to_scan 1000"), "{stdout}");
    assert!(stdout.contains("max_page_sharing = 1"), "the refusal names the value: {stdout}");
    // After one page written and one discarded: 4 stable pages, 250 sharing them.
    assert!(stdout.contains("pages_shared 4\npages_sharing 250\n"), "{stdout}");
    assert!(stdout.ends_with("ok\n"), "{stdout}");
}
