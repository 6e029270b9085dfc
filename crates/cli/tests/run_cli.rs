//! `samepage run -- CMD`: a C program that knows nothing of samepage
//! (`crates/preload/tests/mergeable.c`, KSM-selftest style: it marks memory
//! with `madvise(MADV_MERGEABLE)`, waits until its pages map the samepage
//! pool, then writes, discards, unmaps, protects, unmerges and forks,
//! checking every byte) merges under it, inside itself and through a
//! daemon; `--merge-any` says it is not supported yet.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn samepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
}

fn program() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../preload/tests/mergeable.c");
    let exe = std::env::temp_dir().join(format!("samepage-run-mergeable-{}", std::process::id()));
    let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Werror"])
        .arg(src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    exe
}

fn assert_ok(out: std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("merged 256 pages") && stdout.ends_with("ok\n"), "{stdout}");
}

#[test]
fn an_unmodified_program_merges_under_samepage_run() {
    let exe = program();
    // Inside the program.
    assert_ok(
        samepage()
            .args(["run", "--own", "--pages-to-scan", "1000", "--sleep-ms", "0", "--"])
            .arg(&exe)
            .output()
            .unwrap(),
    );
    // Through a daemon: the program is its client.
    let socket = std::env::temp_dir().join(format!("samepage-run-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut daemon = samepage()
        .args(["daemon", "--pages-to-scan", "1000", "--sleep-ms", "0", "--socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while samepage_daemon::client::Connection::status(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ok(samepage().args(["run", "--socket"]).arg(&socket).arg("--").arg(&exe).output().unwrap());
    let status = samepage_daemon::client::Connection::status(&socket).unwrap();
    assert!(status.iter().any(|p| p.requests > 0), "the program never asked the daemon: {status:?}");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file(&socket);
    // Not yet.
    let out = samepage().args(["run", "--merge-any", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported yet"));
    let _ = std::fs::remove_file(&exe);
}
