//! `samepage daemon --metrics ADDR`: the daemon's figures over HTTP in the
//! OpenMetrics text format (`GET /metrics`), with Prometheus conventions:
//! bytes rather than pages, counters ending in `_total`, CPU in seconds,
//! labels for partitions (`uid`, `domain`) and processes (`pid`); and the
//! names node_exporter's `ksmd` collector gives the kernel's files
//! (`node_ksmd_*`, in pages, as it exports them) for dashboards built on it.
//!
//! Every scrape reads the daemon's state at that moment (the same
//! [`Daemon::status`] `samepage status` gets over the socket) and each
//! client process's `samepage-*` threads' CPU from `/proc/PID/task/*/stat`.

use crate::args::UsageError;
use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use samepage::Counters;
use samepage_daemon::protocol::PartitionStatus;
use samepage_daemon::server::Daemon;
use samepage_daemon::view;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The port `--metrics` documents as samepage's (unassigned in Prometheus's
/// list of exporter ports at the time of writing).
pub const DEFAULT_PORT: u16 = 9467;

const PAGE: u64 = samepage::PAGE_SIZE as u64;

/// The address `--metrics` listens on: `PORT` or `:PORT` is the loopback
/// address (`127.0.0.1:PORT`), so nothing leaves the machine unless asked;
/// `HOST:PORT` (`0.0.0.0:9467`, `[::1]:9467`, `localhost:9467`) as given.
pub fn parse_addr(s: &str) -> Result<SocketAddr, UsageError> {
    let s = s.trim();
    let port = s.strip_prefix(':').unwrap_or(s);
    if let Ok(p) = port.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
    }
    let bad = || {
        UsageError(format!(
            "--metrics {s:?} is not an address: give PORT (0 to 65535, on 127.0.0.1), :PORT or HOST:PORT (e.g. {DEFAULT_PORT}, 0.0.0.0:{DEFAULT_PORT})"
        ))
    };
    s.to_socket_addrs().map_err(|_| bad())?.next().ok_or_else(bad)
}

/// Starts serving `GET /metrics` at `addr` for `daemon` on a thread of its
/// own; returns the address bound (port 0 picks one).
pub fn start(addr: SocketAddr, daemon: Arc<Daemon>) -> Result<SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("listening for metrics on {addr}"))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { daemon, totals: Mutex::default() }));
    std::thread::Builder::new()
        .name("samepage-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let resp = if path == "/metrics" {
                    // OpenMetrics to scrapers that ask for it (Prometheus
                    // does), the classic text format to everyone else
                    // (curl, `promtool check metrics`).
                    let open = req
                        .headers()
                        .iter()
                        .any(|h| h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text"));
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) if open => tiny_http::Response::from_string(body)
                            .with_header(content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")),
                        Ok(()) => tiny_http::Response::from_string(classic(&body))
                            .with_header(content_type("text/plain; version=0.0.4; charset=utf-8")),
                        Err(_) => tiny_http::Response::from_string("encoding failed\n").with_status_code(500),
                    }
                } else if path == "/" {
                    tiny_http::Response::from_string("samepage daemon: metrics at /metrics\n")
                        .with_header(content_type("text/plain; charset=utf-8"))
                } else {
                    tiny_http::Response::from_string("not found: metrics are at /metrics\n").with_status_code(404)
                };
                // A scraper that went away: serve the next one.
                let _ = req.respond(resp);
            }
        })
        .context("starting the metrics thread")?;
    Ok(bound)
}

/// OpenMetrics text as Prometheus's classic text format (0.0.4): a
/// counter family is named as its samples (`x_total`, not `x`), and there
/// are no `# UNIT` or `# EOF` lines.
pub fn classic(open: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn content_type(v: &str) -> tiny_http::Header {
    // Both halves are ASCII: from_bytes cannot refuse them.
    tiny_http::Header::from_bytes(&b"Content-Type"[..], v.as_bytes()).unwrap_or_else(|()| unreachable!())
}

/// Reads the daemon's state on each scrape.
#[derive(Debug)]
struct DaemonCollector {
    daemon: Arc<Daemon>,
    /// What keeps the counter families from going back between scrapes.
    totals: Mutex<Totals>,
}

/// The daemon reports what its engines counted; an engine that exits takes
/// its counts with it, and one that starts again in the same process (an
/// `exec`) starts from 0. A Prometheus counter must never go back (a drop
/// reads as a reset, and `rate()` then counts the whole value again), so
/// the collector keeps, per partition, what engines gone since counted.
#[derive(Debug, Default)]
struct Totals {
    parts: HashMap<(u32, u32), Monotonic>,
    /// The highest `full_scans` exported as `node_ksmd_full_scans`.
    full_scans: u64,
}

/// The totals, even if a scrape panicked while holding them (they stay
/// consistent: each update is whole or not done).
fn lock(m: &Mutex<Totals>) -> MutexGuard<'_, Totals> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sums of per-process counts that never go back.
#[derive(Debug, Default)]
struct Monotonic {
    /// Per process, its counts at the last scrape.
    last: HashMap<i32, [u64; 2]>,
    /// What processes gone (or restarted) since had counted.
    gone: [u64; 2],
}

impl Monotonic {
    /// The totals with the processes' counts `now`.
    fn update(&mut self, now: &[(i32, [u64; 2])]) -> [u64; 2] {
        let add = |to: &mut [u64; 2], v: &[u64; 2]| to.iter_mut().zip(v).for_each(|(t, v)| *t += v);
        let mut next = HashMap::with_capacity(now.len());
        for &(pid, v) in now {
            if let Some(old) = self.last.get(&pid) {
                // A count that went back: the engine started again.
                for ((gone, &new), &old) in self.gone.iter_mut().zip(&v).zip(old) {
                    if new < old {
                        *gone += old;
                    }
                }
            }
            next.insert(pid, v);
        }
        for (pid, old) in &self.last {
            if !next.contains_key(pid) {
                add(&mut self.gone, old);
            }
        }
        self.last = next;
        let mut total = self.gone;
        for v in self.last.values() {
            add(&mut total, v);
        }
        total
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family's samples.
struct Family<N> {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    samples: Vec<(Labels, N)>,
}

impl<N> Family<N> {
    fn new(name: &'static str, help: &'static str, unit: Option<Unit>) -> Self {
        Family { name, help, unit, samples: Vec::new() }
    }
    fn push(&mut self, labels: &Labels, v: N) {
        self.samples.push((labels.clone(), v));
    }
}

fn gauges<N: EncodeGaugeValue>(enc: &mut DescriptorEncoder, f: &Family<N>) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(f.name, f.help, f.unit.as_ref(), MetricType::Gauge)?;
    for (labels, v) in &f.samples {
        if labels.is_empty() {
            m.encode_gauge(v)?;
        } else {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
    }
    Ok(())
}

fn counters<N: EncodeCounterValue>(enc: &mut DescriptorEncoder, f: &Family<N>) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(f.name, f.help, f.unit.as_ref(), MetricType::Counter)?;
    for (labels, v) in &f.samples {
        if labels.is_empty() {
            m.encode_counter::<Labels, N, f64>(v, None)?;
        } else {
            m.encode_family(labels)?.encode_counter::<Labels, N, f64>(v, None)?;
        }
    }
    Ok(())
}

fn gauge1<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    v: N,
) -> std::fmt::Result {
    let mut f = Family::new(name, help, unit);
    f.push(&Vec::new(), v);
    gauges(enc, &f)
}

/// CPU seconds of process `pid`'s threads named `samepage-*`, by thread
/// name (`/proc/PID/task/TID/comm` and `stat`); empty if it is gone.
pub fn merger_threads_cpu(pid: i32) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) else { continue };
        let comm = comm.trim_end();
        if comm.starts_with("samepage-") {
            *out.entry(comm.to_string()).or_default() += crate::procfs::stat_cpu_time(&t.path().join("stat"));
        }
    }
    out
}

impl DaemonCollector {
    fn partitions(&self, enc: &mut DescriptorEncoder, parts: &[PartitionStatus], per: &[Counters]) -> std::fmt::Result {
        let mut shared =
            Family::new("samepage_shared", "Stable pages with a mapping (pages_shared)", Some(Unit::Bytes));
        let mut sharing = Family::new(
            "samepage_sharing",
            "Memory saved: mappings of stable pages beyond the first (pages_sharing)",
            Some(Unit::Bytes),
        );
        let mut unshared =
            Family::new("samepage_unshared", "Pages in the unstable tree (pages_unshared)", Some(Unit::Bytes));
        let mut volatile = Family::new(
            "samepage_volatile",
            "Pages that changed since their last visit (pages_volatile)",
            Some(Unit::Bytes),
        );
        let mut zero =
            Family::new("samepage_zero_pages", "Pages merged with the zero page (ksm_zero_pages)", Some(Unit::Bytes));
        let mut profit = Family::new(
            "samepage_profit",
            "Memory saved net of metadata, negative when metadata costs more (general_profit)",
            Some(Unit::Bytes),
        );
        let mut metadata =
            Family::new("samepage_metadata", "Metadata of the daemon and its engines", Some(Unit::Bytes));
        let mut chains = Family::new("samepage_stable_node_chains", "Chains (stable_node_chains)", None);
        let mut dups = Family::new("samepage_stable_node_dups", "Dups hanging off chains (stable_node_dups)", None);
        let mut pool =
            Family::new("samepage_pool", "Memory the partition's pool memfd holds (allocated)", Some(Unit::Bytes));
        let mut slots = Family::new("samepage_pool_slots_in_use", "Pool slots in use", None);
        let mut orphans = Family::new("samepage_pool_orphan_slots", "Pool slots waiting to be freed", None);
        let mut clients = Family::new("samepage_clients", "Engines connected", None);
        let mut requests = Family::new("samepage_requests", "Requests (batches) the partition served", None);
        let mut full_scans = Family::new(
            "samepage_full_scans",
            "Full scans of the partition's busiest engine now (full_scans; goes back when it exits)",
            None,
        );
        let mut scanned =
            Family::new("samepage_pages_scanned", "Pages scanned (pages_scanned), engines gone since included", None);
        let mut cow = Family::new(
            "samepage_cow_faults",
            "Copy-on-write breaks of merged pages, engines gone since included",
            None,
        );
        let mut totals = lock(&self.totals);
        for (p, c) in parts.iter().zip(per) {
            let l: Labels = vec![("uid", p.uid.to_string()), ("domain", p.domain.to_string())];
            shared.push(&l, c.pages_shared * PAGE);
            sharing.push(&l, c.pages_sharing * PAGE);
            unshared.push(&l, c.pages_unshared * PAGE);
            volatile.push(&l, c.pages_volatile * PAGE);
            zero.push(&l, c.ksm_zero_pages * PAGE);
            profit.push(&l, c.general_profit);
            metadata.push(&l, c.metadata_bytes);
            chains.push(&l, c.stable_node_chains);
            dups.push(&l, c.stable_node_dups);
            pool.push(&l, p.pool_bytes);
            slots.push(&l, p.slots_in_use);
            orphans.push(&l, p.orphans);
            clients.push(&l, p.clients.len() as u64);
            requests.push(&l, p.requests);
            full_scans.push(&l, c.full_scans);
            // Only engines that send their own counters count these.
            let now: Vec<(i32, [u64; 2])> = p
                .processes
                .iter()
                .filter_map(|r| r.counters.as_ref().map(|c| (r.pid, [c.pages_scanned, c.cow_faults])))
                .collect();
            let monotonic = totals.parts.entry((p.uid, p.domain)).or_default();
            if !now.is_empty() || !monotonic.last.is_empty() || monotonic.gone != [0, 0] {
                let [s, w] = monotonic.update(&now);
                scanned.push(&l, s);
                cow.push(&l, w);
            }
        }
        drop(totals);
        for f in [&shared, &sharing, &unshared, &volatile, &zero, &metadata, &chains, &dups, &pool, &slots, &orphans] {
            gauges(enc, f)?;
        }
        gauges(enc, &profit)?;
        gauges(enc, &clients)?;
        gauges(enc, &full_scans)?;
        for f in [&requests, &scanned, &cow] {
            counters(enc, f)?;
        }
        Ok(())
    }

    fn processes(&self, enc: &mut DescriptorEncoder, parts: &[PartitionStatus]) -> std::fmt::Result {
        let mut rmap = Family::new("samepage_process_rmap_items", "rmap items of its pages (ksm_rmap_items)", None);
        let mut merging = Family::new(
            "samepage_process_merging",
            "Its pages that map a stable page (ksm_merging_pages)",
            Some(Unit::Bytes),
        );
        let mut zero = Family::new(
            "samepage_process_zero_pages",
            "Its pages merged with the zero page (ksm_zero_pages)",
            Some(Unit::Bytes),
        );
        let mut profit = Family::new(
            "samepage_process_profit",
            "What merging saves it net of its metadata, may be negative (ksm_process_profit)",
            Some(Unit::Bytes),
        );
        let mut mergeable =
            Family::new("samepage_process_mergeable", "Memory it registered as mergeable", Some(Unit::Bytes));
        let mut scans = Family::new("samepage_process_full_scans", "Full scans of its engine (full_scans)", None);
        let mut scanner_cpu = Family::new(
            "samepage_process_scanner_cpu",
            "CPU its engine's scanner reports having spent",
            Some(Unit::Seconds),
        );
        let mut cow = Family::new("samepage_process_cow_faults", "Copy-on-write breaks of its merged pages", None);
        let mut threads = Family::new(
            "samepage_process_cpu",
            "CPU of its threads named samepage-* (/proc/PID/task/*/stat), by thread name",
            Some(Unit::Seconds),
        );
        for p in parts {
            let mut pids: Vec<i32> = p.clients.iter().map(|(_, pid)| *pid).collect();
            pids.sort_unstable();
            pids.dedup();
            for r in &p.processes {
                let l: Labels =
                    vec![("uid", p.uid.to_string()), ("domain", p.domain.to_string()), ("pid", r.pid.to_string())];
                rmap.push(&l, r.ksm_rmap_items);
                merging.push(&l, r.ksm_merging_pages * PAGE);
                zero.push(&l, r.ksm_zero_pages * PAGE);
                profit.push(&l, r.ksm_process_profit);
                mergeable.push(&l, r.ksm_mergeable * PAGE);
                scans.push(&l, r.full_scans);
                scanner_cpu.push(&l, r.cpu_ns as f64 / 1e9);
                if let Some(c) = &r.counters {
                    cow.push(&l, c.cow_faults);
                }
            }
            for pid in pids {
                for (name, cpu) in merger_threads_cpu(pid) {
                    let l: Labels = vec![
                        ("uid", p.uid.to_string()),
                        ("domain", p.domain.to_string()),
                        ("pid", pid.to_string()),
                        ("thread", name),
                    ];
                    threads.push(&l, cpu.as_secs_f64());
                }
            }
        }
        for f in [&rmap, &merging, &zero, &mergeable] {
            gauges(enc, f)?;
        }
        gauges(enc, &profit)?;
        counters(enc, &scans)?;
        counters(enc, &cow)?;
        counters(enc, &scanner_cpu)?;
        counters(enc, &threads)
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let parts = self.daemon.status();
        let t = self.daemon.tunables();
        let per: Vec<Counters> = parts.iter().map(view::partition_counters).collect();
        let sys = view::total(&per);
        self.partitions(&mut enc, &parts, &per)?;
        self.processes(&mut enc, &parts)?;
        let mut me =
            Family::new("samepage_daemon_cpu", "CPU of the daemon process (all its threads)", Some(Unit::Seconds));
        me.push(&Vec::new(), crate::procfs::cpu_time(std::process::id()).as_secs_f64());
        counters(&mut enc, &me)?;
        gauge1(&mut enc, "samepage_run", "run: 0 stop, 1 merge, 2 unmerge", None, t.run.as_u32())?;
        gauge1(&mut enc, "samepage_pages_to_scan", "pages_to_scan (machine-wide)", None, t.pages_to_scan)?;
        let sleep = f64::from(t.sleep_millisecs) / 1000.0;
        gauge1(&mut enc, "samepage_sleep", "sleep_millisecs, in seconds", Some(Unit::Seconds), sleep)?;
        gauge1(&mut enc, "samepage_max_page_sharing", "max_page_sharing", None, t.max_page_sharing)?;
        gauge1(&mut enc, "samepage_use_zero_pages", "use_zero_pages", None, u32::from(t.use_zero_pages))?;

        // node_exporter's ksmd collector, system-wide, in its names and units.
        // A counter there: the highest full_scans any engine reached (it
        // would go back when the busiest engine exits).
        let high = {
            let mut t = lock(&self.totals);
            t.full_scans = t.full_scans.max(sys.full_scans);
            t.full_scans
        };
        let mut f = Family::new("node_ksmd_full_scans", "ksmd 'full_scans' file.", None);
        f.push(&Vec::new(), high);
        counters(&mut enc, &f)?;
        for (name, help, v) in [
            ("node_ksmd_merge_across_nodes", "ksmd 'merge_across_nodes' file.", 1),
            ("node_ksmd_pages_shared", "ksmd 'pages_shared' file.", sys.pages_shared),
            ("node_ksmd_pages_sharing", "ksmd 'pages_sharing' file.", sys.pages_sharing),
            ("node_ksmd_pages_to_scan", "ksmd 'pages_to_scan' file.", u64::from(t.pages_to_scan)),
            ("node_ksmd_pages_unshared", "ksmd 'pages_unshared' file.", sys.pages_unshared),
            ("node_ksmd_pages_volatile", "ksmd 'pages_volatile' file.", sys.pages_volatile),
            ("node_ksmd_run", "ksmd 'run' file.", u64::from(t.run.as_u32())),
        ] {
            gauge1(&mut enc, name, help, None, v)?;
        }
        gauge1(&mut enc, "node_ksmd_sleep", "ksmd 'sleep_millisecs' file.", Some(Unit::Seconds), sleep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback_and_bad_ones_are_named() {
        assert_eq!(parse_addr("9467").unwrap(), "127.0.0.1:9467".parse().unwrap());
        assert_eq!(parse_addr(":9467").unwrap(), "127.0.0.1:9467".parse().unwrap());
        assert_eq!(parse_addr("0.0.0.0:80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(parse_addr("[::1]:9467").unwrap(), "[::1]:9467".parse().unwrap());
        let e = parse_addr("70000").unwrap_err().to_string();
        assert!(e.contains("\"70000\"") && e.contains("0 to 65535"), "{e}");
        assert!(parse_addr("nohost:").is_err());
    }

    #[test]
    fn counts_of_engines_gone_or_restarted_stay_in_the_totals() {
        let mut m = Monotonic::default();
        assert_eq!(m.update(&[(1, [10, 1]), (2, [5, 0])]), [15, 1]);
        assert_eq!(m.update(&[(1, [12, 1]), (2, [7, 2])]), [19, 3]);
        // Process 2 exits: its counts stay.
        assert_eq!(m.update(&[(1, [13, 1])]), [20, 3]);
        // Process 1 execs: its engine starts from 0.
        assert_eq!(m.update(&[(1, [2, 0])]), [22, 3]);
        assert_eq!(m.update(&[(1, [4, 1]), (3, [1, 0])]), [25, 4]);
        assert_eq!(m.update(&[]), [25, 4]);
    }

    #[test]
    fn classic_text_names_counter_families_as_their_samples() {
        let open = "# HELP a_seconds CPU\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\na_seconds_total{pid=\"1\"} 2.5\n# HELP b Gauge\n# TYPE b gauge\nb 1\n# EOF\n";
        assert_eq!(
            classic(open),
            "# HELP a_seconds_total CPU\n# TYPE a_seconds_total counter\na_seconds_total{pid=\"1\"} 2.5\n# HELP b Gauge\n# TYPE b gauge\nb 1\n"
        );
    }

    #[test]
    fn merger_threads_are_found_by_name() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        // std names the thread before it runs the closure: once it runs,
        // /proc shows the name.
        let t = std::thread::Builder::new()
            .name("samepage-test".into())
            .spawn(move || {
                let _ = started_tx.send(());
                let _ = rx.recv();
            })
            .unwrap();
        started.recv().unwrap();
        let found = merger_threads_cpu(std::process::id() as i32);
        drop(tx);
        t.join().unwrap();
        assert!(found.contains_key("samepage-test"), "{found:?}");
        assert!(merger_threads_cpu(-1).is_empty());
    }
}
