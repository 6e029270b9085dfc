//! The daemon over a real unix socket: clients whose scanners use the
//! daemon's trees and pool (one request per batch) reach the counters one
//! scanner over all their memory reaches (the kernel's); a client whose
//! connection closes gives back what it held and a survivor frees the
//! orphaned pool pages; clients of different domains never share a page.
//! The memory is simulated (one simulated machine holding every client's
//! pages), so the tests are deterministic apart from the socket.

use samepage_core::model::common;
use samepage_core::rmap::Link;
use samepage_core::shared::system_counters;
use samepage_core::sim::SimPageSpace;
use samepage_core::{Counters, Ksm, PageRef, RegionId, Run, Tunables, PAGE_SIZE};
use samepage_daemon::client::{Connection, RemotePool, RemoteStableTree, RemoteUnstableTree, SharedConnection};
use samepage_daemon::protocol::{read_frame, write_frame, ProcessStatus, Request, Response};
use samepage_daemon::server::{Config, Daemon};
use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type Proc = Ksm<RemoteStableTree, RemoteUnstableTree, RemotePool>;
const PAGES: u64 = 120;

fn start(max_page_sharing: u32) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("samepage-test-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    // Any user may connect (each gets partitions of its own).
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let tunables = Tunables { max_page_sharing, ..Config::default().tunables };
    let daemon = Daemon::new(Config { tunables, ..Config::default() });
    std::thread::spawn(move || daemon.serve(&listener));
    path
}

fn tunables(max_page_sharing: u32) -> Tunables {
    Tunables { run: Run::Merge, pages_to_scan: 40, max_page_sharing, use_zero_pages: true, ..Tunables::default() }
}

fn content(p: u32, i: u64) -> [u8; PAGE_SIZE] {
    match i % 6 {
        0 => [0; PAGE_SIZE],
        k @ 1..=3 => common(k as u8),
        4 => {
            let mut b = [0u8; PAGE_SIZE];
            b[..8].copy_from_slice(&i.to_le_bytes());
            b
        }
        _ => {
            let mut b = [1u8; PAGE_SIZE];
            b[..8].copy_from_slice(&(u64::from(p) << 32 | i).to_le_bytes());
            b
        }
    }
}

struct Client {
    ksm: Proc,
    conn: SharedConnection,
    region: RegionId,
}

fn client(path: &std::path::Path, domain: u32, t: &Tunables, space: &mut SimPageSpace, p: u32) -> Client {
    let conn = Connection::connect(path, domain).unwrap();
    let parts = (RemoteStableTree::new(&conn), RemoteUnstableTree::new(&conn), RemotePool::new(&conn));
    let mut ksm = Ksm::with_parts(t.clone(), parts.0, parts.1, parts.2).unwrap();
    let region = RegionId(p + 1);
    space.add_region(region, PAGES);
    ksm.add_region(region, PAGES);
    for i in 0..PAGES {
        space.write(PageRef { region, index: i }, 0, &content(p, i));
    }
    Client { ksm, conn, region }
}

fn converge(clients: &mut [Client], space: &mut SimPageSpace, now: &mut u64) -> Counters {
    let mut last = (Vec::new(), 0);
    for _ in 0..3000 {
        *now += 7;
        for c in clients.iter_mut() {
            c.ksm.scan_batch(space, *now);
        }
        let key: Vec<u64> = clients
            .iter()
            .flat_map(|c| c.ksm.counters().named().iter().map(|x| x.1 as u64).take(4).collect::<Vec<_>>())
            .collect();
        if key == last.0 {
            last.1 += 1;
            if last.1 == 20 {
                let each: Vec<Counters> = clients.iter().map(|c| c.ksm.counters()).collect();
                let stats = samepage_core::stable::StableTree::stats(&RemoteStableTree::new(&clients[0].conn));
                return system_counters(&each, stats);
            }
        } else {
            last = (key, 0);
        }
    }
    panic!("no convergence");
}

fn one_scanner(n: u32, t: &Tunables) -> Counters {
    let mut ksm = Ksm::new(t.clone()).unwrap();
    let mut space = SimPageSpace::new();
    for p in 0..n {
        let region = RegionId(p + 1);
        space.add_region(region, PAGES);
        ksm.add_region(region, PAGES);
        for i in 0..PAGES {
            space.write(PageRef { region, index: i }, 0, &content(p, i));
        }
    }
    for now in 0..3000 {
        ksm.scan_batch(&mut space, now * 7);
    }
    ksm.counters()
}

fn kernel_view(c: &Counters) -> [u64; 5] {
    [c.pages_shared, c.pages_sharing, c.stable_node_chains, c.stable_node_dups, c.ksm_zero_pages]
}

/// Every page holds its content; the daemon's node counts equal the pages
/// the clients link to them and that map their slots.
fn check(clients: &[Client], space: &SimPageSpace) {
    let mut linked: BTreeMap<u64, u64> = BTreeMap::new();
    for (p, c) in clients.iter().enumerate() {
        c.ksm.check_invariants().unwrap();
        for i in 0..PAGES {
            let page = PageRef { region: c.region, index: i };
            assert!(space.read(page) == content(c.region.0 - 1, i), "client {p} page {i}");
            if let Link::Stable(n) = c.ksm.item(page).link() {
                *linked.entry(u64::from(n.0)).or_default() += 1;
            }
        }
    }
    let maps = space.slot_mappings();
    let mapped: u64 = maps.values().sum();
    assert_eq!(mapped, linked.values().sum::<u64>(), "pages mapping slots = pages linked to nodes");
}

#[test]
fn clients_over_the_socket_reach_one_scanners_counters() {
    for max in [256, 3] {
        let path = start(max);
        let t = tunables(max);
        let mut space = SimPageSpace::new();
        let mut clients: Vec<Client> = (0..3).map(|p| client(&path, 0, &t, &mut space, p)).collect();
        let mut now = 0;
        let c = converge(&mut clients, &mut space, &mut now);
        check(&clients, &space);
        assert_eq!(kernel_view(&c), kernel_view(&one_scanner(3, &t)), "max_page_sharing {max}: {c:?}");
        let status = Connection::status(&path).unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].clients.len(), 3);
        assert_eq!(status[0].clients[0].1, std::process::id() as i32, "peer credentials name the process");
        assert_eq!(status[0].stable.nodes, c.pages_shared);
    }
}

#[test]
fn a_client_that_disconnects_gives_back_what_it_held() {
    let path = start(4);
    let t = tunables(4);
    let mut space = SimPageSpace::new();
    let mut clients: Vec<Client> = (0..3).map(|p| client(&path, 0, &t, &mut space, p)).collect();
    let mut now = 0;
    converge(&mut clients, &mut space, &mut now);
    let before = Connection::status(&path).unwrap()[0].clone();
    // Client 1 goes: its memory with it, and its connection closes.
    let gone = clients.remove(1);
    space.remove_region(gone.region);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = Connection::status(&path).unwrap()[0].clone();
        if s.clients.len() == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon never saw the client go");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(after.stable.mappings < before.stable.mappings);
    // A survivor frees the orphaned pages at its prune.
    now += 10_000;
    clients[0].ksm.prune(&mut space, now);
    let s = Connection::status(&path).unwrap()[0].clone();
    assert_eq!(s.orphans, 0);
    assert_eq!(space.pool_pages() as u64, s.stable.nodes, "no pool page without a node");
    converge(&mut clients, &mut space, &mut now);
    check(&clients, &space);
    // Everyone unregisters: nothing is left in the pool.
    for c in clients.iter_mut() {
        c.ksm.remove_region(&mut space, c.region).unwrap();
    }
    let s = Connection::status(&path).unwrap()[0].clone();
    assert_eq!((s.stable.nodes, s.slots_in_use, space.pool_pages()), (0, 0, 0));
}

#[test]
fn clients_of_different_domains_never_share_a_page() {
    let path = start(256);
    let t = tunables(256);
    let mut space = SimPageSpace::new();
    let mut clients: Vec<Client> = (0..2).map(|p| client(&path, p, &t, &mut space, p)).collect();
    let mut now = 0;
    converge(&mut clients, &mut space, &mut now);
    let status = Connection::status(&path).unwrap();
    assert_eq!(status.len(), 2, "one partition per domain: {status:?}");
    // Each client's pages map only slots of its own partition's pool: the
    // contents both hold (kinds 1-4) made a stable page in each partition.
    let alone = {
        let mut space = SimPageSpace::new();
        let mut c = vec![client(&start(256), 0, &t, &mut space, 0)];
        converge(&mut c, &mut space, &mut now).pages_shared
    };
    for s in &status {
        assert_eq!(s.stable.nodes, alone, "partition {s:?}");
    }
}

#[test]
fn a_stranger_speaking_first_without_hello_is_refused() {
    let path = start(256);
    let mut s = UnixStream::connect(&path).unwrap();
    write_frame(&mut s, &Request::Prune).unwrap();
    match read_frame::<Response>(&mut s).unwrap() {
        Response::Error { errno, message } => assert!(errno == 71 && message.contains("Hello"), "{message}"),
        other => panic!("{other:?}"),
    }
    let bad = Connection::connect(&PathBuf::from("/nonexistent/samepage.sock"), 0).unwrap_err();
    assert_eq!(bad.errno(), Some(2), "{bad}");
}

/// Processes of different users never share a partition, so never a page:
/// the daemon tells them apart by the kernel's peer credentials. The other
/// user's process is this test binary run again as `nobody` (root only).
#[test]
fn processes_of_different_users_never_share_a_page() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let path = start(256);
    let t = tunables(256);
    let mut space = SimPageSpace::new();
    let mut mine = vec![client(&path, 0, &t, &mut space, 0)];
    let mut now = 0;
    let c = converge(&mut mine, &mut space, &mut now);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "client_of_another_user", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SAMEPAGE_TEST_SOCKET", &path)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("other user converged"), "{log}");
    assert!(log.contains("other user refused"), "{log}");
    // The daemon sees the other process's connection close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = Connection::status(&path).unwrap();
        if s.len() == 2 && s[1].clients.is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let uids: Vec<u32> = status.iter().map(|p| p.uid).collect();
    assert_eq!(uids, vec![0, 65534], "{status:?}");
    // The same content on both sides; each partition made its own stable
    // pages in its own pool (the other process saw its own, this one's are
    // untouched). The other user's process has exited since: its partition
    // is empty again and its pool freed.
    assert_eq!(status[0].stable.nodes, c.pages_shared, "{status:?}");
    assert_eq!(status[0].slots_in_use, c.pages_shared);
    assert!(log.contains(&format!("pages_shared: {}", c.pages_shared)), "{log}");
    assert_eq!((status[1].stable.nodes, status[1].slots_in_use, status[1].pool_bytes), (0, 0, 0));
}

/// The client run as another user by the test above.
#[test]
#[ignore = "run by processes_of_different_users_never_share_a_page as another user"]
fn client_of_another_user() {
    let path = PathBuf::from(std::env::var_os("SAMEPAGE_TEST_SOCKET").expect("run by the test above"));
    let t = tunables(256);
    let mut space = SimPageSpace::new();
    let mut c = vec![client(&path, 0, &t, &mut space, 0)];
    let mut now = 0;
    let counters = converge(&mut c, &mut space, &mut now);
    println!("other user converged: {counters:?}");
    // Another user may not change the system-wide tunables, nor order
    // merges of root's processes.
    let e = Connection::set(&path, "pages_to_scan", "7").unwrap_err();
    assert_eq!(e.errno(), Some(13), "{e}");
    let e = Connection::merge_pid(&path, std::os::unix::process::parent_id() as i32).unwrap_err();
    assert!(matches!(e.errno(), Some(13) | Some(3)), "{e}");
    println!("other user refused");
}

/// The daemon's tunables are system-wide: set as the kernel's sysfs files
/// are (its errnos), `max_page_sharing` busy while any partition has stable
/// pages, and every client gets a share of `pages_to_scan` in proportion to
/// the pages it registered, summing to the machine-wide rate.
#[test]
fn tunables_are_the_daemons_and_pages_to_scan_is_shared_out() {
    use samepage_daemon::protocol::ProcessStatus;
    let path = start(4);
    assert_eq!(Connection::tunables(&path).unwrap().max_page_sharing, 4);
    let t = Connection::set(&path, "pages_to_scan", "1000").unwrap();
    assert_eq!(t.pages_to_scan, 1000);
    assert_eq!(Connection::set(&path, "run", "3").unwrap_err().errno(), Some(22));
    assert_eq!(Connection::set(&path, "max_page_sharing", "1").unwrap_err().errno(), Some(22));
    assert_eq!(Connection::set(&path, "no_such_tunable", "1").unwrap_err().errno(), Some(2));
    // Three clients of 100, 300 and 600 pages: 100, 300 and 600 pages a batch.
    let conns: Vec<_> = (0..3).map(|d| Connection::connect(&path, d).unwrap()).collect();
    for (c, pages) in conns.iter().zip([100u64, 300, 600]) {
        c.lock().unwrap().report(ProcessStatus { ksm_mergeable: pages, ..Default::default() }).unwrap();
    }
    let shares: Vec<u32> = conns
        .iter()
        .zip([100u64, 300, 600])
        .map(|(c, pages)| {
            let o = c.lock().unwrap().report(ProcessStatus { ksm_mergeable: pages, ..Default::default() }).unwrap();
            assert_eq!(o.tunables.pages_to_scan, 1000);
            o.pages_to_scan
        })
        .collect();
    assert_eq!(shares, vec![100, 300, 600]);
    // A stable page in one partition: max_page_sharing is busy everywhere.
    let t = tunables(4);
    let mut space = SimPageSpace::new();
    let mut procs = vec![client(&path, 0, &t, &mut space, 0), client(&path, 0, &t, &mut space, 1)];
    let mut now = 0;
    converge(&mut procs, &mut space, &mut now);
    assert_eq!(Connection::set(&path, "max_page_sharing", "8").unwrap_err().errno(), Some(16));
    assert_eq!(Connection::tunables(&path).unwrap().max_page_sharing, 4);
}

/// The partition's cumulative counters (pages scanned, copy-on-write
/// breaks, full scans) never go back when an engine leaves: the daemon
/// keeps what it had counted (`PartitionStatus::gone`), as a Prometheus
/// counter or node_exporter's `full_scans` needs.
#[test]
fn counts_of_engines_gone_stay_in_the_partitions_totals() {
    let path = start(4);
    let report = |conn: &SharedConnection, scanned, cow, full_scans| {
        let counters = Counters { pages_scanned: scanned, cow_faults: cow, ..Counters::default() };
        let r = ProcessStatus { full_scans, counters: Some(Box::new(counters)), ..ProcessStatus::default() };
        conn.lock().unwrap().report(r).unwrap();
    };
    let totals = || {
        let c = samepage_daemon::view::partition_counters(&Connection::status(&path).unwrap()[0]);
        (c.pages_scanned, c.cow_faults, c.full_scans)
    };
    let (a, b) = (Connection::connect(&path, 0).unwrap(), Connection::connect(&path, 0).unwrap());
    report(&a, 10, 1, 4);
    report(&b, 5, 2, 7);
    assert_eq!(totals(), (15, 3, 7));
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Connection::status(&path).unwrap()[0].clients.len() != 1 {
        assert!(Instant::now() < deadline, "the daemon never saw the client go");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(totals(), (15, 3, 7), "the busiest engine left: nothing goes back");
    report(&a, 12, 1, 5);
    assert_eq!(totals(), (17, 3, 7));
}
