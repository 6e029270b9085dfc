//! Torture activities that check merged pages behave like the pages they
//! replaced: devices writing through pins (O_DIRECT reads, io_uring fixed
//! buffers), `vmsplice` from registered pages, memory with attributes
//! (`MADV_DONTFORK`, `MADV_WIPEONFORK`, `MADV_DONTDUMP`, `mlock`) and its
//! forked children, and discarded memory reading zeros (through the engine
//! and with a plain `madvise`). Each has its own registered memory.

use anyhow::{Context, Result};
use io_uring::{opcode, types, IoUring};
use samepage::testing::{self, AnonMapping};
use samepage::{Discard, Engine, RegionId};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::workload::PAGE;

/// What these activities count.
#[derive(Default)]
pub struct IoTally {
    /// `pread(O_DIRECT)` into registered pages.
    pub direct_reads: AtomicU64,
    /// io_uring `READ_FIXED` into a fixed buffer in registered memory.
    pub fixed_reads: AtomicU64,
    /// Fixed buffer (un)registrations (pins taken after merging).
    pub fixed_registrations: AtomicU64,
    /// `vmsplice` of registered pages into a pipe, read back.
    pub splices: AtomicU64,
    /// Reads (direct, fixed, spliced) whose data did not land or differed.
    pub reads_lost: AtomicU64,
    /// Forked children that checked the attribute areas.
    pub attribute_forks: AtomicU64,
    /// Attribute checks (children and `VmFlags`) that failed.
    pub attribute_violations: AtomicU64,
    /// What each failed attribute check saw (the first 20).
    pub attribute_detail: std::sync::Mutex<Vec<String>>,
    /// `Engine::discard` calls on merged pages.
    pub discards: AtomicU64,
    /// Plain `madvise(MADV_DONTNEED)` calls on merged pages.
    pub plain_dontneeds: AtomicU64,
    /// Pages discarded with `Engine::discard` that did not read zeros.
    pub discard_violations: AtomicU64,
    /// Pages discarded with a plain `madvise(MADV_DONTNEED)` that did not
    /// read zeros: the engine missed the discard (it notices plain discards
    /// where it can; see the README for the window it cannot see).
    pub plain_dontneed_misses: AtomicU64,
}

/// Page `i` of a test file / common content `k`: deterministic bytes.
fn data(k: u64, out: &mut [u8; PAGE]) {
    crate::workload::gen_page(0xF11E + k, out);
}

fn common(k: u64, out: &mut [u8; PAGE]) {
    crate::workload::gen_page(0xC0FFEE + k, out);
}

/// Owned registered memory, unregistered on drop.
struct Area<'e> {
    engine: &'e Engine,
    mem: AnonMapping,
    id: RegionId,
}

impl<'e> Area<'e> {
    /// `pages` pages, prepared by `setup` (attributes), filled with common
    /// contents, then registered.
    fn new(engine: &'e Engine, pages: usize, setup: impl FnOnce(&AnonMapping) -> Result<()>) -> Result<Self> {
        let mem = AnonMapping::new(pages * PAGE)?;
        setup(&mem)?;
        let mut buf = [0u8; PAGE];
        for p in 0..pages {
            common(p as u64 % 4, &mut buf);
            mem.write(p * PAGE, &buf)?;
        }
        // SAFETY: the mapping lives in this Area, which unregisters it on drop.
        let id = unsafe { engine.register(mem.as_ptr(), mem.len()) }?;
        Ok(Area { engine, mem, id })
    }

    fn addr(&self, p: usize) -> usize {
        self.mem.as_ptr() as usize + p * PAGE
    }

    fn pages(&self) -> usize {
        self.mem.len() / PAGE
    }
}

impl Drop for Area<'_> {
    fn drop(&mut self) {
        let _ = self.engine.unregister(self.id);
    }
}

fn file_of(name: &str, pages: usize) -> Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join(format!("samepage-torture-{name}-{}", std::process::id()));
    let mut bytes = vec![0u8; pages * PAGE];
    let mut buf = [0u8; PAGE];
    for i in 0..pages {
        data(i as u64, &mut buf);
        bytes[i * PAGE..(i + 1) * PAGE].copy_from_slice(&buf);
    }
    std::fs::write(&path, bytes)?;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path)?;
    Ok((path, f))
}

fn same(area: &Area<'_>, p: usize, want: &[u8; PAGE]) -> bool {
    let mut buf = [0u8; PAGE];
    area.mem.read(p * PAGE, &mut buf).is_ok_and(|()| buf == *want)
}

/// A thread writing pages back to common contents (so the engine merges
/// them) and reading file data into them with `pread(O_DIRECT)`: the kernel
/// pins each page for the I/O. Every read must land.
pub fn direct_io(engine: &Engine, seed: u64, stop: &AtomicBool, t: &IoTally) -> Result<()> {
    let area = Area::new(engine, 256, |_| Ok(()))?;
    let (path, file) = file_of("direct", 64)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut buf, mut want) = ([0u8; PAGE], [0u8; PAGE]);
    while !stop.load(Ordering::Relaxed) {
        let p = rng.usize(..area.pages());
        common(rng.u64(..4), &mut buf);
        area.mem.write(p * PAGE, &buf)?;
        if rng.bool() {
            std::thread::sleep(Duration::from_micros(rng.u64(..500)));
        }
        let q = rng.usize(..64);
        // SAFETY: a page of this thread's own registered area; no Rust
        // reference to it exists; the kernel writes PAGE bytes there.
        let n = unsafe { libc::pread(file.as_raw_fd(), area.addr(p) as *mut libc::c_void, PAGE, (q * PAGE) as i64) };
        anyhow::ensure!(n == PAGE as isize, "pread(O_DIRECT): {}", std::io::Error::last_os_error());
        data(q as u64, &mut want);
        if !same(&area, p, &want) {
            t.reads_lost.fetch_add(1, Ordering::Relaxed);
        }
        t.direct_reads.fetch_add(1, Ordering::Relaxed);
    }
    std::fs::remove_file(path)?;
    Ok(())
}

/// A fixed io_uring buffer inside registered memory, read into with
/// `READ_FIXED` while the rest of the area is written back to common
/// contents; now and then the buffer is unregistered (its pages then
/// merge) and registered again (pinning merged pages). Every read must land.
pub fn fixed_buffers(engine: &Engine, seed: u64, stop: &AtomicBool, t: &IoTally) -> Result<()> {
    let area = Area::new(engine, 64, |_| Ok(()))?;
    let (path, file) = file_of("fixed", 64)?;
    let mut ring = IoUring::new(4)?;
    let (buf_pages, mut registered) = (16usize, false);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut buf, mut want) = ([0u8; PAGE], [0u8; PAGE]);
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if !registered || last.elapsed() > Duration::from_millis(200) {
            if registered {
                ring.submitter().unregister_buffers()?;
                // Unpinned: back to common contents, so they merge meanwhile.
                for p in 0..buf_pages {
                    common(p as u64 % 4, &mut buf);
                    area.mem.write(p * PAGE, &buf)?;
                }
                std::thread::sleep(Duration::from_millis(rng.u64(..100)));
            }
            let iov = libc::iovec { iov_base: area.mem.as_ptr().cast(), iov_len: buf_pages * PAGE };
            // SAFETY: the buffer stays mapped (in `area`) until the ring goes.
            unsafe { ring.submitter().register_buffers(&[iov]) }.context("io_uring register_buffers")?;
            registered = true;
            last = Instant::now();
            t.fixed_registrations.fetch_add(1, Ordering::Relaxed);
        }
        // Merge candidates around the buffer, and inside it.
        let p = rng.usize(..area.pages());
        common(rng.u64(..4), &mut buf);
        area.mem.write(p * PAGE, &buf)?;
        let (b, q) = (rng.usize(..buf_pages), rng.usize(..64));
        let dst = area.addr(b) as *mut u8;
        let sqe =
            opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), dst, PAGE as u32, 0).offset((q * PAGE) as u64).build();
        // SAFETY: `dst` lies in the registered fixed buffer 0.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow::anyhow!("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map(|c| c.result()).unwrap_or(-1);
        anyhow::ensure!(res == PAGE as i32, "READ_FIXED returned {res}");
        data(q as u64, &mut want);
        if !same(&area, b, &want) {
            t.reads_lost.fetch_add(1, Ordering::Relaxed);
        }
        t.fixed_reads.fetch_add(1, Ordering::Relaxed);
    }
    drop(ring);
    std::fs::remove_file(path)?;
    Ok(())
}

/// `vmsplice` of registered pages (merged or about to be) into a pipe and
/// back out: the pipe must deliver the page's content.
pub fn splicer(engine: &Engine, seed: u64, stop: &AtomicBool, t: &IoTally) -> Result<()> {
    let area = Area::new(engine, 64, |_| Ok(()))?;
    let (r, w) = rustix::pipe::pipe()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut buf, mut got) = ([0u8; PAGE], [0u8; PAGE]);
    while !stop.load(Ordering::Relaxed) {
        let p = rng.usize(..area.pages());
        common(rng.u64(..4), &mut buf);
        area.mem.write(p * PAGE, &buf)?;
        if rng.bool() {
            std::thread::sleep(Duration::from_micros(rng.u64(..2000)));
        }
        let iov = libc::iovec { iov_base: area.addr(p) as *mut libc::c_void, iov_len: PAGE };
        // SAFETY: the page is this thread's own registered memory; the pipe
        // takes references to it (no gift), read back right below.
        let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) };
        anyhow::ensure!(n == PAGE as isize, "vmsplice: {}", std::io::Error::last_os_error());
        let mut off = 0;
        while off < PAGE {
            off += rustix::io::read(&r, &mut got[off..])?;
        }
        if got != buf {
            t.reads_lost.fetch_add(1, Ordering::Relaxed);
        }
        t.splices.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Areas with `MADV_DONTFORK`, `MADV_WIPEONFORK`, `MADV_DONTDUMP` and
/// `mlock`, written back to common contents all the time; forked children
/// check what they inherit (no DONTFORK mapping, zeros where WIPEONFORK,
/// the parent's bytes elsewhere), and the parent checks `VmFlags`.
pub fn attributes(engine: &Engine, seed: u64, stop: &AtomicBool, t: &IoTally) -> Result<()> {
    let madv = |advice: libc::c_int| {
        move |m: &AnonMapping| -> Result<()> {
            // SAFETY: advice on this thread's own fresh mapping; changes no content.
            anyhow::ensure!(unsafe { libc::madvise(m.as_ptr().cast(), m.len(), advice) } == 0, "madvise({advice})");
            Ok(())
        }
    };
    let dontfork = Area::new(engine, 64, madv(libc::MADV_DONTFORK))?;
    let wipe = Area::new(engine, 64, madv(libc::MADV_WIPEONFORK))?;
    let dontdump = Area::new(engine, 64, madv(libc::MADV_DONTDUMP))?;
    let locked = Area::new(engine, 64, |m| {
        // SAFETY: locking this thread's own mapping changes no content.
        anyhow::ensure!(unsafe { libc::mlock(m.as_ptr().cast(), m.len()) } == 0, "mlock");
        Ok(())
    })?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = [0u8; PAGE];
    let mut last_flags = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for a in [&dontfork, &wipe, &dontdump, &locked] {
            for _ in 0..8 {
                let p = rng.usize(..a.pages());
                common(rng.u64(..4), &mut buf);
                a.mem.write(p * PAGE, &buf)?;
            }
        }
        std::thread::sleep(Duration::from_millis(20 + rng.u64(..60)));
        // What a child must see, read now (the child cannot allocate).
        let want: Vec<[u8; PAGE]> = (0..dontdump.pages())
            .map(|p| {
                let mut b = [0u8; PAGE];
                dontdump.mem.read(p * PAGE, &mut b).expect("inside");
                b
            })
            .collect();
        let (df, wf, dd, len) = (dontfork.addr(0), wipe.addr(0), dontdump.addr(0), dontfork.mem.len());
        let child = fork_check(|| {
            let mut v = [0u8; 16];
            // SAFETY: mincore only reports on the range; ENOMEM means unmapped.
            let unmapped = unsafe { libc::mincore(df as *mut libc::c_void, PAGE, v.as_mut_ptr()) } != 0;
            let wiped = (0..len).step_by(8).all(|o| {
                // SAFETY: the child's copy of the WIPEONFORK area.
                unsafe { ((wf + o) as *const u64).read_volatile() == 0 }
            });
            let kept = want.iter().enumerate().all(|(p, w)| {
                w.iter().enumerate().step_by(64).all(|(j, b)| {
                    // SAFETY: the child's copy of the DONTDUMP area.
                    unsafe { ((dd + p * PAGE + j) as *const u8).read_volatile() == *b }
                })
            });
            (!unmapped as i32) | (!wiped as i32) << 1 | (!kept as i32) << 2
        })?;
        t.attribute_forks.fetch_add(1, Ordering::Relaxed);
        if child != 0 {
            t.violation(format!(
                "forked child: {}{}{}(exit {child})",
                if child & 1 != 0 { "the MADV_DONTFORK area was mapped; " } else { "" },
                if child & 2 != 0 { "the MADV_WIPEONFORK area was not zeros; " } else { "" },
                if child & 4 != 0 { "the MADV_DONTDUMP area differed from the parent's; " } else { "" },
            ));
        }
        if last_flags.elapsed() > Duration::from_secs(3) {
            last_flags = Instant::now();
            for (a, flag) in [(&dontfork, "dc"), (&wipe, "wf"), (&dontdump, "dd"), (&locked, "lo")] {
                let start = a.addr(0);
                let flags = vm_flags_in(start, start + a.mem.len());
                if let Some(f) = flags.iter().find(|f| !f.split(' ').any(|x| x == flag)) {
                    t.violation(format!("VmFlags without {flag} in the area: {f}"));
                }
            }
        }
    }
    Ok(())
}

impl IoTally {
    /// Counts a failed attribute check and keeps what it saw.
    fn violation(&self, what: String) {
        self.attribute_violations.fetch_add(1, Ordering::Relaxed);
        let mut d = self.attribute_detail.lock().unwrap();
        if d.len() < 20 {
            d.push(what);
        }
    }
}

/// Forks a child that runs `check` (raw memory reads only) and exits with
/// what it returns (0: it held); returns that code (or -1 if the child did
/// not exit).
pub fn fork_check(check: impl FnOnce() -> i32) -> Result<i32> {
    // SAFETY: the child only runs `check`, which reads raw memory, then
    // leaves with _exit: no allocation, no locks, no destructors.
    let pid = unsafe { libc::fork() };
    anyhow::ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = check();
        // SAFETY: ends the child without the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    anyhow::ensure!(unsafe { libc::waitpid(pid, &mut status, 0) } == pid, "waitpid");
    Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 })
}

/// The `VmFlags` of every mapping inside `[start, end)`.
fn vm_flags_in(start: usize, end: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return Vec::new() };
    let (mut out, mut inside) = (Vec::new(), false);
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            inside = a >= start && b <= end;
        } else if let Some(v) = l.strip_prefix("VmFlags:").filter(|_| inside) {
            out.push(v.trim().to_string());
        }
    }
    out
}

/// Merged pages discarded, through the engine or with a plain `madvise`,
/// must read zeros; then they are written back and merge again.
pub fn discarder(engine: &Engine, seed: u64, stop: &AtomicBool, t: &IoTally) -> Result<()> {
    let area = Area::new(engine, 256, |_| Ok(()))?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = [0u8; PAGE];
    let zero = [0u8; PAGE];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.u64(..20)));
        let n = rng.usize(1..=16);
        let p = rng.usize(..area.pages() - n);
        // MADV_FREE may leave the old content until the page is written;
        // MADV_DONTNEED promises zeros.
        let (strict, plain) = if rng.bool() {
            let how = if rng.bool() { Discard::DontNeed } else { Discard::Free };
            engine.discard(area.addr(p) as *mut u8, n * PAGE, how)?;
            t.discards.fetch_add(1, Ordering::Relaxed);
            (how == Discard::DontNeed, false)
        } else {
            // SAFETY: this thread's own registered memory, discarded by the program.
            unsafe { testing::dont_need(area.addr(p), n * PAGE) }?;
            t.plain_dontneeds.fetch_add(1, Ordering::Relaxed);
            (true, true)
        };
        for i in p..p + n {
            if !same(&area, i, &zero) {
                let mut old = [0u8; PAGE];
                area.mem.read(i * PAGE, &mut old)?;
                let was_common = (0..4).any(|k| {
                    common(k, &mut buf);
                    buf == old
                });
                if plain && was_common {
                    t.plain_dontneed_misses.fetch_add(1, Ordering::Relaxed);
                } else if strict || !was_common {
                    t.discard_violations.fetch_add(1, Ordering::Relaxed);
                }
            }
            common(rng.u64(..4), &mut buf);
            area.mem.write(i * PAGE, &buf)?;
        }
    }
    Ok(())
}
