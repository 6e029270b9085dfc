//! A merged page behaves like the page it replaced: devices that pin pages
//! (io_uring fixed buffers, O_DIRECT) lose no write, VMA attributes survive
//! or the engine stays away, a forked child sees what it would without
//! samepage, and discarded memory reads zeros.

mod common;
use common::*;
use io_uring::{opcode, types, IoUring};
use samepage::testing::AnonMapping;
use samepage::{Discard, Engine, Run, Tunables};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const PAGES: usize = 256;

/// Memory outside the engine, `advise`d, filled with copies of 4 contents
/// (page `i` holds `content(i % 4)`), then registered.
fn registered(engine: &Engine, advise: impl FnOnce(&AnonMapping)) -> (AnonMapping, samepage::RegionId) {
    let m = AnonMapping::new(PAGES * PAGE).unwrap();
    advise(&m);
    for i in 0..PAGES {
        m.write(i * PAGE, &content(i as u64 % 4)).unwrap();
    }
    // SAFETY: the mapping outlives its registration (unregistered below or
    // by the engine's drop before the mapping's).
    let id = unsafe { engine.register(m.as_ptr(), m.len()) }.unwrap();
    (m, id)
}

fn madvise(m: &AnonMapping, advice: libc::c_int) {
    // SAFETY: advice on a mapping the test owns; none of the advices used changes content.
    assert_eq!(unsafe { libc::madvise(m.as_ptr().cast(), m.len(), advice) }, 0, "madvise({advice})");
}

/// Reads `len` bytes of `file` at `offset` into `dst` with io_uring's
/// `READ_FIXED` (the buffer registered beforehand): the kernel writes through
/// the pin it took at registration, as a device does.
fn read_fixed(ring: &mut IoUring, file: &std::fs::File, dst: *mut u8, len: usize, offset: u64) {
    let sqe = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), dst, len as u32, 0).offset(offset).build();
    // SAFETY: `dst..dst+len` lies in the registered fixed buffer 0, which stays mapped.
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert_eq!(cqe.result(), len as i32, "READ_FIXED");
}

fn register_buffer(ring: &IoUring, ptr: *mut u8, len: usize) {
    let iov = libc::iovec { iov_base: ptr.cast(), iov_len: len };
    // SAFETY: the buffer stays mapped until the ring is dropped.
    unsafe { ring.submitter().register_buffers(&[iov]) }.unwrap();
}

fn assert_pages(m: &AnonMapping, pages: std::ops::Range<usize>, want: impl Fn(usize) -> [u8; PAGE], what: &str) {
    let mut buf = [0u8; PAGE];
    for i in pages {
        m.read(i * PAGE, &mut buf).unwrap();
        if buf != want(i) {
            let w = want(i);
            let diff: Vec<usize> = (0..PAGE).filter(|&j| buf[j] != w[j]).collect();
            let like = (0..4u64)
                .find(|&k| buf == content(k))
                .map(|k| format!("content({k})"))
                .or_else(|| (buf == content(10_000 + i as u64)).then(|| "content(10000+i)".to_string()))
                .or_else(|| buf.iter().all(|&b| b == 0).then(|| "zeros".to_string()))
                .unwrap_or_else(|| "something else".into());
            let addr = m.as_ptr() as usize + i * PAGE;
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let vma = maps.lines().find(|l| {
                let (a, b) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
                usize::from_str_radix(a, 16).unwrap() <= addr && addr < usize::from_str_radix(b, 16).unwrap()
            });
            panic!(
                "{what}: page {i} differs in {} bytes ({}..{}), holds {like}; its mapping: {vma:?}",
                diff.len(),
                diff[0],
                diff[diff.len() - 1]
            );
        }
    }
}

/// An io_uring fixed buffer pins its pages for good (`FOLL_LONGTERM`). The
/// kernel's KSM never merges them; nor does samepage (`UFFDIO_MOVE` refuses
/// them), so a `READ_FIXED` lands where the program reads. With the pages
/// replaced, the read would go to the orphaned page: the program would read
/// the old content.
#[test]
fn an_io_uring_fixed_buffer_is_never_merged_and_its_reads_land() {
    let _g = serial();
    let engine = Engine::new(Tunables { run: Run::Stop, ..fast(256, false) }).unwrap();
    let (m, id) = registered(&engine, |_| {});
    let mut ring = IoUring::new(4).unwrap();
    register_buffer(&ring, m.as_ptr(), 16 * PAGE);
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    assert_eq!(c.pages_pinned, 16, "{c:?}");
    assert_eq!(c.pages_shared + c.pages_sharing, (PAGES - 16) as u64, "every other copy merged: {c:?}");
    let path = data_file("fixed", 16, 1000);
    let file = std::fs::File::open(&path).unwrap();
    read_fixed(&mut ring, &file, m.as_ptr(), 16 * PAGE, 0);
    assert_pages(&m, 0..16, |i| content(1000 + i as u64), "READ_FIXED");
    assert_pages(&m, 16..PAGES, |i| content(i as u64 % 4), "merged");
    drop(ring);
    engine.unregister(id).unwrap();
    std::fs::remove_file(path).unwrap();
}

/// A buffer registered after its pages merged: the registration's write
/// fault on the pool pages goes through the engine's copy-on-write breaker
/// (or the kernel's copy-on-write), the pins land on private pages, and the
/// engine never replaces them again: later reads land too.
#[test]
fn an_io_uring_buffer_registered_after_merging_keeps_its_reads() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |_| {});
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    let mut ring = IoUring::new(4).unwrap();
    register_buffer(&ring, m.as_ptr(), 16 * PAGE);
    let path = data_file("fixed-after", 32, 2000);
    let file = std::fs::File::open(&path).unwrap();
    for round in 0..4u64 {
        // Back to contents that merge: the engine sees candidates it must not take.
        for i in 0..16 {
            m.write(i * PAGE, &content(i as u64 % 4)).unwrap();
        }
        let c = converge(&engine, 2);
        assert_eq!(c.pages_pinned, 16, "round {round}: {c:?}");
        read_fixed(&mut ring, &file, m.as_ptr(), 16 * PAGE, (round % 2) * 16 * PAGE as u64);
        assert_pages(&m, 0..16, |i| content(2000 + (round % 2) * 16 + i as u64), "READ_FIXED after merging");
    }
    drop(ring);
    engine.unregister(id).unwrap();
    std::fs::remove_file(path).unwrap();
}

/// `pread(O_DIRECT)` into pages while the engine merges them at full speed:
/// the kernel pins each page for the I/O (`FOLL_PIN`). Every read must land.
#[test]
fn o_direct_reads_into_pages_being_merged_all_land() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |_| {});
    converge(&engine, 1);
    let path = data_file("odirect", PAGES, 5000);
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(3);
    let (mut reads, mut lost) = (0u64, 0u64);
    let merges_before = engine.counters().unwrap().merges;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; PAGE];
    while Instant::now() < deadline {
        let p = rng.usize(..PAGES);
        // A content the engine will merge at its next visit...
        m.write(p * PAGE, &content(p as u64 % 4)).unwrap();
        if rng.bool() {
            std::thread::sleep(Duration::from_micros(rng.u64(..300)));
        }
        // ...racing the kernel's write into the page for the program.
        let dst = m.as_ptr() as usize + p * PAGE;
        // SAFETY: a page of the test's own mapping; no Rust reference to it exists.
        let n = unsafe { libc::pread(file.as_raw_fd(), dst as *mut libc::c_void, PAGE, (p * PAGE) as i64) };
        assert_eq!(n, PAGE as isize, "pread(O_DIRECT)");
        reads += 1;
        m.read(p * PAGE, &mut buf).unwrap();
        if buf != content(5000 + p as u64) {
            lost += 1;
        }
    }
    let merges = engine.counters().unwrap().merges - merges_before;
    assert_eq!(lost, 0, "{lost} of {reads} O_DIRECT reads lost");
    assert!(merges > 100, "the engine merged only {merges} pages meanwhile");
    engine.unregister(id).unwrap();
    std::fs::remove_file(path).unwrap();
}

/// `MADV_DONTFORK` memory, merged: a forked child has no such mapping.
#[test]
fn dontfork_survives_merging() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |m| madvise(m, libc::MADV_DONTFORK));
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    let (start, len) = (m.as_ptr() as usize, m.len());
    assert!(vm_flags_in(start, start + len).iter().all(|f| f.contains("dc")), "{:?}", vm_flags_in(start, start + len));
    assert!(in_child(|| !is_mapped(start, len)), "the child sees the DONTFORK memory");
    engine.unregister(id).unwrap();
}

/// The program's attributes are on its memory at every moment, not only once
/// a merge or a copy-on-write break is done: a fork or a read of
/// `/proc/self/smaps` while pages merge and break (every write to a merged
/// page makes the engine copy it) never sees a `MADV_DONTFORK` page in the
/// child, nor a VMA of the area without `dc` or `lo`.
#[test]
fn attributes_hold_at_every_moment_while_pages_merge_and_break() {
    let _g = serial();
    let engine = Engine::new(Tunables { pages_to_scan: 64, ..fast(256, false) }).unwrap();
    let (m, id) = registered(&engine, |m| {
        madvise(m, libc::MADV_DONTFORK);
        // SAFETY: locking a mapping the test owns changes no content.
        assert_eq!(unsafe { libc::mlock(m.as_ptr().cast(), m.len()) }, 0);
    });
    let (start, len) = (m.as_ptr() as usize, m.len());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut forks, mut looks, mut leaked, mut flagless) = (0u64, 0u64, 0u64, Vec::new());
    let last = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                for i in 0..PAGES {
                    m.write(i * PAGE, &content((i as u64 + round) % 4)).unwrap();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            round
        });
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let child_clean = in_child(|| {
                (0..PAGES).all(|i| {
                    let mut v = [0u8; 1];
                    // SAFETY: mincore only reports on the page (ENOMEM: unmapped).
                    unsafe { libc::mincore((start + i * PAGE) as *mut libc::c_void, PAGE, v.as_mut_ptr()) != 0 }
                })
            });
            forks += 1;
            leaked += u64::from(!child_clean);
            for f in vm_flags_in(start, start + len) {
                looks += 1;
                if !(f.split(' ').any(|x| x == "dc") && f.split(' ').any(|x| x == "lo")) && flagless.len() < 5 {
                    flagless.push(f);
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    let c = engine.counters().unwrap();
    assert!(c.merges > 0 && c.cow_faults > 0 && forks > 10 && looks > 10, "{forks} forks, {looks} VMAs seen, {c:?}");
    assert_eq!(leaked, 0, "children of {forks} forks saw MADV_DONTFORK pages");
    assert!(flagless.is_empty(), "VMAs without dc or lo: {flagless:?}");
    assert_pages(&m, 0..PAGES, |i| content((i as u64 + last) % 4), "after");
    engine.unregister(id).unwrap();
}

/// `MADV_WIPEONFORK` cannot be put on a pool mapping: the engine leaves such
/// memory alone and says so, and a child reads zeros there.
#[test]
fn wipeonfork_memory_is_left_alone_and_children_read_zeros() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |m| madvise(m, libc::MADV_WIPEONFORK));
    let (plain, plain_id) = registered(&engine, |_| {});
    let c = converge(&engine, 1);
    assert_eq!(c.pages_excluded, PAGES as u64, "{c:?}");
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "only the plain region merges: {c:?}");
    let why = engine.exclusions(id).unwrap();
    assert!(why.len() == 1 && why[0].1.contains("WIPEONFORK"), "{why:?}");
    let start = m.as_ptr() as usize;
    assert!(
        in_child(|| (0..PAGES * PAGE).step_by(64).all(|o| {
            // SAFETY: the child's copy of the mapping (wiped: zeros).
            unsafe { ((start + o) as *const u8).read_volatile() == 0 }
        })),
        "the child read the parent's bytes"
    );
    engine.unregister(id).unwrap();
    engine.unregister(plain_id).unwrap();
    drop(plain);
}

/// `mlock`ed memory stays locked and resident once merged (the kernel's KSM
/// keeps mlocked pages merged and locked too).
#[test]
fn mlocked_memory_stays_locked_when_merged() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    // SAFETY: locking a mapping the test owns changes no content.
    let (m, id) = registered(&engine, |m| assert_eq!(unsafe { libc::mlock(m.as_ptr().cast(), m.len()) }, 0));
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    let (start, end) = (m.as_ptr() as usize, m.as_ptr() as usize + m.len());
    assert!(vm_flags_in(start, end).iter().all(|f| f.contains("lo")), "{:?}", vm_flags_in(start, end));
    // Locked and resident: every page mapped (smaps' Locked is the locked
    // pages' proportional share, which sharing divides, for the kernel's
    // KSM pages too), and the process's locked memory still counts it all.
    assert_eq!(smaps_sum_in("Rss", start, end), m.len() as u64, "every page resident");
    assert!(status_kb("VmLck") * 1024 >= m.len() as u64, "VmLck {} kB", status_kb("VmLck"));
    assert_pages(&m, 0..PAGES, |i| content(i as u64 % 4), "locked");
    // Discarding locked memory is refused as the kernel refuses it.
    let e = engine.discard(m.as_ptr(), PAGE, Discard::DontNeed).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    engine.unregister(id).unwrap();
}

/// `MADV_DONTDUMP` and `MADV_HUGEPAGE`/`MADV_NOHUGEPAGE` are put back on the
/// pool mappings.
#[test]
fn dontdump_and_hugepage_advice_survive_merging() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    for (advice, flag) in [(libc::MADV_DONTDUMP, "dd"), (libc::MADV_HUGEPAGE, "hg"), (libc::MADV_NOHUGEPAGE, "nh")] {
        let (m, id) = registered(&engine, |m| madvise(m, advice));
        let c = converge(&engine, 1);
        assert!(c.pages_sharing > 0, "{c:?}");
        let (start, end) = (m.as_ptr() as usize, m.as_ptr() as usize + m.len());
        let flags = vm_flags_in(start, end);
        assert!(flags.len() > 1 && flags.iter().all(|f| f.split(' ').any(|x| x == flag)), "{flag}: {flags:?}");
        engine.unregister(id).unwrap();
    }
}

/// `Engine::discard` (`MADV_DONTNEED`) makes merged pages read zeros, as
/// anonymous memory does; a plain `madvise(MADV_DONTNEED)` on a merged page
/// would bring its merged content back. The range stays registered and
/// merges again.
#[test]
fn discarded_memory_reads_zeros_even_where_it_was_merged() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |_| {});
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    engine.discard(m.as_ptr(), 64 * PAGE, Discard::DontNeed).unwrap();
    engine.discard(m.as_ptr().wrapping_add(64 * PAGE), 64 * PAGE, Discard::Free).unwrap();
    assert_pages(&m, 0..128, |_| [0; PAGE], "discarded");
    assert_pages(&m, 128..PAGES, |i| content(i as u64 % 4), "kept");
    let c = engine.counters().unwrap();
    assert_eq!(c.pages_shared + c.pages_sharing, (PAGES - 128) as u64, "{c:?}");
    for i in 0..128 {
        m.write(i * PAGE, &content(i as u64 % 4)).unwrap();
    }
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "merged again: {c:?}");
    engine.unregister(id).unwrap();
}

/// A fork while pages are out of the program's memory (inside a merge
/// window) waits for the window: the child never inherits a hole.
#[test]
fn forks_during_merging_see_every_page() {
    let _g = serial();
    let engine = Engine::new(Tunables { pages_to_scan: 64, ..fast(256, false) }).unwrap();
    let (m, id) = registered(&engine, |_| {});
    let start = m.as_ptr() as usize;
    let mut forks = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        // Unique again, then copies: windows keep opening.
        for i in 0..PAGES {
            let c = if round.is_multiple_of(2) { content(i as u64 % 4) } else { content(10_000 + i as u64) };
            m.write(i * PAGE, &c).unwrap();
        }
        for _ in 0..4 {
            let odd = round % 2 == 1;
            assert_pages(
                &m,
                0..PAGES,
                |i| if odd { content(10_000 + i as u64) } else { content(i as u64 % 4) },
                "parent",
            );
            assert!(
                in_child(|| (0..PAGES).all(|i| {
                    let want = if odd { content(10_000 + i as u64) } else { content(i as u64 % 4) };
                    // SAFETY: the child's copy of the mapping.
                    want.iter()
                        .enumerate()
                        .step_by(512)
                        .all(|(j, b)| unsafe { ((start + i * PAGE + j) as *const u8).read_volatile() == *b })
                })),
                "a forked child saw a page that was not the parent's"
            );
            forks += 1;
        }
    }
    assert!(forks > 8 && engine.counters().unwrap().merges > 0);
    engine.unregister(id).unwrap();
}

/// A plain `madvise(MADV_DONTNEED)` by the program, not through the engine,
/// on merged pages: the engine notices it (`UFFD_EVENT_REMOVE`) and the pages
/// read zeros afterwards, as anonymous memory does. Without it they would
/// read their merged content again.
#[test]
fn a_plain_madvise_dontneed_on_merged_pages_reads_zeros() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    if !engine.info().breaks_cow {
        eprintln!("skipped: no full-mode userfaultfd (not root): plain MADV_DONTNEED is not noticed there");
        return;
    }
    let (m, id) = registered(&engine, |_| {});
    let c = converge(&engine, 1);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    for round in 0..3 {
        // SAFETY: the test's own registered memory; no Rust reference to it.
        unsafe { samepage::testing::dont_need(m.as_ptr() as usize + 32 * PAGE, 64 * PAGE) }.unwrap();
        assert_pages(&m, 32..96, |_| [0; PAGE], "after MADV_DONTNEED");
        assert_pages(&m, 0..32, |i| content(i as u64 % 4), "before the range");
        assert_pages(&m, 96..PAGES, |i| content(i as u64 % 4), "after the range");
        for i in 32..96 {
            m.write(i * PAGE, &content(i as u64 % 4)).unwrap();
        }
        let c = converge(&engine, 2);
        assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "round {round}: merged again: {c:?}");
    }
    assert!(engine.space_stats().plain_discards >= 3);
    engine.unregister(id).unwrap();
}

/// Plain `madvise(MADV_DONTNEED)` racing merges: pages being moved out,
/// compared and mapped over while the program discards them read zeros
/// afterwards, whichever step the merge was at, except in the microseconds
/// between a pool run's `mmap` and its registration with the pool
/// mappings' userfaultfd, where the kernel sends no remove event (see the
/// README). Without the merge windows' remove events 0.3% of these discards
/// came back non-zero; with them, about 0.015%: the test allows 0.1%.
#[test]
fn plain_madvise_dontneed_racing_merges_reads_zeros() {
    let _g = serial();
    let engine = Engine::new(Tunables { pages_to_scan: 64, ..fast(256, false) }).unwrap();
    if !engine.info().breaks_cow {
        eprintln!("skipped: no full-mode userfaultfd (not root)");
        return;
    }
    let (m, id) = registered(&engine, |_| {});
    let seconds = std::env::var("SAMEPAGE_RACE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut rounds, mut discarded, mut wrong) = (0u64, 0u64, Vec::new());
    let mut buf = [0u8; PAGE];
    while Instant::now() < deadline {
        let n = rng.usize(1..=8);
        let p = rng.usize(..PAGES - n);
        if rng.bool() {
            std::thread::sleep(Duration::from_micros(rng.u64(..200)));
        }
        // SAFETY: the test's own registered memory; no Rust reference to it.
        unsafe { samepage::testing::dont_need(m.as_ptr() as usize + p * PAGE, n * PAGE) }.unwrap();
        for i in p..p + n {
            m.read(i * PAGE, &mut buf).unwrap();
            if buf != [0; PAGE] {
                wrong.push((rounds, i));
            }
            m.write(i * PAGE, &content(rng.u64(..4))).unwrap();
        }
        rounds += 1;
        discarded += n as u64;
    }
    let c = engine.counters().unwrap();
    eprintln!(
        "{} of {discarded} discarded pages ({rounds} calls) read non-zero; {} merges raced, {} failed",
        wrong.len(),
        c.merges,
        c.merge_errors
    );
    assert!(
        wrong.len() as u64 * 1000 <= discarded,
        "{} of {discarded} discarded pages read non-zero: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(c.merges > 1000, "too few merges raced: {c:?}");
    engine.unregister(id).unwrap();
}

/// Attributes given after registering, through `Engine::advise` and
/// `Engine::lock`: merged memory keeps them; `MADV_WIPEONFORK` makes the
/// engine unmerge the range and stay away.
#[test]
fn attributes_given_after_registering_are_kept_or_the_engine_stays_away() {
    use samepage::Advice;
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let (m, id) = registered(&engine, |_| {});
    converge(&engine, 1);
    let (start, end) = (m.as_ptr() as usize, m.as_ptr() as usize + m.len());
    let half = m.len() / 2;
    engine.advise(m.as_ptr(), half, Advice::DontFork).unwrap();
    engine.advise(m.as_ptr(), half, Advice::DontDump).unwrap();
    engine.lock(m.as_ptr(), half, false).unwrap();
    engine.advise(m.as_ptr().wrapping_add(half), half, Advice::WipeOnFork).unwrap();
    // Written and merged again: the new pool mappings get the attributes too.
    for i in 0..PAGES {
        m.write(i * PAGE, &content(100 + i as u64 % 4)).unwrap();
    }
    for i in 0..PAGES {
        m.write(i * PAGE, &content(i as u64 % 4)).unwrap();
    }
    let c = converge(&engine, 2);
    assert_eq!(c.pages_shared + c.pages_sharing, (PAGES / 2) as u64, "the first half merges: {c:?}");
    assert_eq!(c.pages_excluded, (PAGES / 2) as u64, "{c:?}");
    let first = vm_flags_in(start, start + half);
    assert!(
        first.len() > 1 && first.iter().all(|f| ["dc", "dd", "lo"].iter().all(|x| f.split(' ').any(|y| y == *x))),
        "{first:?}"
    );
    assert_eq!(smaps_sum_in("Rss", start, start + half), half as u64, "locked half resident");
    assert!(vm_flags_in(start + half, end).iter().all(|f| f.contains("wf")));
    let (a, b) = (start, start + half);
    assert!(
        in_child(|| !is_mapped(a, half)
            && (0..half).step_by(64).all(|o| {
                // SAFETY: the child's copy of the wiped half.
                unsafe { ((b + o) as *const u8).read_volatile() == 0 }
            })),
        "the child saw DONTFORK memory or WIPEONFORK memory not wiped"
    );
    engine.unregister(id).unwrap();
}

/// `mlock` behind the engine's back, after registering: the first merge the
/// kernel refuses for the lock state (`UFFDIO_MOVE` wants both ends equally
/// locked) makes the engine read the attributes again; it then merges the
/// memory and keeps it locked.
#[test]
fn an_mlock_behind_the_engines_back_is_found_and_kept() {
    let _g = serial();
    let engine = Engine::new(Tunables { run: Run::Stop, ..fast(256, false) }).unwrap();
    let (m, id) = registered(&engine, |_| {});
    // SAFETY: locking the test's own mapping changes no content.
    assert_eq!(unsafe { libc::mlock(m.as_ptr().cast(), m.len()) }, 0);
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    assert_eq!(c.pages_shared + c.pages_sharing, PAGES as u64, "{c:?}");
    let (start, end) = (m.as_ptr() as usize, m.as_ptr() as usize + m.len());
    assert!(vm_flags_in(start, end).iter().all(|f| f.contains("lo")), "{:?}", vm_flags_in(start, end));
    engine.unregister(id).unwrap();
}
