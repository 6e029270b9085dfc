//! The daemon's figures where monitoring tools look for them:
//! `samepage daemon --metrics` checked by `promtool check metrics` and
//! scraped by a real Prometheus server, whose answers must equal what
//! `samepage status --json` reports. Tests that need a Debian package
//! (`prometheus`) skip with a message when it is absent (`.ci/run`
//! installs it).

mod common;
use common::{merged_client, my_uid, spawn_daemon, spawn_quiet, status_json as status, wait_for, Killed};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("samepage-surfaces-{name}-{}", std::process::id()))
}

/// An HTTP GET on 127.0.0.1:`port`: the status code and the body.
fn get(port: u16, path: &str, accept: &str) -> (u32, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the one sample the instant query `q` gives, once it
/// gives one.
fn prometheus_query(port: u16, q: &str) -> f64 {
    wait_for(&format!("Prometheus never had {q}"), || {
        let (code, body) = get(port, &format!("/api/v1/query?query={}", url_encode(q)), "application/json");
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?;
        assert!(r.len() <= 1, "{q}: {v}");
        r.first()?["value"][1].as_str()?.parse().ok()
    })
}

/// The daemon's metrics: `promtool check metrics` finds nothing wrong;
/// OpenMetrics for those who ask; a real Prometheus server scrapes them
/// and its query API answers what `samepage status --json` reports.
#[test]
fn metrics_pass_promtool_and_prometheus_reads_the_status_figures() {
    if !have("promtool") || !have("prometheus") {
        eprintln!(
            "skipped: promtool and prometheus are not installed (Debian package prometheus; .ci/run installs it)"
        );
        return;
    }
    let socket = temp("metrics.sock");
    let port = free_port();
    let _daemon =
        spawn_daemon(&socket, &["--metrics", &port.to_string(), "--pages-to-scan", "1000", "--sleep-ms", "5"]);
    let (_engine, _region) = merged_client(&socket);
    let v = status(&socket);
    let part = &v["partitions"][0];
    let me = &part["processes"][0];
    assert_eq!(me["pid"], std::process::id());

    let (code, classic) = get(port, "/metrics", "*/*");
    assert_eq!(code, 200);
    let pid = std::process::id();
    let uid = my_uid();
    let merging = format!("samepage_process_merging_bytes{{uid=\"{uid}\",domain=\"3\",pid=\"{pid}\"}} {}", 64 * 4096);
    assert!(classic.contains(&merging), "{merging} not in\n{classic}");
    assert!(classic.contains("\nnode_ksmd_pages_sharing 60\n"), "{classic}");
    assert!(classic.contains("# TYPE node_ksmd_full_scans_total counter"), "{classic}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(classic.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, open) = get(port, "/metrics", "application/openmetrics-text;version=1.0.0");
    assert!(open.ends_with("# EOF\n") && open.contains("# UNIT samepage_sharing_bytes bytes"), "{open}");
    assert_eq!(get(port, "/nothing", "*/*").0, 404);

    // A real Prometheus server, scraping every second.
    let dir = temp("prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: samepage\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let prometheus = spawn_quiet(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}")),
    );
    wait_for("Prometheus never answered", || TcpStream::connect(("127.0.0.1", web)).ok());
    let sharing = prometheus_query(web, "node_ksmd_pages_sharing");
    assert_eq!(sharing, part["pages_sharing"].as_f64().unwrap(), "pages_sharing as status --json reports it");
    let shared = prometheus_query(web, "sum(samepage_shared_bytes)");
    assert_eq!(shared, part["pages_shared"].as_f64().unwrap() * 4096.0);
    let mine = prometheus_query(web, &format!("samepage_process_merging_bytes{{pid=\"{pid}\"}}"));
    assert_eq!(mine, me["ksm_merging_pages"].as_f64().unwrap() * 4096.0);
    let rmap = prometheus_query(web, &format!("samepage_process_rmap_items{{pid=\"{pid}\"}}"));
    assert_eq!(rmap, me["ksm_rmap_items"].as_f64().unwrap());
    // The scanner thread of this process, by its name.
    let threads = prometheus_query(
        web,
        &format!("count(samepage_process_cpu_seconds_total{{pid=\"{pid}\",thread=\"samepage-ksmd\"}})"),
    );
    assert_eq!(threads, 1.0);
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&socket);
}

/// `samepage sysfs DIR/kernel/mm/ksm`, unmounted when dropped.
struct Mounted {
    child: Killed,
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        // auto_unmount has unmounted it; in case it has not, lazily.
        let _ = Command::new("fusermount3").arg("-uzq").arg(&self.dir).stderr(Stdio::null()).status();
    }
}

/// `bash -c SCRIPT`: whether it succeeded, and its stderr.
fn bash(script: &str) -> (bool, String) {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The files and modes of a directory, sorted.
fn listing(dir: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut v: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().permissions().mode() & 0o7777))
        .collect();
    v.sort();
    v
}

/// `samepage sysfs`: the kernel's files with the kernel's names, modes and
/// formats, values equal to what `samepage status --json` reports; shell
/// writes as ksmtuned makes them change the daemon's tunables or fail with
/// the kernel's errno; bind-mounted over /sys/kernel/mm/ksm in a private
/// mount namespace, `cat` reads samepage's numbers there; node_exporter's
/// ksmd collector reports them from `--path.sysfs`.
#[test]
fn sysfs_shows_the_daemon_as_the_kernels_files() {
    let root = rustix::process::geteuid().is_root();
    if !root || !Path::new("/dev/fuse").exists() || !have("fusermount3") {
        eprintln!("skipped: needs root, /dev/fuse and fusermount3 (Debian package fuse3; .ci/run installs it)");
        return;
    }
    let socket = temp("sysfs.sock");
    let _daemon = spawn_daemon(&socket, &["--pages-to-scan", "1000", "--sleep-ms", "5"]);
    let (_engine, _region) = merged_client(&socket);
    let sys = temp("sys");
    let ksm = sys.join("kernel/mm/ksm");
    let _ = Command::new("fusermount3").arg("-uzq").arg(&ksm).stderr(Stdio::null()).status();
    std::fs::create_dir_all(&ksm).unwrap();
    let mounted = Mounted {
        child: Killed(
            Command::new(env!("CARGO_BIN_EXE_samepage"))
                .args(["sysfs", "--socket"])
                .arg(&socket)
                .arg(&ksm)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ),
        dir: ksm.clone(),
    };
    let read = |name: &str| std::fs::read_to_string(ksm.join(name));
    wait_for("samepage sysfs never mounted", || read("run").ok());

    // The kernel's file set and modes, where this kernel has KSM.
    let files = listing(&ksm);
    assert!(files.contains(&("ksm_stat".to_string(), 0o755)), "{files:?}");
    let ours: Vec<(String, u32)> = files.into_iter().filter(|(n, _)| n != "ksm_stat").collect();
    assert_eq!(ours.len(), 24, "{ours:?}");
    if Path::new("/sys/kernel/mm/ksm/run").exists() {
        assert_eq!(ours, listing(Path::new("/sys/kernel/mm/ksm")), "the kernel's names and modes");
    }

    // Values as the daemon reports them.
    let v = status(&socket);
    let part = &v["partitions"][0];
    assert_eq!(read("pages_sharing").unwrap(), format!("{}\n", part["pages_sharing"]));
    assert_eq!(read("pages_shared").unwrap(), format!("{}\n", part["pages_shared"]));
    assert_eq!(read("advisor_mode").unwrap(), "[none] scan-time\n");
    assert_eq!(read("run").unwrap(), "1\n");
    let me = &part["processes"][0];
    let stat = read(&format!("ksm_stat/{}", std::process::id())).unwrap();
    let want = format!(
        "ksm_rmap_items {}\nksm_zero_pages {}\nksm_merging_pages {}\nksm_process_profit {}\nksm_merge_any: no\nksm_mergeable: yes\n",
        me["ksm_rmap_items"], me["ksm_zero_pages"], me["ksm_merging_pages"], me["ksm_process_profit"]
    );
    assert_eq!(stat, want);
    assert_eq!(me["ksm_merging_pages"], 64);

    // ksmtuned-style writes.
    let d = ksm.display();
    let (ok, err) = bash(&format!("echo 1250 > {d}/pages_to_scan"));
    assert!(ok, "{err}");
    assert_eq!(status(&socket)["tunables"]["pages_to_scan"], "1250");
    assert_eq!(read("pages_to_scan").unwrap(), "1250\n");
    let (ok, err) = bash(&format!("echo 1 > {d}/max_page_sharing"));
    assert!(!ok && err.contains("Invalid argument"), "{err}");
    let (ok, err) = bash(&format!("echo 64 > {d}/max_page_sharing"));
    assert!(!ok && err.contains("Device or resource busy"), "EBUSY while pages are shared: {err}");
    let (ok, err) = bash(&format!("echo 3 > {d}/run"));
    assert!(!ok && err.contains("Invalid argument"), "{err}");
    let (ok, err) = bash(&format!("echo 7 > {d}/pages_shared"));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert_eq!(status(&socket)["tunables"]["max_page_sharing"], "256");

    // Bind-mounted over the kernel's directory in a private mount namespace.
    if have("unshare") && Path::new("/sys/kernel/mm/ksm").is_dir() {
        let out = Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind {d} /sys/kernel/mm/ksm && cat /sys/kernel/mm/ksm/pages_sharing /sys/kernel/mm/ksm/pages_to_scan"
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n1250\n", part["pages_sharing"]));
    } else {
        eprintln!("the bind mount part skipped: no unshare or no /sys/kernel/mm/ksm");
    }

    // node_exporter's ksmd collector on --path.sysfs.
    let exporter = ["prometheus-node-exporter", "node_exporter"].into_iter().find(|t| have(t));
    if let Some(exporter) = exporter {
        let port = free_port();
        let _ne = spawn_quiet(
            Command::new(exporter)
                .arg(format!("--path.sysfs={}", sys.display()))
                .args(["--collector.disable-defaults", "--collector.ksmd"])
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
        );
        wait_for("node_exporter never answered", || TcpStream::connect(("127.0.0.1", port)).ok());
        let (code, body) = get(port, "/metrics", "text/plain");
        assert_eq!(code, 200);
        let sample = |name: &str| {
            body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok()).unwrap()
        };
        assert_eq!(sample("node_ksmd_pages_sharing"), part["pages_sharing"].as_f64().unwrap(), "{body}");
        assert_eq!(sample("node_ksmd_pages_to_scan"), 1250.0);
        assert_eq!(sample("node_ksmd_run"), 1.0);
    } else {
        eprintln!("the node_exporter part skipped: prometheus-node-exporter is not installed (.ci/run installs it)");
    }
    drop(mounted);
    let _ = std::fs::remove_dir_all(&sys);
    let _ = std::fs::remove_file(&socket);
}
