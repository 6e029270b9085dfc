//! Merging across processes through `samepage daemon`: two processes, each
//! with an engine connected to the daemon, holding the same pages. Their
//! pages end up mapping one pool page per content (the daemon's partition
//! memfd), every byte stays what each process wrote, writes after merging
//! get private copies, and when one process exits the other keeps its
//! content and frees the pool pages only it still needed.

mod common;

use common::{assert_content, content, fast, serial, smaps_sum_in, PAGE};
use samepage::{Domain, Engine};
use samepage_daemon::client::Connection;
use samepage_daemon::server::{Config, Daemon};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Pages per process: 8 contents, 32 copies of each.
const PAGES: usize = 256;
const CONTENTS: u64 = 8;

fn start_daemon() -> PathBuf {
    let path = std::env::temp_dir().join(format!("samepage-engine-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    // The daemon's tunables are in force in every client: full speed.
    let daemon = Daemon::new(Config { tunables: fast(256, false), ..Config::default() });
    std::thread::spawn(move || daemon.serve(&listener));
    path
}

/// An engine connected to the daemon with its region written.
fn connected(socket: &Path) -> (Engine, samepage::Region) {
    let engine = Engine::connect(socket, Domain::default(), fast(256, false)).unwrap();
    assert_eq!(engine.info().daemon.as_deref(), Some(socket));
    let region = engine.alloc_region(PAGES * PAGE).unwrap();
    for i in 0..PAGES {
        region.write(i * PAGE, &content(i as u64 % CONTENTS)).unwrap();
    }
    (engine, region)
}

fn check(region: &samepage::Region, written: &[(usize, [u8; PAGE])]) {
    assert_content(region, |i| {
        written.iter().find(|(p, _)| *p == i).map_or_else(|| content(i as u64 % CONTENTS), |(_, c)| *c)
    });
}

fn wait_for(socket: &Path, what: &str, ok: impl Fn(&samepage_daemon::protocol::PartitionStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = Connection::status(socket).unwrap();
        if s.first().is_some_and(&ok) {
            return;
        }
        if Instant::now() >= deadline {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let pool: Vec<&str> = maps.lines().filter(|l| l.contains("samepage-pool")).collect();
            panic!("{what}: {s:?}; this process maps {pool:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_processes_share_one_pool_page_per_content() {
    let _g = serial();
    let socket = start_daemon();
    let (engine, region) = connected(&socket);
    let (start, end) = (region.as_ptr() as usize, region.as_ptr() as usize + PAGES * PAGE);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_other_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SAMEPAGE_TEST_SOCKET", &socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Both processes' 512 pages map 8 pool pages: the kernel's counters for
    // 2 x 256 pages of 8 contents.
    wait_for(&socket, "the partition reaches 8 stable pages mapped 512 times", |p| {
        p.clients.len() == 2 && p.stable.nodes == CONTENTS && p.stable.mappings == 2 * PAGES as u64
    });
    check(&region, &[]);
    wait_for(&socket, "the pool holds one page per content", |p| p.pool_bytes == CONTENTS * PAGE as u64);
    let c = engine.counters().unwrap();
    assert_eq!(c.merges, PAGES as u64, "every page of this process merged: {c:?}");
    // Each process tells the daemon its ksm_stat figures, under its own pid.
    wait_for(&socket, "both processes report every page merging", |p| {
        let mut pids: Vec<i32> =
            p.processes.iter().filter(|r| r.ksm_merging_pages == PAGES as u64).map(|r| r.pid).collect();
        pids.sort();
        let mut want = vec![std::process::id() as i32, child.id() as i32];
        want.sort();
        pids == want && p.processes.iter().all(|r| r.ksm_mergeable == PAGES as u64)
    });
    // The region's anonymous memory is gone: its pages map the daemon's pool.
    assert_eq!(smaps_sum_in("Anonymous", start, end), 0, "merged: no anonymous page left in the region");
    // A write after merging gets a private copy; the other process keeps its bytes.
    let mut mine = content(999);
    mine[0] = 7;
    region.write(5 * PAGE, &mine).unwrap();
    check(&region, &[(5, mine)]);
    // The other process checks its memory and exits.
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && log.contains("the other process: content intact"), "{log}");
    wait_for(&socket, "the other process leaves", |p| p.clients.len() == 1);
    check(&region, &[(5, mine)]);
    // The other process's mappings are gone; this one still maps 8 pool
    // pages (one of them now once less: page 5 was written).
    wait_for(&socket, "what the other process held goes", |p| p.stable.mappings < 2 * PAGES as u64);
    let ino = engine.info().pool_inode;
    drop(region);
    drop(engine);
    let who = || {
        let mut out = Vec::new();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() {
                match std::fs::read_to_string(p.path().join("maps")) {
                    Ok(m) if m.contains(&format!(" {ino} ")) => out.push(format!("{pid} maps it")),
                    Ok(_) => {}
                    Err(e) => out.push(format!("{pid}: {e}")),
                }
            }
        }
        out
    };
    wait_for(&socket, "nothing is mapped once both are gone", |p| p.clients.is_empty() && p.stable.nodes == 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Connection::status(&socket).unwrap()[0].pool_bytes != 0 {
        assert!(Instant::now() < deadline, "the pool holds memory once both are gone: {:?}", who());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&socket);
}

/// The other process of the test above.
#[test]
#[ignore = "run by two_processes_share_one_pool_page_per_content in a process of its own"]
fn the_other_process() {
    let socket = PathBuf::from(std::env::var_os("SAMEPAGE_TEST_SOCKET").expect("run by the test above"));
    let (engine, region) = connected(&socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Connection::status(&socket).unwrap()[0].stable.mappings != 2 * PAGES as u64 {
        if Instant::now() > deadline {
            panic!("not merged: {:?} {:?}", engine.counters().unwrap(), Connection::status(&socket).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check(&region, &[]);
    // Wait for the parent (it closes our stdin), then check again.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    check(&region, &[]);
    use std::io::Write;
    let _ =
        writeln!(std::io::stdout(), "the other process: content intact, {} merges", engine.counters().unwrap().merges);
}

#[test]
fn without_a_daemon_connect_says_why() {
    let e = Engine::connect(Path::new("/nonexistent/samepage.sock"), Domain::default(), fast(256, false)).unwrap_err();
    assert_eq!(e.errno(), Some(2), "{e}");
    assert!(e.to_string().contains("/nonexistent/samepage.sock"), "{e}");
    let own = Engine::new(fast(256, false)).unwrap();
    assert_eq!(own.info().daemon, None, "an engine of its own says so");
}
