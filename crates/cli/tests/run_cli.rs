//! `samepage run -- CMD`: a C program that knows nothing of samepage
//! (`crates/preload/tests/mergeable.c`, KSM-selftest style: it marks memory
//! with `madvise(MADV_MERGEABLE)`, waits until its pages map the samepage
//! pool, then writes, discards, unmaps, protects, unmerges and forks,
//! checking every byte) merges under it, inside itself and through a
//! daemon. `--merge-any` and `--supervise`: prefork Python workers
//! (`scripts/workers/workers.py`) merge with every byte checked, and
//! `prctl(PR_SET_MEMORY_MERGE)` behaves as the kernel's.

mod common;
use common::{ksm_set, Ksmd, OutputWithin, KSM};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a program under `samepage run` may take: every one here ends in
/// seconds, so past this it hangs.
const LIMIT: Duration = Duration::from_secs(180);

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
            .output_within(LIMIT),
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
    assert_ok(samepage().args(["run", "--socket"]).arg(&socket).arg("--").arg(&exe).output_within(LIMIT));
    let status = samepage_daemon::client::Connection::status(&socket).unwrap();
    assert!(status.iter().any(|p| p.requests > 0), "the program never asked the daemon: {status:?}");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&exe);
}

/// `scripts/matrix/behaviours.c`, compiled into a directory of its own for
/// test `name`: (the directory, the program).
fn build_behaviours(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("samepage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("behaviours");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/matrix/behaviours.c");
    let cc = Command::new("cc").args(["-O2", "-pthread", "-o"]).arg(&exe).arg(&src).output().unwrap();
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    (dir, exe)
}

fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Python, with the prefork comparison's turn held while the test runs:
/// Python's code pages shared with the comparison's workers would lower
/// their Pss (see `behaviour_matrix_under_merge_any_is_byte_exact`). `None`
/// (the test skipped, said on stderr) without python3.
fn python_in_turn() -> Option<(std::sync::MutexGuard<'static, ()>, PathBuf)> {
    let turn = common::ksmd_turn();
    let Some(py) = python() else {
        eprintln!("skipped: no python3");
        return None;
    };
    Some((turn, py))
}

/// Prefork Python workers under `--merge-any` and a daemon, beside the
/// kernel's ksmd with `prctl(PR_SET_MEMORY_MERGE)` on the same workers
/// (`scripts/workers/compare.py`): nothing marks memory, glibc and Python
/// map and unmap it behind any interposed symbol (under the seccomp
/// supervisor), forks copy it; the models stay byte-exact, samepage frees
/// memory net of its daemon and with its pool counted in full, and
/// `samepage estimate` (read before anything merged, counting frames) is
/// within 2% of what ksmd then freed. How much samepage frees against ksmd
/// is reported, not asserted: measured 43% on these 2 x 8 MiB workers (its
/// engines' and daemon's own memory weigh on small processes) and 79% on
/// 3 x 16 MiB (README).
#[test]
fn prefork_python_workers_merge_across_processes_and_the_estimate_matches_ksmd() {
    let Some((_ksmd, py)) = python_in_turn() else { return };
    if !Path::new("/sys/kernel/mm/ksm/run").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root and the kernel's KSM");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/workers/compare.py");
    let out = Command::new(py)
        .arg(script)
        .args(["--workers", "2", "--mib", "8", "--seconds", "40", "--samepage", env!("CARGO_BIN_EXE_samepage")])
        .output_within(Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = stdout.lines().rfind(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{stdout}"));
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    for side in ["baseline", "ksmd", "samepage"] {
        assert_eq!(r[side]["ok"], true, "every worker's model byte-exact under {side}: {stdout}");
        assert!(r[side]["rounds"].as_array().unwrap().iter().all(|n| n.as_u64().unwrap() >= 2), "{stdout}");
    }
    // Each 8 MiB model is the same in both workers, and half of it repeats
    // 97 pages: ksmd frees most of one model and more.
    let ksmd = r["saved_mib_ksmd"].as_f64().unwrap();
    assert!(ksmd > 8.0, "{stdout}");
    assert!(r["saved_mib_samepage"].as_f64().unwrap() > 0.0, "samepage frees memory, net: {stdout}");
    let estimate = r["estimate_saved_mib"].as_f64().unwrap();
    assert!((estimate - ksmd).abs() <= 0.02 * estimate, "the estimate within 2% of what ksmd freed: {stdout}");
    // samepage's merging (its net saving plus its own memory: daemon,
    // supervisor, engines) frees what the estimate says, as ksmd's does;
    // 8% here: the workers' heaps are small enough for the pages volatile
    // at the moment the memory holds still (about 250, 1 MiB: each worker
    // breaks and restores a page every 0.2 s, and Python's own heap churns)
    // to show. Measured -1.6% to -2.8% alone, -5.2% and -5.3% beside this
    // binary's other tests on 2 cores.
    let merged = r["merging_freed_mib_samepage"].as_f64().unwrap();
    assert!((estimate - merged).abs() <= 0.08 * estimate, "samepage's merging within 8% of the estimate: {stdout}");
}

/// `prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE)` as in 6.18: set, read
/// back, inherited by a forked child and an exec'd program, 0 turns it off;
/// bad arguments fail with EINVAL; without the supervisor it is refused
/// with EINVAL.
#[test]
fn prctl_memory_merge_behaves_as_the_kernels() {
    let Some((_turn, py)) = python_in_turn() else { return };
    let code = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
U = ctypes.c_ulong
def prctl(o, a=0, b=0): 
    r = libc.prctl(o, U(a), U(b), U(0), U(0))
    return r if r >= 0 else -ctypes.get_errno()
out = [prctl(68), prctl(67, 1), prctl(68), prctl(67, 1, 1), prctl(68, 1)]
pid = os.fork()
if pid == 0:
    os._exit(10 + prctl(68))
_, st = os.waitpid(pid, 0)
out.append(os.WEXITSTATUS(st) - 10)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.dup2(w, 1)
    os.execv(sys.executable, [sys.executable, "-c",
        "import ctypes; l = ctypes.CDLL(None); print(l.prctl(68, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))"])
os.close(w)
os.waitpid(pid, 0)
out.append(int(os.read(r, 100)))
out += [prctl(67, 0), prctl(68)]
print(" ".join(map(str, out)))
"#;
    let out = samepage().args(["run", "--supervise", "--own", "--"]).arg(&py).args(["-c", code]).output_within(LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // get 0, set ok, get 1, bad arg EINVAL, bad get EINVAL, child 1, exec'd 1, off ok, get 0
    assert_eq!(stdout.trim(), "0 0 1 -22 -22 1 1 0 0");
    let out = samepage().args(["run", "--own", "--"]).arg(&py).args(["-c", code]).output_within(LIMIT);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 -22 0"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Forks while merging starts (`scripts/matrix/py_forks.py`): a Python
/// program turns `PR_SET_MEMORY_MERGE` on and off again and again and forks
/// children at once each time, while a thread breaks and restores pages;
/// each child checks every byte. A fork then meets the engine's scanner,
/// sweeper and breaker at work: with the fork guard taken before the
/// preload's operations lock, the program hung within seconds (a fork
/// waiting for a sweep, the sweep for the scanner, the scanner for the
/// fork). It must end, with every byte as written.
#[test]
fn forks_while_merging_starts_end_and_keep_every_byte() {
    let Some((_turn, py)) = python_in_turn() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/matrix/py_forks.py");
    let out = samepage()
        .args(["run", "--supervise", "--own", "--pages-to-scan", "10000", "--sleep-ms", "10", "--"])
        .arg(&py)
        .arg(&script)
        .arg("3")
        .output_within(Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok py-forks\n", "{stderr}");
    assert!(!stderr.contains(" forks 0,"), "{stderr}");
}

/// Prefork workers that fork in turn, merged across processes through a
/// daemon (`scripts/matrix/prefork_forks.py`): the master's thread arena's
/// heap header is identical in every worker, so it merges; `fork()` then
/// locks the arena's mutex in it after the preload's prepare handler took
/// its locks, and the copy-on-write breaker, which maps and allocates under
/// those locks, could never serve that write. Every run hung before the
/// sweep left arena header pages out. It must end, every byte as written.
#[test]
fn prefork_workers_that_fork_end_and_keep_every_byte() {
    let Some((_turn, py)) = python_in_turn() else { return };
    let socket = std::env::temp_dir().join(format!("samepage-prefork-forks-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let _daemon = common::spawn_daemon(&socket, &["--pages-to-scan", "10000", "--sleep-ms", "10"]);
    common::wait_for("the daemon never listened", || samepage_daemon::client::Connection::status(&socket).ok());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/matrix/prefork_forks.py");
    let out = samepage()
        .args(["run", "--merge-any", "--socket"])
        .arg(&socket)
        .arg("--")
        .arg(&py)
        .arg(&script)
        .args(["6", "3"])
        .output_within(Duration::from_secs(90));
    let _ = std::fs::remove_file(&socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok prefork-forks\n");
}

/// A fork while another thread trims its malloc heap (`behaviours
/// fork-trim`, under `samepage run --supervise`, merging only what the
/// program marks): the trimming thread holds its arena's lock while its
/// hidden `madvise(MADV_DONTNEED)` waits for the preload library's agent,
/// and `fork()` waits for that lock after the library's prepare handler took
/// its locks. While a fork holds them, the agent answers calls on memory
/// where nothing is registered from a lock-free copy of the registrations
/// (`snapshot` in the preload library). Every run hung once the prepare
/// handler held the registered ranges (an intermediate step of this fix)
/// and before the agent stopped blocking. It must end, every byte as
/// written. (Under `--merge-any`, where the heap is registered, the
/// behaviour matrix runs the same program.)
#[test]
fn a_fork_while_a_thread_trims_its_heap_ends() {
    let (dir, exe) = build_behaviours("fork-trim");
    let out = samepage()
        .args(["run", "--supervise", "--own", "--"])
        .arg(&exe)
        .args(["fork-trim", "200"])
        .output_within(Duration::from_secs(90));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok fork-trim 200\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The behaviour matrix: programs that do what real programs do, under
/// `samepage run --merge-any` (every private anonymous mapping merges):
/// malloc-heavy multithreaded C and Python, a fork/exec chain, the program's
/// own userfaultfd, the program's own seccomp filter, merged pages discarded
/// with `MADV_DONTNEED` and `MADV_DONTNEED_LOCKED` (zeros after), forks from
/// the first moment (while the engine is being made). Each checks every byte
/// of its memory itself, and prints a digest that must equal the digest of
/// the same program run without samepage; where it fills duplicate pages,
/// it tells how much its Pss fell, which must show the merging happened.
#[test]
fn behaviour_matrix_under_merge_any_is_byte_exact() {
    // Not beside the tests that measure savings (the prefork comparison,
    // ksmd's): on 2 cores their load and the matrix's slowed each other's
    // merging (mt-malloc freed nothing in its 3 s in one CI run), and a
    // Python program running beside the comparison's baseline shares
    // Python's code pages with its workers, lowering their Pss (the
    // baseline measured 44.0 MiB instead of 45.7, so ksmd's saving read
    // -9.9% of the estimate though it reached the estimate's pages_sharing).
    let _turn = common::ksmd_turn();
    let (dir, exe) = build_behaviours("matrix");
    let py = python();
    let py_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/matrix/py_threads.py");
    // (program and arguments, KiB its Pss must fall by at least)
    let mut cases: Vec<(Vec<std::ffi::OsString>, i64)> = vec![
        (vec![exe.clone().into(), "mt-malloc".into(), "3".into()], 256),
        (vec![exe.clone().into(), "fork-exec".into(), "2".into()], 2048),
        (vec![exe.clone().into(), "uffd".into()], 1024),
        (vec![exe.clone().into(), "seccomp".into()], 1024),
        (vec![exe.clone().into(), "discard".into(), "4096".into()], 2048),
        // Forks while the library makes its engine: a lock of the library
        // held across a fork by another thread (making the engine, reading
        // the registered ranges) hung every child here before `before_fork`
        // took them all.
        (vec![exe.clone().into(), "fork-at-start".into(), "100".into()], 0),
        // Forks while a thread trims its heap, which merge-any registers:
        // the agent refuses the trims a fork holds up (they hung every run).
        (vec![exe.clone().into(), "fork-trim".into(), "200".into()], 0),
        // The same on the main heap, trimmed with `brk` (refused, the
        // break comes back unchanged).
        (vec![exe.clone().into(), "fork-brk".into(), "200".into()], 0),
    ];
    if let Some(py) = &py {
        cases.push((vec![py.clone().into(), py_script.into(), "2".into()], 0));
    }
    for (argv, min_freed) in cases {
        let what = format!("{argv:?}");
        let plain = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        assert!(plain.status.success(), "{what} without samepage: {plain:?}");
        let under = samepage()
            .args(["run", "--merge-any", "--own", "--pages-to-scan", "10000", "--sleep-ms", "10", "--"])
            .args(&argv)
            .output_within(LIMIT);
        let stderr = String::from_utf8_lossy(&under.stderr);
        assert!(under.status.success(), "{what} under samepage: {stderr}");
        let out = String::from_utf8_lossy(&under.stdout);
        assert!(out.starts_with("ok "), "{what}: {out}");
        assert_eq!(out, String::from_utf8_lossy(&plain.stdout), "{what}: the same bytes with and without samepage");
        let freed: Vec<i64> =
            stderr.lines().filter_map(|l| l.strip_prefix("freed_kib ")?.trim().parse().ok()).collect();
        if min_freed > 0 {
            assert!(freed.first().is_some_and(|&f| f >= min_freed), "{what}: merging freed {freed:?} KiB\n{stderr}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The matrix's `madvise` program (the kernel's KSM selftests' manner: it
/// marks 8192 pages of 64 contents `MADV_MERGEABLE` itself, checks every
/// byte after merging, after copy-on-write writes and after
/// `MADV_UNMERGEABLE`) under the machine's ksmd and under `samepage run`,
/// same tunables: the same output, and samepage frees at least 90% of what
/// ksmd frees (Pss, as the program reads it).
#[test]
fn a_c_program_calling_madvise_merges_as_much_as_under_ksmd() {
    if !Path::new(KSM).join("run").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root and the kernel's KSM");
        return;
    }
    let (dir, exe) = build_behaviours("madvise");
    let freed = |out: &std::process::Output| -> i64 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        stderr
            .lines()
            .find_map(|l| l.strip_prefix("freed_kib ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{stderr}"))
    };
    let kernel = {
        let _ksmd = Ksmd::take();
        ksm_set("pages_to_scan", "10000");
        ksm_set("sleep_millisecs", "10");
        ksm_set("run", "1");
        Command::new(&exe).args(["madvise", "8192"]).output().unwrap()
    };
    let ours = samepage()
        .args(["run", "--own", "--pages-to-scan", "10000", "--sleep-ms", "10", "--"])
        .arg(&exe)
        .args(["madvise", "8192"])
        .output_within(LIMIT);
    let (k, s) = (freed(&kernel), freed(&ours));
    assert!(String::from_utf8_lossy(&kernel.stdout).starts_with("ok madvise "), "{kernel:?}");
    assert_eq!(ours.stdout, kernel.stdout, "the same bytes under ksmd and samepage");
    // 8192 pages of 64 contents: ksmd frees nearly 32 MiB.
    assert!(k > 24 * 1024, "ksmd freed {k} KiB");
    assert!(s * 10 >= k * 9, "samepage freed {s} KiB, ksmd {k} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A statically linked program never reads `LD_PRELOAD`: `samepage run`
/// says so at start (and runs it all the same); a dynamic one gets no
/// such word.
#[test]
fn a_static_program_is_named_at_start() {
    let busybox = Path::new("/bin/busybox");
    // ldd (glibc's) fails on a program without a dynamic loader.
    let is_static = |p: &Path| Command::new("ldd").arg(p).output().is_ok_and(|o| !o.status.success());
    if !busybox.exists() || !is_static(busybox) {
        eprintln!("skipped: no static /bin/busybox (Debian's busybox-static)");
        return;
    }
    let out = samepage().args(["run", "--own", "--", "/bin/busybox", "echo", "hi"]).output_within(LIMIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/bin/busybox is statically linked"), "{out:?}");
    let out = samepage().args(["run", "--own", "--", "true"]).output_within(LIMIT);
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("statically"), "{out:?}");
}
