//! `samepage daemon` and `samepage status` as a user runs them: the daemon
//! listens, a client process connects, status names it by its process id,
//! and a client that goes is gone from status.

mod common;
use common::{my_uid, retry, spawn_daemon, status_json, wait_for};

use samepage_daemon::client::Connection;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn status_shows_the_daemons_clients() {
    let socket = std::env::temp_dir().join(format!("samepage-cli-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let daemon = spawn_daemon(&socket, &["--max-page-sharing", "64"]);
    let conn = retry("the daemon never listened", || Connection::connect(&socket, 5));
    let v = status_json(&socket);
    assert_eq!(v["partitions"][0]["domain"], 5);
    assert_eq!(v["partitions"][0]["uid"], my_uid());
    assert_eq!(v["partitions"][0]["clients"][0]["pid"], std::process::id());
    assert_eq!(v["tunables"]["max_page_sharing"], "64");
    let text = Command::new(env!("CARGO_BIN_EXE_samepage")).args(["status", "--socket"]).arg(&socket).output().unwrap();
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("clients [{}]", std::process::id())));
    drop(conn);
    wait_for("the client to leave", || {
        status_json(&socket)["partitions"][0]["clients"].as_array().unwrap().is_empty().then_some(())
    });
    drop(daemon);
    // A second daemon on the stale socket takes it over.
    let again = spawn_daemon(&socket, &[]);
    retry("the second daemon never listened", || Connection::connect(&socket, 0));
    drop(again);
    let _ = std::fs::remove_file(&socket);
}

/// `samepage set` changes the daemon's tunables as writing the kernel's
/// sysfs files does (refusals with the kernel's messages, `max_page_sharing`
/// busy while stable pages exist), a connected engine follows them (its
/// share of `pages_to_scan`, `run = 2` unmerging everything), and `samepage
/// merge --pid` merges a process's memory at once and prints what it saved.
#[test]
fn set_and_merge_through_the_daemon() {
    use samepage::{Domain, Engine, Run, Tunables};
    let socket = std::env::temp_dir().join(format!("samepage-cli-set-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let daemon = spawn_daemon(&socket, &["--pages-to-scan", "500", "--sleep-ms", "50"]);
    // run = 0 in this process: nothing merges until asked.
    let engine = retry("the daemon never listened", || {
        Engine::connect(&socket, Domain(9), Tunables { run: Run::Stop, ..Tunables::default() })
    });
    let t = engine.tunables().unwrap();
    assert_eq!((t.sleep_millisecs, t.run), (50, Run::Stop), "the daemon's tunables, this process's run");
    let region = engine.alloc_region(64 * 4096).unwrap();
    for i in 0..64 {
        region.write(i * 4096, &[(i % 4) as u8 + 1; 4096]).unwrap();
    }
    let cli = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_samepage")).args(args).arg("--socket").arg(&socket).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pid = std::process::id().to_string();
    let (ok, out, err) = cli(&["merge", "--pid", &pid]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("{} bytes saved", 60 * 4096)), "64 pages of 4 contents: {out}");
    for i in 0..64 {
        let mut b = [0u8; 4096];
        region.read(i * 4096, &mut b).unwrap();
        assert_eq!(b, [(i % 4) as u8 + 1; 4096], "page {i}");
    }
    let (ok, _, err) = cli(&["merge", "--pid", "1"]);
    assert!(!ok && err.contains("no engine connected"), "{err}");

    let (ok, out, err) = cli(&["set", "pages_to_scan=1234"]);
    assert!(ok, "{err}");
    assert!(out.contains("pages_to_scan 1234"), "{out}");
    let (ok, _, err) = cli(&["set", "max_page_sharing=1"]);
    assert!(!ok && err.contains("max_page_sharing = 1") && err.contains("2 to 2147483647"), "{err}");
    let (ok, _, err) = cli(&["set", "max_page_sharing=32"]);
    assert!(!ok && err.contains("errno 16"), "busy while stable pages exist: {err}");
    let (ok, _, err) = cli(&["set", "sleep_millisecs=x"]);
    assert!(!ok && err.contains("errno 22"), "{err}");
    // The only client scans the whole machine-wide rate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.tunables().unwrap().pages_to_scan != 1234 {
        assert!(Instant::now() < deadline, "the engine never took the new pages_to_scan");
        std::thread::sleep(Duration::from_millis(20));
    }
    // run = 2 unmerges every process's pages.
    let (ok, _, err) = cli(&["set", "run=2"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.counters().unwrap().pages_sharing + engine.counters().unwrap().pages_shared > 0 {
        assert!(Instant::now() < deadline, "run = 2 never unmerged: {:?}", engine.counters());
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..64 {
        let mut b = [0u8; 4096];
        region.read(i * 4096, &mut b).unwrap();
        assert_eq!(b, [(i % 4) as u8 + 1; 4096], "page {i} after run = 2");
    }
    let (ok, out, err) = cli(&["set", "max_page_sharing=32"]);
    assert!(ok, "no stable page left: {err}");
    assert!(out.contains("max_page_sharing 32"), "{out}");
    drop(region);
    drop(engine);
    drop(daemon);
    let _ = std::fs::remove_file(&socket);
}

/// The daemon killed (SIGKILL) and started again: the engines connected to
/// it keep every byte and their merged pages while no daemon answers, then
/// connect to the new one, unmerge what mapped the old daemon's pool, and
/// merge again through the new one, to the counters the content implies;
/// no trace of the old pool is left in the process (no mapping, no fd).
#[test]
fn engines_outlive_a_daemon_restart_and_merge_again() {
    use samepage::{Domain, Engine, Run, Tunables};
    const PAGES: usize = 256;
    let socket = std::env::temp_dir().join(format!("samepage-cli-restart-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let args = ["--pages-to-scan", "1000", "--sleep-ms", "5"];
    let daemon = spawn_daemon(&socket, &args);
    let page = |i: usize| [(i % 8) as u8 + 1; 4096];
    let mut clients = Vec::new();
    for _ in 0..2 {
        let engine = retry("the daemon never listened", || {
            Engine::connect(&socket, Domain::default(), Tunables { run: Run::Merge, ..Tunables::default() })
        });
        let region = engine.alloc_region(PAGES * 4096).unwrap();
        for i in 0..PAGES {
            region.write(i * 4096, &page(i)).unwrap();
        }
        clients.push((engine, region));
    }
    let check = |clients: &[(Engine, samepage::Region)], when: &str| {
        for (c, (_, region)) in clients.iter().enumerate() {
            for i in 0..PAGES {
                let mut b = [0u8; 4096];
                region.read(i * 4096, &mut b).unwrap();
                assert_eq!(b, page(i), "client {c} page {i} {when}");
            }
        }
    };
    // 2 x 256 pages of 8 contents: 8 stable pages, 504 sharing them.
    let merged = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = Connection::status(&socket).ok();
            let st = s.as_ref().and_then(|s| s.first()).map(|p| (p.stable.nodes, p.stable.mappings, p.clients.len()));
            if st == Some((8, 512, 2)) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {st:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    merged("the first daemon never merged the two engines' pages");
    let old_pools = pool_inodes();
    assert_eq!(old_pools.len(), 1, "one pool mapped: {old_pools:?}");
    drop(daemon);
    // No daemon: merged pages stay merged and exact.
    std::thread::sleep(Duration::from_millis(600));
    check(&clients, "with no daemon");
    for (engine, _) in &clients {
        let link = engine.daemon_link().unwrap();
        assert!(!link.connected, "{link:?}");
        assert!(engine.counters().unwrap().pages_sharing + engine.counters().unwrap().pages_shared > 0);
    }
    let again = spawn_daemon(&socket, &args);
    merged("the engines never merged again through the second daemon");
    for (engine, _) in &clients {
        let link = engine.daemon_link().unwrap();
        assert_eq!((link.connected, link.reconnects), (true, 1), "{link:?}");
    }
    check(&clients, "after the restart");
    let now = pool_inodes();
    assert!(now.iter().all(|i| !old_pools.contains(i)), "the old pool is still held: {old_pools:?} {now:?}");
    drop(clients);
    drop(again);
    let _ = std::fs::remove_file(&socket);
}

/// The inodes of the pool memfds this process maps or holds open.
fn pool_inodes() -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeSet::new();
    for l in std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("samepage-pool")) {
        out.insert(l.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap());
    }
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
        if target.contains("samepage-pool") {
            if let Ok(m) = std::fs::metadata(e.path()) {
                out.insert(m.ino());
            }
        }
    }
    out
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
