//! The copy-on-write breaker: the thread that takes a merged page out of the
//! pool when the program writes to it (the kernel's `break_cow`).
//!
//! A write to a merged page would normally get a private copy from the
//! kernel's copy-on-write *inside* the pool mapping. Such a page can never
//! be merged again safely: `UFFDIO_MOVE`, the only atomic check that no
//! device pins a page, refuses pages of file mappings. So with a full-mode
//! userfaultfd, pool mappings stay write-protected (`UFFDIO_WRITEPROTECT`),
//! and the first write to a merged page waits in the kernel while this
//! thread copies the pool page into fresh anonymous memory and moves that
//! over it (`mremap`). The writer then retries and writes its own anonymous
//! page, which later scans can merge again like any other. A device that
//! pins the page for writing faults the same way first (`FOLL_WRITE` on a
//! write-protected entry), so nothing it writes is lost.
//!
//! The thread never waits on the scanner: it shares only the page space's
//! registry (which pages map the pool), under a lock held for one page.
//! Where the page space is itself replacing pool mappings (moving them to
//! other slots, unmerging, discarding), the thread leaves the writer waiting;
//! the page space wakes it when done, and it faults again.

use super::addr::PageAddr;
use super::space::{Broken, Registry};
use super::uffd::Uffd;
use linux_raw_sys::general as g;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The running breaker thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Breaker {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Breaker {
    /// Starts the thread serving `uffd`'s write-protect faults.
    pub fn start(uffd: Arc<Uffd>, registry: Arc<Mutex<Registry>>) -> std::io::Result<Breaker> {
        let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let stop2 = stop.try_clone()?;
        let thread = super::mem::spawn_engine_thread("samepage-cow", move || serve(&uffd, &registry, &stop2))?;
        Ok(Breaker { stop, thread: Some(thread) })
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `struct uffd_msg` as a page fault reports it (the layout of
/// <linux/userfaultfd.h>: an event byte, 7 reserved bytes, then the union,
/// whose `pagefault` member is flags, address and the thread id).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct FaultMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    feat: u64,
}

const _: () = assert!(std::mem::size_of::<FaultMsg>() == std::mem::size_of::<g::uffd_msg>());

impl FaultMsg {
    /// For a `UFFD_EVENT_REMOVE`, the range being discarded (the union's
    /// `remove` member: start and end where a fault has flags and address).
    pub(super) fn removed(&self) -> Option<(usize, usize)> {
        (self.event == g::UFFD_EVENT_REMOVE as u8).then_some((self.flags as usize, self.address as usize))
    }
}

/// Looks at the `madvise` calls that discard memory (`MADV_DONTNEED`,
/// `MADV_DONTNEED_LOCKED`, `MADV_FREE`, `MADV_REMOVE`) the process's threads
/// are in right now: read from `/proc/self/task/*/syscall`, which shows the
/// system call number and arguments of a thread blocked in one. The files stay open
/// (one `pread` per thread a look); the thread list is read again when a
/// thread is gone and at least every 100 ms, so new threads are seen.
#[derive(Debug)]
pub(super) struct Peeker {
    files: Vec<std::fs::File>,
    listed: std::time::Instant,
    buf: Vec<u8>,
}

impl Peeker {
    /// Lists the process's threads.
    pub(super) fn new() -> Self {
        let mut p = Peeker { files: Vec::new(), listed: std::time::Instant::now(), buf: vec![0; 256] };
        p.relist();
        p
    }

    fn relist(&mut self) {
        self.files.clear();
        // Without the C library's malloc (`numbered_entries`): this runs
        // while the page space is held (see `mem::keep_thread_arena_out`).
        for tid in samepage_daemon::procmaps::numbered_entries("/proc/self/task").unwrap_or_default() {
            if let Ok(f) = std::fs::File::open(format!("/proc/self/task/{tid}/syscall")) {
                self.files.push(f);
            }
        }
        self.listed = std::time::Instant::now();
    }

    /// The `(start, end)` of every discarding `madvise` in progress.
    pub(super) fn discards(&mut self) -> Vec<(usize, usize)> {
        // A new thread shows in the link count of `/proc/self/task` (one per
        // thread, plus `.` and `..`): list them again before looking.
        use std::os::unix::fs::MetadataExt;
        let threads = std::fs::metadata("/proc/self/task").map_or(0, |m| m.nlink().saturating_sub(2));
        if threads as usize != self.files.len() || self.listed.elapsed() > std::time::Duration::from_millis(100) {
            self.relist();
        }
        match self.look() {
            Some(out) => out,
            // A thread is gone: list them again (new ones are seen too).
            None => {
                self.relist();
                self.look().unwrap_or_default()
            }
        }
    }

    /// One look at every listed thread; `None` if one of them is gone.
    fn look(&mut self) -> Option<Vec<(usize, usize)>> {
        use std::os::unix::fs::FileExt;
        let discards = [g::MADV_DONTNEED, g::MADV_DONTNEED_LOCKED, g::MADV_FREE, g::MADV_REMOVE].map(|a| a as usize);
        let hex = |s: Option<&str>| s.and_then(|v| usize::from_str_radix(v.trim_start_matches("0x"), 16).ok());
        let mut out = Vec::new();
        for f in &self.files {
            let n = f.read_at(&mut self.buf, 0).ok()?;
            let line = std::str::from_utf8(&self.buf[..n]).unwrap_or("");
            let mut w = line.split_whitespace();
            if w.next().and_then(|nr| nr.parse::<u32>().ok()) != Some(g::__NR_madvise) {
                continue;
            }
            if let (Some(addr), Some(len), Some(advice)) = (hex(w.next()), hex(w.next()), hex(w.next())) {
                if discards.contains(&advice) {
                    out.push((addr, addr.saturating_add(len)));
                }
            }
        }
        Some(out)
    }
}

/// How many page faults wait unread on a userfaultfd (`pending:` in its
/// `/proc/self/fdinfo` entry). The kernel hands out waiting faults before
/// events, so while one waits, the next message read is a fault and nobody
/// needs to be looked at first (which costs a read per thread).
#[derive(Debug)]
pub(super) struct PendingFaults {
    file: Option<std::fs::File>,
    buf: Vec<u8>,
}

impl PendingFaults {
    /// For `uffd`.
    pub(super) fn new(uffd: &Uffd) -> Self {
        use rustix::fd::AsRawFd;
        let file = std::fs::File::open(format!("/proc/self/fdinfo/{}", uffd.fd().as_raw_fd())).ok();
        PendingFaults { file, buf: vec![0; 512] }
    }

    /// Whether a fault waits unread (false when it cannot tell).
    pub(super) fn any(&mut self) -> bool {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else { return false };
        let Ok(n) = f.read_at(&mut self.buf, 0) else { return false };
        std::str::from_utf8(&self.buf[..n])
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("pending:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|p| p > 0)
    }
}

/// Reads the userfaultfd's messages until told to stop.
///
/// A `madvise(MADV_DONTNEED)` on a merged page would bring its pool page back
/// instead of zeros: the kernel's `MADV_DONTNEED` on a private file mapping
/// drops the private copy and reads the file again. The pool mappings'
/// userfaultfd asks for `UFFD_EVENT_REMOVE`, which the kernel sends *before*
/// it discards, making the caller wait until the event is read; the event
/// tells the range only once read, but the waiting caller's arguments show
/// in `/proc/self/task/*/syscall`. So before each message is read, the pool
/// mappings inside every such range become fresh anonymous memory (zeros);
/// then the caller goes on and discards anonymous memory, as it would have
/// without samepage. Messages are read one at a time: the one read was
/// queued before the threads were looked at, so its caller was seen.
fn serve(uffd: &Uffd, registry: &Mutex<Registry>, stop: &OwnedFd) {
    let mut msgs = [FaultMsg::default(); 1];
    let mut peeker = Peeker::new();
    let mut pending = PendingFaults::new(uffd);
    // Faults to serve again once the event in the way is read.
    let mut later: Vec<PageAddr> = Vec::new();
    loop {
        let retry = std::mem::take(&mut later);
        for addr in retry {
            serve_fault(uffd, registry, addr, &mut later);
        }
        let ufd = uffd.fd();
        let mut fds = [PollFd::new(&ufd, PollFlags::IN), PollFd::new(stop, PollFlags::IN)];
        let timeout =
            if later.is_empty() { None } else { Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 1_000_000 }) };
        if poll(&mut fds, timeout).is_err() {
            continue;
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        // A fault is read first if one waits (then the message cannot be a
        // remove event); otherwise the callers are looked at first. (A fault
        // that goes in between, woken by a window closing, lets an event
        // through unseen: a plain discard missed, never a write lost.)
        let discards = if pending.any() { Vec::new() } else { peeker.discards() };
        if !discards.is_empty() {
            let mut reg = registry.lock().unwrap_or_else(|e| e.into_inner());
            for (start, end) in discards {
                reg.noticed_discard(start, end);
            }
        }
        let n = uffd.read_messages(&mut msgs);
        for m in &msgs[..n] {
            // A remove event was served above, before its caller could go
            // on (serving it now, after, could zero pages the program has
            // written since).
            if m.event != g::UFFD_EVENT_PAGEFAULT as u8 {
                continue;
            }
            // A fault on a missing page is a merge window's: it wakes it.
            if m.flags & u64::from(g::UFFD_PAGEFAULT_FLAG_WP) == 0 {
                continue;
            }
            serve_fault(uffd, registry, PageAddr::containing(m.address as usize), &mut later);
        }
    }
}

/// Serves a write fault at `addr` (see [`Registry::break_cow`]); a fault
/// that must wait for an event to be read goes to `later`.
fn serve_fault(uffd: &Uffd, registry: &Mutex<Registry>, addr: PageAddr, later: &mut Vec<PageAddr>) {
    let page = super::addr::PageRange::new(addr, 1);
    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reg = registry.lock().unwrap_or_else(|e| e.into_inner());
        let what = reg.break_cow(uffd, addr);
        // A write must never stay blocked: where the page is not moved, the
        // protection goes (the kernel then copies in place) before the
        // registry lets anyone look again.
        if matches!(what, Broken::PoolCopy | Broken::NotMerged) {
            match uffd.write_protect(page, false) {
                // An event waits to be read first.
                Err(e) if e.errno == rustix::io::Errno::AGAIN => return Broken::Later,
                // No longer registered (made anonymous meanwhile): nothing
                // protects it any more; the writer just needs waking.
                _ => {}
            }
        }
        what
    }));
    match handled {
        // The page space wakes the range when it is done there.
        Ok(Broken::Busy) => {}
        Ok(Broken::Later) => later.push(addr),
        Ok(_) => {
            let _ = uffd.wake(page);
        }
        Err(_) => {
            let _ = uffd.write_protect(page, false);
            let _ = uffd.wake(page);
        }
    }
}

impl Uffd {
    /// Reads pending messages into `out` without blocking; returns how many.
    pub(super) fn read_messages(&self, out: &mut [FaultMsg]) -> usize {
        // SAFETY: `FaultMsg` is plain old data of integers: any bytes the
        // kernel writes are a valid value; the buffer is ours, `out`'s size.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(out)) };
        match rustix::io::read(self.fd(), bytes) {
            Ok(n) => n / std::mem::size_of::<FaultMsg>(),
            Err(_) => 0,
        }
    }
}
