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
use samepage_daemon::protocol::{PartitionStatus, ProcessStatus};
use samepage_daemon::server::Daemon;
use samepage_daemon::view;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
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
    registry.register_collector(Box::new(DaemonCollector { daemon }));
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

fn counter1<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    v: N,
) -> std::fmt::Result {
    let mut f = Family::new(name, help, unit);
    f.push(&Vec::new(), v);
    counters(enc, &f)
}

/// A whole-number figure of something (a partition, a process): metric
/// name, help, unit, and `F`, how to read it.
type Figure<F> = (&'static str, &'static str, Option<Unit>, F);

/// A partition's figure, from its status and its counters
/// ([`view::partition_counters`]).
type PartRead = fn(&PartitionStatus, &Counters) -> u64;

/// A process's figure, from its report.
type ProcessRead = fn(&ProcessStatus) -> u64;

/// One family per figure, a sample per item (with its labels), each
/// figure read from an item by `read`.
fn families<F: Copy, T>(figures: &[Figure<F>], items: &[(Labels, T)], read: impl Fn(F, &T) -> u64) -> Vec<Family<u64>> {
    figures
        .iter()
        .map(|(name, help, unit, figure)| {
            let mut f = Family::new(name, help, unit.clone());
            for (l, item) in items {
                f.push(l, read(*figure, item));
            }
            f
        })
        .collect()
}

/// The partitions' gauges, in bytes where the kernel counts pages.
const PARTITION_GAUGES: [Figure<PartRead>; 12] = [
    ("samepage_shared", "Stable pages with a mapping (pages_shared)", Some(Unit::Bytes), |_, c| c.pages_shared * PAGE),
    (
        "samepage_sharing",
        "Memory saved: mappings of stable pages beyond the first (pages_sharing)",
        Some(Unit::Bytes),
        |_, c| c.pages_sharing * PAGE,
    ),
    ("samepage_unshared", "Pages in the unstable tree (pages_unshared)", Some(Unit::Bytes), |_, c| {
        c.pages_unshared * PAGE
    }),
    ("samepage_volatile", "Pages that changed since their last visit (pages_volatile)", Some(Unit::Bytes), |_, c| {
        c.pages_volatile * PAGE
    }),
    ("samepage_zero_pages", "Pages merged with the zero page (ksm_zero_pages)", Some(Unit::Bytes), |_, c| {
        c.ksm_zero_pages * PAGE
    }),
    ("samepage_metadata", "Metadata of the daemon and its engines", Some(Unit::Bytes), |_, c| c.metadata_bytes),
    ("samepage_stable_node_chains", "Chains (stable_node_chains)", None, |_, c| c.stable_node_chains),
    ("samepage_stable_node_dups", "Dups hanging off chains (stable_node_dups)", None, |_, c| c.stable_node_dups),
    ("samepage_pool", "Memory the partition's pool memfd holds (allocated)", Some(Unit::Bytes), |p, _| p.pool_bytes),
    ("samepage_pool_slots_in_use", "Pool slots in use", None, |p, _| p.slots_in_use),
    ("samepage_pool_orphan_slots", "Pool slots waiting to be freed", None, |p, _| p.orphans),
    ("samepage_clients", "Engines connected", None, |p, _| p.clients.len() as u64),
];

/// The partitions' counters: they never go back (those of engines that
/// left stay in, [`PartitionStatus::gone`]).
const PARTITION_COUNTERS: [Figure<PartRead>; 4] = [
    ("samepage_requests", "Requests (batches) the partition served", None, |p, _| p.requests),
    (
        "samepage_full_scans",
        "Full scans: the most any of the partition's engines has done (full_scans)",
        None,
        |_, c| c.full_scans,
    ),
    ("samepage_pages_scanned", "Pages scanned (pages_scanned)", None, |_, c| c.pages_scanned),
    ("samepage_cow_faults", "Copy-on-write breaks of merged pages", None, |_, c| c.cow_faults),
];

/// A process's gauges, from its report.
const PROCESS_GAUGES: [Figure<ProcessRead>; 5] = [
    ("samepage_process_rmap_items", "rmap items of its pages (ksm_rmap_items)", None, |r| r.ksm_rmap_items),
    ("samepage_process_merging", "Its pages that map a stable page (ksm_merging_pages)", Some(Unit::Bytes), |r| {
        r.ksm_merging_pages * PAGE
    }),
    ("samepage_process_zero_pages", "Its pages merged with the zero page (ksm_zero_pages)", Some(Unit::Bytes), |r| {
        r.ksm_zero_pages * PAGE
    }),
    ("samepage_process_mergeable", "Memory it registered as mergeable", Some(Unit::Bytes), |r| r.ksm_mergeable * PAGE),
    (
        "samepage_process_engine_memory",
        "Memory its samepage engines take in it (the preload library's heap pages resident, as RSS counts them; else their metadata)",
        Some(Unit::Bytes),
        |r| r.memory_bytes,
    ),
];

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
        let items: Vec<(Labels, (&PartitionStatus, &Counters))> = parts
            .iter()
            .zip(per)
            .map(|(p, c)| (vec![("uid", p.uid.to_string()), ("domain", p.domain.to_string())], (p, c)))
            .collect();
        let read = |f: PartRead, &(p, c): &(&PartitionStatus, &Counters)| f(p, c);
        for f in families(&PARTITION_GAUGES, &items, read) {
            gauges(enc, &f)?;
        }
        let mut profit = Family::new(
            "samepage_profit",
            "Memory saved net of metadata, negative when metadata costs more (general_profit)",
            Some(Unit::Bytes),
        );
        for (l, (_, c)) in &items {
            profit.push(l, c.general_profit);
        }
        gauges(enc, &profit)?;
        for f in families(&PARTITION_COUNTERS, &items, read) {
            counters(enc, &f)?;
        }
        Ok(())
    }

    fn processes(&self, enc: &mut DescriptorEncoder, parts: &[PartitionStatus]) -> std::fmt::Result {
        let items: Vec<(Labels, &ProcessStatus)> = parts
            .iter()
            .flat_map(|p| {
                p.processes.iter().map(|r| {
                    (vec![("uid", p.uid.to_string()), ("domain", p.domain.to_string()), ("pid", r.pid.to_string())], r)
                })
            })
            .collect();
        for f in families(&PROCESS_GAUGES, &items, |f: ProcessRead, r| f(r)) {
            gauges(enc, &f)?;
        }
        let mut profit = Family::new(
            "samepage_process_profit",
            "What merging saves it net of its metadata, may be negative (ksm_process_profit)",
            Some(Unit::Bytes),
        );
        let mut scans = Family::new("samepage_process_full_scans", "Full scans of its engine (full_scans)", None);
        let mut scanner_cpu = Family::new(
            "samepage_process_scanner_cpu",
            "CPU its engine's scanner reports having spent",
            Some(Unit::Seconds),
        );
        let mut cow = Family::new("samepage_process_cow_faults", "Copy-on-write breaks of its merged pages", None);
        for (l, r) in &items {
            profit.push(l, r.ksm_process_profit);
            scans.push(l, r.full_scans);
            scanner_cpu.push(l, r.cpu_ns as f64 / 1e9);
            if let Some(c) = &r.counters {
                cow.push(l, c.cow_faults);
            }
        }
        // Each process's threads once, under its first partition (a process
        // may run engines in several).
        let mut threads = Family::new(
            "samepage_process_cpu",
            "CPU of its threads named samepage-* (/proc/PID/task/*/stat), by thread name",
            Some(Unit::Seconds),
        );
        let mut seen = std::collections::HashSet::new();
        for p in parts {
            for &(_, pid) in &p.clients {
                if !seen.insert(pid) {
                    continue;
                }
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
        let sys = Counters::sum(&per);
        self.partitions(&mut enc, &parts, &per)?;
        self.processes(&mut enc, &parts)?;
        let cpu = crate::procfs::cpu_time(std::process::id()).as_secs_f64();
        counter1(
            &mut enc,
            "samepage_daemon_cpu",
            "CPU of the daemon process (all its threads)",
            Some(Unit::Seconds),
            cpu,
        )?;
        gauge1(&mut enc, "samepage_run", "run: 0 stop, 1 merge, 2 unmerge", None, t.run.as_u32())?;
        gauge1(&mut enc, "samepage_pages_to_scan", "pages_to_scan (machine-wide)", None, t.pages_to_scan)?;
        let sleep = f64::from(t.sleep_millisecs) / 1000.0;
        gauge1(&mut enc, "samepage_sleep", "sleep_millisecs, in seconds", Some(Unit::Seconds), sleep)?;
        gauge1(&mut enc, "samepage_max_page_sharing", "max_page_sharing", None, t.max_page_sharing)?;
        gauge1(&mut enc, "samepage_use_zero_pages", "use_zero_pages", None, u32::from(t.use_zero_pages))?;

        // node_exporter's ksmd collector, system-wide, in its names and units.
        counter1(&mut enc, "node_ksmd_full_scans", "ksmd 'full_scans' file.", None, sys.full_scans)?;
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
