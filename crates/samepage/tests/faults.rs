//! Faults: the scanner thread panicking, the engine's own `mmap` and
//! `UFFDIO_WRITEPROTECT` failing (injected with `samepage::testing`),
//! unmerging with too little memory (injected, and for real under
//! `RLIMIT_AS`), and the program exiting or calling `exec` while the engine
//! works. Each test checks that nothing is lost and nothing is left behind.

mod common;
use common::assert_content as check;
use common::*;
use rustix::io::Errno;
use samepage::testing::{self as fault, Point};
use samepage::{Engine, Error, Run, Tunables};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Turns fault injection off when a test ends, even by a panic.
struct Faults;
impl Drop for Faults {
    fn drop(&mut self) {
        fault::clear_faults();
    }
}

const N: usize = 4096;

/// 64 contents, 64 copies each, in runs of 8.
fn want(i: usize) -> [u8; PAGE] {
    content(((i / 8) % 64) as u64)
}

fn fill(r: &samepage::Region) {
    for i in 0..N {
        r.write(i * PAGE, &want(i)).unwrap();
    }
}

/// An engine with `t`, stopped, and a region of `N` pages filled with [`want`];
/// the caller sets `run` when the test is ready.
fn filled(t: Tunables) -> (Engine, samepage::Region) {
    let engine = Engine::new(Tunables { run: Run::Stop, ..t }).unwrap();
    let region = engine.alloc_region(N * PAGE).unwrap();
    fill(&region);
    (engine, region)
}

#[test]
fn a_panicking_scanner_is_reported_and_merged_memory_stays_correct() {
    let _g = serial();
    let _f = Faults;
    let (engine, region) = filled(fast(256, false));
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    assert_eq!(c.pages_shared, 64, "{c:?}");
    fault::inject(Point::ScannerPanic, 1, Errno::INVAL);
    while engine.failure().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    fault::clear_faults();
    assert!(matches!(engine.counters(), Err(Error::EngineFailed(_))));
    assert!(matches!(engine.set_run(Run::Unmerge), Err(Error::EngineFailed(_))));
    // Merged pages are plain copy-on-write mappings: reads and writes work
    // with no engine (a write-protect window left open would hang here).
    check(&region, want);
    for i in (0..N).step_by(3) {
        region.write(i * PAGE + 5, &[i as u8]).unwrap();
    }
    check(&region, |i| {
        let mut p = want(i);
        if i % 3 == 0 {
            p[5] = i as u8;
        }
        p
    });
    drop(region); // unregistering fails (engine failed); the memory is unmapped anyway
    drop(engine); // the scanner thread is joined, not waited for forever
}

#[test]
fn failed_maps_and_protections_are_skipped_and_counted() {
    let _g = serial();
    let _f = Faults;
    let (engine, region) = filled(fast(256, false));
    fault::inject(Point::MapPool, 3, Errno::NOMEM);
    fault::inject(Point::WriteProtect, 4, Errno::PERM);
    engine.set_run(Run::Merge).unwrap();
    // A writer races the failing merges on pages 0..512 (its own byte 100).
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let i = (k % 512) as usize;
                region.write(i * PAGE + 100, &[(k / 512) as u8]).unwrap();
                k += 1;
            }
            writes.store(k, Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    // The last value the writer put in each of its pages.
    let k = writes.load(Ordering::Relaxed);
    let last = |i: usize| -> u8 {
        let i = i as u64;
        let rounds = k / 512 + u64::from(i < k % 512);
        (rounds.saturating_sub(1)) as u8
    };
    let expect = |i: usize| {
        let mut p = want(i);
        if i < 512 && k > i as u64 {
            p[100] = last(i);
        }
        p
    };
    check(&region, expect);
    // Stopped at any moment, with failures being injected, the counters are
    // the truth (pages mapping the pool, recounted from smaps): no failed
    // merge is counted as done, nothing is left half done.
    let start = region.as_ptr() as usize;
    let mut t = engine.tunables().unwrap();
    t.pages_to_scan = 64;
    engine.set_tunables(t.clone()).unwrap();
    for _ in 0..10 {
        engine.set_run(Run::Merge).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        engine.set_run(Run::Stop).unwrap();
        let c = engine.counters().unwrap();
        let truth = pool_pages_in(start, start + region.len());
        assert_eq!(truth, c.pages_shared + c.pages_sharing, "pages mapping the pool (smaps) vs counters {c:?}");
    }
    // Failures were injected, seen and counted, and merging went on around them.
    let injected = fault::injected(Point::MapPool) + fault::injected(Point::WriteProtect);
    assert!(injected > 0);
    t.pages_to_scan = 4096;
    t.run = Run::Merge;
    engine.set_tunables(t).unwrap();
    let c = converge(&engine, 3);
    fault::clear_faults();
    engine.set_run(Run::Stop).unwrap();
    let _ = c;
    let c = engine.counters().unwrap();
    assert!(c.merge_errors >= injected.min(1), "{c:?}");
    assert!(c.pages_sharing > 0, "{c:?}");
    check(&region, expect);
    // Nothing half done: the counters are the truth, and every page is writable
    // (no protection left behind: a write would hang).
    let rc = engine.region_counters(region.id()).unwrap();
    assert_eq!(rc.ksm_merging_pages, c.pages_shared + c.pages_sharing, "{rc:?} {c:?}");
    let truth = pool_pages_in(start, start + region.len());
    assert_eq!(truth, c.pages_shared + c.pages_sharing, "pages mapping the pool (smaps) vs counters {c:?}");
    for i in 0..N {
        region.write(i * PAGE + 7, &[1]).unwrap();
    }
    engine.set_run(Run::Unmerge).unwrap();
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing), (0, 0), "{c:?}");
}

#[test]
fn unmerging_without_memory_fails_cleanly_and_loses_nothing() {
    let _g = serial();
    let _f = Faults;
    let (engine, region) = filled(fast(256, false));
    engine.set_run(Run::Merge).unwrap();
    let merged = converge(&engine, 2);
    assert_eq!(merged.pages_shared + merged.pages_sharing, N as u64, "{merged:?}");

    // Injected: every anonymous mmap of unmerging fails with ENOMEM.
    fault::inject(Point::MapAnon, 1, Errno::NOMEM);
    let e = engine.unregister(region.id()).unwrap_err();
    assert!(matches!(e, Error::Unmerge(_)), "{e}");
    assert!(e.to_string().contains("Cannot allocate memory"), "{e}");
    let e = engine.set_run(Run::Unmerge).unwrap_err();
    assert!(matches!(e, Error::Unmerge(_)), "{e}");
    fault::clear_faults();
    check(&region, want);
    assert!(engine.region_counters(region.id()).is_ok(), "still registered");

    // For real: an address-space limit leaves no room for the copies.
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    assert_eq!(c.pages_shared + c.pages_sharing, N as u64, "{c:?}");
    let (soft, hard) = rlimit_as();
    let vm = status("VmSize") + (1 << 20);
    set_rlimit_as(vm, hard);
    let e = engine.set_run(Run::Unmerge);
    set_rlimit_as(soft, hard);
    let e = e.unwrap_err();
    assert!(e.to_string().contains("Cannot allocate memory"), "{e}");
    assert_eq!(engine.tunables().unwrap().run, Run::Stop, "a failed run = 2 leaves run = 0, as the kernel does");
    check(&region, want);
    // With memory back, it works.
    engine.set_run(Run::Unmerge).unwrap();
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing), (0, 0), "{c:?}");
    check(&region, want);
}

fn status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn rlimit_as() -> (u64, u64) {
    let l = rustix::process::getrlimit(rustix::process::Resource::As);
    (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX))
}

fn set_rlimit_as(soft: u64, hard: u64) {
    let lim = |v: u64| if v == u64::MAX { None } else { Some(v) };
    rustix::process::setrlimit(
        rustix::process::Resource::As,
        rustix::process::Rlimit { current: lim(soft), maximum: lim(hard) },
    )
    .unwrap();
}

/// Runs this test binary again as a child doing `what` (see `child`).
fn run_child(what: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--include-ignored", "--nocapture", "--test-threads", "1"])
        .env("SAMEPAGE_FAULTS_CHILD", what)
        .output()
        .unwrap()
}

/// The child: an engine merging at full speed and a writer, then, mid-work,
/// `exit` or `exec`. Not a test of its own: ignored, run only by `run_child`.
#[test]
#[ignore = "the child process of exit_and_exec_while_the_engine_works_leave_nothing_behind"]
fn child() {
    let Ok(what) = std::env::var("SAMEPAGE_FAULTS_CHILD") else { return };
    let (engine, region) = filled(fast(4, true));
    engine.set_run(Run::Merge).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut k = 0usize;
            loop {
                region.write((k % N) * PAGE, &want(k / N)).unwrap();
                k += 1;
            }
        });
        while engine.counters().unwrap().pages_sharing < 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        if what == "exec" {
            use std::os::unix::process::CommandExt;
            // What the new program inherits: no pool memfd, no userfaultfd.
            let e = std::process::Command::new("sh").args(["-c", "ls -l /proc/self/fd/; echo exec-ok"]).exec();
            panic!("exec failed: {e}");
        }
        std::process::exit(42);
    });
}

#[test]
fn exit_and_exec_while_the_engine_works_leave_nothing_behind() {
    let _g = serial();
    let shmem = meminfo("Shmem");
    for _ in 0..3 {
        let out = run_child("exit");
        assert_eq!(out.status.code(), Some(42), "{}", String::from_utf8_lossy(&out.stderr));
        let out = run_child("exec");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("exec-ok"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("samepage-pool") && !text.contains("userfaultfd"), "leaked into exec: {text}");
    }
    // The pools of the exited processes are gone.
    let grew = meminfo("Shmem").saturating_sub(shmem);
    assert!(grew < 8 << 20, "Shmem grew by {grew} bytes");
}
