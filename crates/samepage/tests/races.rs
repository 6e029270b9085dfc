//! No write is lost: threads and the kernel write into pages while the engine
//! merges them at full speed; a fork after merging gives independent memory.

mod common;
use common::*;
use samepage::{Engine, Run, UffdMode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const COMMON: u64 = 5;

#[test]
fn racing_writers_lose_no_write() {
    let _g = serial();
    let engine = Engine::new(fast(4, true)).unwrap();
    let pages = 4096;
    let region = Arc::new(engine.alloc_region(pages * PAGE).unwrap());
    for i in 0..pages {
        let c = if i % 3 == 0 { [0u8; PAGE] } else { content(i as u64 % COMMON) };
        region.write(i * PAGE, &c).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let threads = 3;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (region, stop, writes) = (region.clone(), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                // This thread owns the pages with index % threads == t.
                let mine: Vec<usize> = (0..pages).filter(|p| p % threads == t).collect();
                let mut shadow: Vec<[u8; PAGE]> = mine
                    .iter()
                    .map(|&i| {
                        let mut b = [0u8; PAGE];
                        region.read(i * PAGE, &mut b).unwrap();
                        b
                    })
                    .collect();
                let mut rng = fastrand::Rng::with_seed(t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    let k = rng.usize(..mine.len());
                    let p = mine[k];
                    if rng.u8(..) < 40 {
                        // Back to a common content: it merges again.
                        let c = content(rng.u64(..COMMON));
                        region.write(p * PAGE, &c).unwrap();
                        shadow[k] = c;
                    } else {
                        let off = rng.usize(..PAGE);
                        let b = rng.u8(..);
                        region.write(p * PAGE + off, &[b]).unwrap();
                        shadow[k][off] = b;
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                    if rng.u8(..) == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                (mine, shadow)
            })
        })
        .collect();
    let start = Instant::now();
    let mut merged_during = 0;
    while start.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
        let c = engine.counters().unwrap();
        merged_during = merged_during.max(c.pages_sharing + c.ksm_zero_pages);
    }
    stop.store(true, Ordering::Relaxed);
    let mut buf = [0u8; PAGE];
    for h in handles {
        let (mine, shadow) = h.join().unwrap();
        for (k, &p) in mine.iter().enumerate() {
            region.read(p * PAGE, &mut buf).unwrap();
            let bad = buf.iter().zip(&shadow[k]).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "page {p}: {bad} bytes lost");
        }
    }
    let c = engine.counters().unwrap();
    eprintln!("writes {} merged-at-peak {merged_during} {c:?}", writes.load(Ordering::Relaxed));
    assert!(merged_during > 100, "the engine merged while threads wrote");
    assert!(writes.load(Ordering::Relaxed) > 10_000);
}

/// `read(2)` into a merged page: the kernel writes for the program. It must
/// land in a private copy, the rest of the page intact, other sharers unchanged.
#[test]
fn kernel_writes_into_merged_pages_land() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    if engine.info().uffd_mode != UffdMode::Full {
        eprintln!("skipped: no full-mode userfaultfd (not root): kernel writes during a window fail with EFAULT there");
        return;
    }
    let pages = 512;
    let region = engine.alloc_region(pages * PAGE).unwrap();
    for i in 0..pages {
        region.write(i * PAGE, &content(i as u64 % 2)).unwrap();
    }
    converge(&engine, 1);
    // Then again and again while the engine keeps re-merging the pages.
    let mut rng = fastrand::Rng::with_seed(7);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    let mut expected: Vec<[u8; PAGE]> = (0..pages).map(|i| content(i as u64 % 2)).collect();
    while Instant::now() < deadline {
        let p = rng.usize(..pages);
        let off = rng.usize(..PAGE - 64);
        let len = rng.usize(1..64);
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let (r, w) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&w, &data).unwrap();
        let dst = region.as_ptr() as usize + p * PAGE + off;
        // SAFETY: inside the region, which the test may write; the kernel
        // writes straight into the page and no Rust reference to memory the
        // engine remaps is made.
        let n = unsafe { samepage::testing::read_into(&r, dst, len) }.unwrap();
        assert_eq!(n, len);
        expected[p][off..off + len].copy_from_slice(&data);
        if rng.bool() {
            // Restore, so it merges again.
            expected[p] = content(p as u64 % 2);
            region.write(p * PAGE, &expected[p]).unwrap();
        }
        rounds += 1;
    }
    let mut buf = [0u8; PAGE];
    for (i, e) in expected.iter().enumerate() {
        region.read(i * PAGE, &mut buf).unwrap();
        assert!(buf == *e, "page {i} differs after {rounds} read(2) rounds");
    }
    assert!(engine.counters().unwrap().pages_sharing > 0);
}

/// A fork after merging: the child sees the right content, its writes change
/// neither the parent nor the pool, and the parent's writes not the child.
#[test]
fn fork_after_merge_gives_independent_memory() {
    let _g = serial();
    let engine = Engine::new(fast(256, true)).unwrap();
    let pages = 256;
    let region = engine.alloc_region(pages * PAGE).unwrap();
    for i in 0..pages {
        let c = if i % 4 == 0 { [0u8; PAGE] } else { content(i as u64 % 3) };
        region.write(i * PAGE, &c).unwrap();
    }
    let c = converge(&engine, 1);
    assert!(c.pages_sharing > 100 && c.ksm_zero_pages == 64, "{c:?}");
    let base = region.as_ptr();
    // SAFETY: the child only reads and writes the region with raw pointers
    // and leaves with _exit: no allocation, no locks.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut ok = true;
        for i in 0..pages {
            let want = if i % 4 == 0 { [0u8; PAGE] } else { content(i as u64 % 3) };
            for (j, w) in want.iter().enumerate() {
                let p = base.wrapping_add(i * PAGE + j);
                // SAFETY: inside the region, which the child inherited.
                ok &= unsafe { p.read_volatile() } == *w;
            }
            let p = base.wrapping_add(i * PAGE + 100);
            // SAFETY: as above.
            unsafe { p.write_volatile(0xC5) };
            // SAFETY: as above.
            ok &= unsafe { p.read_volatile() } == 0xC5;
        }
        // SAFETY: _exit ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    // The parent writes too, while the child lives.
    region.write(PAGE + 8, &[0xAA]).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child saw wrong memory");
    // The parent's pages: its own write, not the child's.
    let want = |i: usize| {
        let mut want = if i.is_multiple_of(4) { [0u8; PAGE] } else { content(i as u64 % 3) };
        if i == 1 {
            want[8] = 0xAA;
        }
        want
    };
    assert_content(&region, want);
    // Unmerging now is safe for the pool: no slot is freed while something maps it.
    engine.set_run(Run::Unmerge).unwrap();
    assert_content(&region, want);
}

/// A child forked after merging, which touches its memory only after the
/// parent has written every merged page (so the engine wants to free the pool
/// pages): the pool pages must stay, or the child would read zeros.
#[test]
fn pool_pages_outlive_a_forked_child_that_has_not_touched_them() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let pages = 128;
    let region = engine.alloc_region(pages * PAGE).unwrap();
    for i in 0..pages {
        region.write(i * PAGE, &content(i as u64 % 4)).unwrap();
    }
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared, 4, "{c:?}");
    let (r, w) = rustix::pipe::pipe().unwrap();
    let base = region.as_ptr();
    // SAFETY: the child blocks in read(2), then reads memory with raw
    // pointers and leaves with _exit: no allocation, no locks.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(w);
        let mut b = [0u8; 1];
        let _ = rustix::io::read(&r, &mut b);
        let mut ok = true;
        for i in 0..pages {
            let want = content(i as u64 % 4);
            for (j, x) in want.iter().enumerate() {
                let p = base.wrapping_add(i * PAGE + j);
                // SAFETY: the region, inherited from the parent.
                ok &= unsafe { p.read_volatile() } == *x;
            }
        }
        // SAFETY: ends the child without the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    drop(r);
    // If an assertion fails below, the child must not wait forever.
    struct Reap(libc::pid_t);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: our own child; killing it is harmless if it already exited.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
            // SAFETY: reaping our own child (no status wanted).
            unsafe { libc::waitpid(self.0, std::ptr::null_mut(), 0) };
        }
    }
    let reap = Reap(pid);
    // The parent writes every page: every stable page loses its last mapping here.
    for i in 0..pages {
        region.write(i * PAGE + 1, &[0x77]).unwrap();
    }
    let start = engine.counters().unwrap().full_scans;
    while engine.counters().unwrap().full_scans < start + 3 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // (The written pages merge again, into new stable pages.)
    let c = engine.counters().unwrap();
    assert_eq!(c.pool_slots_pending, 4, "the four old pool pages wait for the child: {c:?}");
    rustix::io::write(&w, &[1]).unwrap();
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    std::mem::forget(reap);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child read lost pages");
    // With the child gone, the next prune frees them.
    let mut t = engine.tunables().unwrap();
    t.stable_node_chains_prune_millisecs = 10;
    engine.set_tunables(t).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.counters().unwrap().pool_slots_pending > 0 {
        assert!(std::time::Instant::now() < deadline, "slots never freed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
