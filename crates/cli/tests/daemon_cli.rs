//! `samepage daemon` and `samepage status` as a user runs them: the daemon
//! listens, a client process connects, status names it by its process id,
//! and a client that goes is gone from status.

use samepage_daemon::client::Connection;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn status_shows_the_daemons_clients() {
    let socket = std::env::temp_dir().join(format!("samepage-cli-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["daemon", "--socket"])
        .arg(&socket)
        .args(["--max-page-sharing", "64"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let conn = loop {
        match Connection::connect(&socket, 5) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "the daemon never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let status = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_samepage"));
        c.args(["status", "--socket"]).arg(&socket);
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(v[0]["domain"], 5);
    assert_eq!(v[0]["uid"], my_uid());
    assert_eq!(v[0]["clients"][0]["pid"], std::process::id());
    assert!(status(false).contains(&format!("clients [{}]", std::process::id())));
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
        if v[0]["clients"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the client never left: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    // A second daemon on the stale socket takes it over.
    let mut again = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["daemon", "--socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Connection::connect(&socket, 0).is_err() {
        assert!(Instant::now() < deadline, "the second daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    again.kill().unwrap();
    again.wait().unwrap();
    let _ = std::fs::remove_file(&socket);
}

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap()
}

/// `samepage bench --workload processes`: processes merged across each
/// other by ksmd and by engines connected to a daemon reach the counters the
/// content implies, and every page stays byte-exact.
#[test]
fn bench_processes_reaches_the_contents_counters_on_both_sides() {
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["bench", "--workload", "processes", "--processes", "3", "--size", "24M", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = (&v["expected"]["pages_shared"], &v["expected"]["pages_sharing"]);
    for side in ["kernel", "samepage"] {
        if v[side].is_null() {
            assert!(side == "kernel" && stderr.contains("kernel side skipped"), "{stderr}");
            continue;
        }
        assert_eq!((&v[side]["pages_shared"], &v[side]["pages_sharing"]), want, "{side}: {v}");
        assert_eq!(v[side]["bad_pages"], 0, "{side}");
    }
    assert!(v["samepage"]["requests_per_page_scanned"].as_f64().unwrap() < 0.1, "batched: {v}");
}
